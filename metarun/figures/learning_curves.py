"""One setting's learning curves: training and validation of its metric on shared axes, the mean over
seeds with a band of one standard deviation across seeds, against meta-iterations or wall time."""

from __future__ import annotations

from typing import Any

import numpy as np

from metarun.figures.backend import COLORS, log_axis, new_figure
from metarun.figures.labels import TITLE_WIDTH, metric_label, metric_scale, uses_log_scale, wrap
from metarun.figures.series import SeedBand


def time_unit(seconds: float) -> tuple[float, str]:
    """(divisor, unit) that keeps wall-time ticks short: s, min or h."""
    if seconds < 180:
        return 1.0, "s"
    return (60.0, "min") if seconds < 3 * 3600 else (3600.0, "h")


def draw(title: str, metric: str, train: SeedBand | None, val: SeedBand | None, x: str = "step") -> Any:
    figure = new_figure(2.5)
    axes = figure.add_subplot()
    scale = metric_scale(metric)
    bands = [(name, band, color) for name, band, color in
             (("training", train, COLORS[0]), ("validation", val, COLORS[1])) if band is not None]
    longest = max(float(band.x.max()) for _, band, _ in bands)
    divisor, unit = time_unit(longest) if x == "time" else (1.0, "")
    seeds = {band.seeds for _, band, _ in bands}
    for name, band, color in bands:
        positions, mean, sd = band.x / divisor, band.mean * scale, band.sd * scale
        label = name if len(seeds) == 1 else f"{name} ({band.seeds} seeds)"
        sparse = name == "validation" and len(positions) <= 25  # a dot per validation, a line for training
        axes.plot(positions, mean, color=color, label=label, marker="o" if sparse else None, markersize=2.5)
        if band.seeds > 1:
            axes.fill_between(positions, mean - sd, mean + sd, color=color, alpha=0.25, linewidth=0)
    values = np.concatenate([band.mean for _, band, _ in bands]) * scale
    if uses_log_scale(values.tolist(), metric):
        log_axis(axes)
    axes.set_xlabel("meta-iteration (outer step)" if x == "step" else f"wall time ({unit})")
    axes.set_ylabel(metric_label(metric))
    axes.set_title(wrap(title, TITLE_WIDTH), fontsize=7, loc="left")
    count = max(seeds)
    band_words = f"mean of {count} seeds ± 1 s.d." if count > 1 else "1 seed (no band)"
    axes.legend(title=band_words, loc="best")
    return figure
