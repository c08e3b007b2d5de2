"""Gradient-based learners (MAML family): the test metric after each adaptation step, `metric@0..k`, one
line per setting with the 95% CI of each step, and the preset's figure at its step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metarun.figures.backend import COLORS, PAPER_MARKER, REFERENCE_MARKER, log_axis, new_figure
from metarun.figures.labels import metric_label, metric_scale, uses_log_scale, wrap


@dataclass(frozen=True)
class StepLine:
    label: str
    steps: list[int]
    means: list[float]
    ci95s: list[float]
    figure_kind: str | None = None  # "paper" | "reference": the preset's figure is of `metric@figure_step`
    figure_step: int | None = None
    figure_mean: float | None = None
    figure_ci95: float | None = None


def draw(metric: str, lines: list[StepLine], split: str = "test") -> Any:
    scale = metric_scale(metric)
    figure = new_figure(2.5 + 0.12 * max(0, len(lines) - 2))
    axes = figure.add_subplot()
    for index, line in enumerate(lines):
        axes.errorbar(line.steps, [scale * m for m in line.means], yerr=[scale * c for c in line.ci95s],
                      color=COLORS[index % len(COLORS)], marker="o", markersize=3, capsize=2, elinewidth=0.8,
                      label=wrap(line.label, 40))
    for kind, style, name in (("paper", PAPER_MARKER, "paper (published)"),
                              ("reference", REFERENCE_MARKER, "ours (reference)")):
        marked = [line for line in lines if line.figure_kind == kind and line.figure_step is not None]
        if marked:
            axes.errorbar([line.figure_step for line in marked], [scale * (line.figure_mean or 0) for line in marked],
                          yerr=[scale * (line.figure_ci95 or 0) for line in marked], linestyle="none",
                          elinewidth=0.8, capsize=2, label=name, zorder=3, **style)
    values = [scale * m for line in lines for m in line.means]
    if uses_log_scale(values, metric):
        log_axis(axes)
    last = max(max(line.steps) for line in lines)
    axes.set_xticks(range(0, last + 1, max(1, (last + 9) // 10)))
    axes.set_xlabel("adaptation steps at test time")
    axes.set_ylabel(f"{split} {metric_label(metric)}")
    axes.legend(title="mean over seeds, 95% CI", loc="best")
    return figure
