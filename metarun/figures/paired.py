"""`metarun compare --plot`: the per-task differences (run - baseline, same tasks) as a histogram, with
their mean and its 95% CI marked and zero (no difference) for reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from metarun.compare import PairedDifference
from metarun.figures.backend import COLORS, new_figure
from metarun.figures.labels import TITLE_WIDTH, metric_label, metric_scale, wrap


def bin_edges(values: np.ndarray, low: float, high: float) -> np.ndarray | int:
    """One bin per possible value when the differences lie on a grid (accuracies of 75 queries differ in steps
    of 1/75, up to float32 rounding), else 30 bins over the shown range."""
    spread = high - low
    distinct = np.unique(np.round(values, 3))
    gaps = np.diff(distinct)
    gaps = gaps[gaps > 1e-3 * spread] if spread > 0 else gaps
    if len(gaps):
        rough = float(gaps.min())
        extent = float(values.max() - values.min())
        step = extent / max(1.0, round(extent / rough))  # refined over the whole range, not the rounded gaps
        on_grid = np.abs(values / step - np.round(values / step)).max() < 0.05
        if on_grid and spread / step <= 100:
            first, last = round(low / step), round(high / step)  # the grid points at the range's ends
            return (np.arange(first, last + 2) - 0.5) * step  # bins centred on first..last
    return 30


def shown_range(values: np.ndarray, mean: float, ci: float) -> tuple[float, float]:
    """The x range: all tasks, unless a few outliers would squeeze the rest into one bin (MSE differences);
    then the central 99% of tasks (the legend counts the tasks outside), always with 0 and the CI in view."""
    low, high = float(values.min()), float(values.max())
    inner_low, inner_high = (float(q) for q in np.quantile(values, [0.005, 0.995]))
    if high - low > 4 * (inner_high - inner_low) > 0:
        margin = 0.1 * (inner_high - inner_low)
        low, high = inner_low - margin, inner_high + margin
    return min(low, 0.0, mean - ci), max(high, 0.0, mean + ci)


def draw(title: str, differences: list[float], summary: PairedDifference) -> Any:
    scale = metric_scale(summary.metric)
    values = np.asarray(differences, dtype=float) * scale
    mean, ci = scale * summary.difference, scale * summary.ci95
    low, high = shown_range(values, mean, ci)
    shown = values[(values >= low) & (values <= high)]
    outside = len(values) - len(shown)
    figure = new_figure(2.5)
    axes = figure.add_subplot()
    counts, _, _ = axes.hist(shown, bins=bin_edges(shown, low, high), color=COLORS[0], alpha=0.75,
                             label=f"{summary.tasks} tasks" + (f" ({outside} outside the axes)" if outside else ""))
    digits = 2 if scale == 100.0 else 4
    headroom = 1.7  # the legend sits above the bars; the lines stop below it
    top = 1.1 / headroom
    axes.axvspan(mean - ci, mean + ci, ymax=top, color=COLORS[3], alpha=0.3, linewidth=0)
    axes.axvline(mean, ymax=top, color=COLORS[3], linewidth=1.2,
                 label=f"mean {mean:+.{digits}f} ± {ci:.{digits}f} (95% CI)")
    axes.axvline(0.0, ymax=top, color="black", linewidth=0.8, linestyle="--", label="no difference")
    axes.set_ylim(0, headroom * max(counts.max(), 1))
    name = "accuracy" if scale == 100.0 else metric_label(summary.metric)
    unit = " (% points)" if scale == 100.0 else ""
    axes.set_xlabel(f"per-task {name}, run − baseline{unit}")
    axes.set_ylabel("tasks")
    axes.set_title(wrap(title, TITLE_WIDTH), fontsize=7, loc="left")
    axes.legend(title=f"{summary.verdict}; wins: run {summary.run_better}, baseline {summary.baseline_better}",
                loc="upper left", alignment="left")
    return figure
