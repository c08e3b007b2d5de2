"""The overview of one metric: a bar per setting (mean over seeds) with its 95% CI, and the preset's
figure as a marker, a filled diamond for a published one and an open circle for our own reference."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from metarun.figures.backend import COLORS, PAPER_MARKER, REFERENCE_MARKER, new_figure
from metarun.figures.labels import metric_label, metric_scale, wrap


@dataclass(frozen=True)
class Bar:
    label: str
    mean: float
    ci95: float
    figure_kind: str | None = None  # "paper" | "reference" | None
    figure_mean: float | None = None
    figure_ci95: float | None = None


def value_axis_start(metric: str, low: float, high: float) -> float:
    """Where the bars start. Errors start at 0; accuracies far from 0 start at a round value below the lowest
    interval, so that a point of difference is visible (the ticks say where the axis starts)."""
    if metric.split("@")[0] != "accuracy" or low <= 20:
        return 0.0
    span = max(high - low, 0.5)
    step = 10 ** math.floor(math.log10(span))
    return max(0.0, math.floor((low - 0.3 * span) / step) * step)


def draw(metric: str, bars: list[Bar], split: str = "test") -> Any:
    scale = metric_scale(metric)
    labels = [wrap(b.label, 24) for b in bars]
    lines = sum(label.count("\n") + 1 for label in labels)
    figure = new_figure(max(1.5, 0.9 + 0.2 * lines + 0.12 * len(bars)))
    axes = figure.add_subplot()
    lows = [scale * (b.mean - b.ci95) for b in bars] + \
        [scale * (b.figure_mean - (b.figure_ci95 or 0)) for b in bars if b.figure_mean is not None]
    highs = [scale * (b.mean + b.ci95) for b in bars] + \
        [scale * (b.figure_mean + (b.figure_ci95 or 0)) for b in bars if b.figure_mean is not None]
    lows, highs = [v for v in lows if math.isfinite(v)] or [0.0], [v for v in highs if math.isfinite(v)] or [1.0]
    start = value_axis_start(metric, min(lows), max(highs))
    rows = list(range(len(bars)))
    axes.barh(rows, [scale * b.mean - start for b in bars], left=start, height=0.6, color=COLORS[0], alpha=0.85,
              xerr=[scale * b.ci95 for b in bars], error_kw={"elinewidth": 0.9, "capsize": 2.5, "ecolor": "black"},
              label="ours: mean over seeds, 95% CI")
    span = max(max(highs) - start, 1e-9)
    digits = 2 if scale == 100.0 else 3
    width = 1.28 * span  # the axis, start to end (set below)
    for row, bar in zip(rows, bars):  # our value: inside the bar, or right of everything when the bar is short
        text = f"{scale * bar.mean:.{digits}f}" if math.isfinite(bar.mean) else "not finite"
        if math.isfinite(bar.mean) and scale * bar.mean - start >= 0.18 * width:
            axes.text(start + 0.02 * width, row, text, va="center", ha="left", fontsize=6.5, color="white")
        else:
            ends = [bar.mean + bar.ci95, (bar.figure_mean or 0.0) + (bar.figure_ci95 or 0.0)]
            right = max([e for e in ends if math.isfinite(e)] or [start / scale])
            axes.text(scale * right + 0.03 * span, row, text, va="center", ha="left", fontsize=6.5)
    for kind, style, name in (("paper", PAPER_MARKER, "paper (published)"),
                              ("reference", REFERENCE_MARKER, "ours (reference)")):
        marked = [(row, b) for row, b in zip(rows, bars) if b.figure_kind == kind and b.figure_mean is not None]
        if marked:
            axes.errorbar([scale * b.figure_mean for _, b in marked], [row for row, _ in marked],
                          xerr=[scale * (b.figure_ci95 or 0.0) for _, b in marked], linestyle="none",
                          elinewidth=0.8, capsize=2, label=name, zorder=3, **style)
    axes.set_yticks(rows, labels)
    axes.invert_yaxis()  # the table's order, top to bottom
    axes.set_xlim(start, start + width)
    axes.grid(axis="y", visible=False)
    axes.set_xlabel(f"{split} {metric_label(metric)}")
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=1, borderaxespad=0.2)
    return figure
