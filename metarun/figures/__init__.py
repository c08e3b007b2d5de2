"""Figures for papers, drawn from run directories by `metarun report --plot/--format html` and
`metarun compare --plot`: learning curves, result charts, metric against adaptation step, paired differences.

matplotlib is an optional extra (`pip install ".[plot]"`) and is imported only by the drawing modules, which
the commands import after `backend.load_matplotlib()` has checked it is there; training never imports this
package. One job per module:

- backend: load matplotlib (Agg) or say what to install; the paper-column style
- series: metrics.jsonl as numbers, mean and spread over seeds (no drawing)
- labels: axis labels with units, short legend labels, file names
- learning_curves, results_chart, adaptation, paired: one kind of figure each
- output: a figure as PNG and SVG bytes, the output folder and its figures.json index
- html_page: the self-contained HTML report
- report_figures: which figures a report draws from its groups
"""
