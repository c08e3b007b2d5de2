"""matplotlib, loaded only when a figure is asked for: the Agg backend (files, no display, no server) and
one style sized for a paper column. Missing, it is one line naming the extra to install."""

from __future__ import annotations

from typing import Any

from metarun.errors import UserInputError

COLUMN_WIDTH_IN = 3.3  # one column of a two-column paper (NeurIPS/ICML/CVPR: 3.25-3.5 in)
DPI = 200  # PNG resolution: 660 px across a column, sharp when printed
INSTALL_HINT = 'figures need matplotlib: pip install ".[plot]" (or pip install "metarun[plot]")'

# 8-9 pt text at the printed size; vector text in SVG (editable, searchable); no date in the files, so the
# same runs give the same bytes.
PAPER_STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "svg.fonttype": "none",
    "svg.hashsalt": "metarun",
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
}


def load_matplotlib() -> None:
    """Import matplotlib with the Agg backend and the paper style, or stop with the install line (exit 2)."""
    try:
        import matplotlib
    except ImportError:
        # print_error escapes rich markup, so `[plot]` is printed as written
        raise UserInputError(INSTALL_HINT) from None
    matplotlib.use("Agg", force=True)
    matplotlib.rcParams.update(PAPER_STYLE)


def new_figure(height_in: float) -> Any:
    """An empty column-wide figure; constrained layout keeps labels inside without changing its size."""
    from matplotlib.figure import Figure

    return Figure(figsize=(COLUMN_WIDTH_IN, height_in), layout="constrained")


# Okabe-Ito: distinguishable with the common colour-vision deficiencies and in greyscale print.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
PAPER_MARKER = {"marker": "D", "color": "black", "markersize": 4.5}  # a published figure
REFERENCE_MARKER = {"marker": "o", "color": "#D55E00", "markerfacecolor": "white", "markersize": 5}  # ours


def log_axis(axes: Any) -> None:
    """A log y axis with plain tick labels (0.2, 0.5, 1, 2), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
