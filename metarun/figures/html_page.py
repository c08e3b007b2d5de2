"""The report as one HTML file: the table (every setting) and the figures embedded as SVG data URIs, so
it opens offline, from any folder, with no server, no script and no other file."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from metarun.figures.output import RenderedFigure

_SECTIONS = (("results", "Results"), ("adaptation", "Metric against adaptation step"),
             ("learning_curves", "Learning curves"))
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; }
th.text { text-align: left; }
td.text { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; width: 480px; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #444; margin-top: 0.4em; }
.notes { color: #8a5a00; font-size: 13px; }
"""


def build_page(title: str, headers: Sequence[str], cells: Sequence[Sequence[str]], figures: Sequence[RenderedFigure],
               notes: Sequence[str] = (), text_columns: Sequence[str] = ("setting", "source")) -> str:
    """`cells`: the table's rows as the md/csv table prints them (same numbers, same order)."""
    text = {i for i, h in enumerate(headers) if h in text_columns}
    head = "".join(f'<th class="text">{html.escape(h)}</th>' if i in text else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(f'<td class="text">{html.escape(c)}</td>' if i in text else
                                      f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                     for row in cells)
    parts = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">",
             f"<title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style>\n</head>\n<body>", f"<h1>{html.escape(title)}</h1>",
             "<p>Mean over seeds; seed std: spread across seeds; mean 95% CI: the mean of the runs' task-pool CIs. "
             "Accuracy in %.</p>", f"<table>\n<tr>{head}</tr>\n{body}\n</table>"]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for kind, heading in _SECTIONS:
        chosen = [f for f in figures if f.kind == kind]
        if chosen:
            shown = "\n".join(map(_figure, chosen))
            parts.append(f"<h2>{heading}</h2>\n<div class=\"figures\">\n{shown}\n</div>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def _figure(figure: RenderedFigure) -> str:
    data = base64.b64encode(figure.svg).decode("ascii")
    return (f'<figure id="{figure.stem}"><img src="data:image/svg+xml;base64,{data}" '
            f'alt="{html.escape(figure.caption)}">\n<figcaption>{html.escape(figure.caption)} '
            f"<br>(<code>{figure.stem}.svg</code>)</figcaption></figure>")
