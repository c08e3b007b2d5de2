"""Pictures for TensorBoard: matplotlib figures when it is installed (`pip install metarun[plot]`), else
small Pillow rasters.

Every picture is a uint8 tensor [3, H, W], whichever way it was drawn, so the loggers take one type.
A matplotlib figure becomes that tensor the way `SummaryWriter.add_figure` converts one (an Agg canvas,
its RGBA buffer, the RGB channels), but through the object-oriented Figure + FigureCanvasAgg API: no
pyplot, so no global figure registry to leak into and no backend to select. The one global touched is
rcParams, set to matplotlib's defaults (plus STYLE) while a picture is drawn (see `render`). matplotlib is imported
only inside `render`, never on the training path; without it the pictures fall back to Pillow without
a word, since pictures are a by-product of validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Color = tuple[int, int, int]

# Figures are drawn at this resolution: 6.4 x 4.0 in at 100 dpi is 640 x 400 px, about the size of an
# expanded TensorBoard image card, with matplotlib's default 10 pt text still legible at 1:1.
DPI = 100
FIGSIZE = (6.4, 4.0)
# TensorBoard's cards show an image at about half its size until "Show actual image size" is ticked:
# text a little above matplotlib's 10 pt default stays legible in both views.
STYLE = {"font.size": 12, "axes.titlesize": 12, "legend.fontsize": 11}


def render(draw: Callable[[Figure], object], figsize: tuple[float, float] = FIGSIZE) -> torch.Tensor | None:
    """`draw` on a fresh Figure, rendered to a uint8 [3, H, W] RGB tensor; None when matplotlib cannot be
    imported (the caller paints its Pillow fallback).

    The pixels come out as add_figure's figure_to_image makes them: an Agg canvas, drawn, its RGBA
    buffer less alpha. Drawing happens under matplotlib's default style plus STYLE, so a picture looks
    the same whatever else the process set in rcParams (the report's paper style, a user's matplotlibrc)."""
    try:
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    with matplotlib.style.context(["default", STYLE]):
        figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
        canvas = FigureCanvasAgg(figure)
        draw(figure)
        canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # [H, W, 4] uint8, a view of the canvas's buffer
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()


def _rgb(color: Color) -> tuple[float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255)


def sine_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(amplitude A, phase phi) when the points lie on y = A sin(x - phi) (up to float error), else None.

    A batch does not carry its task's parameters, but noise-free sine points determine them: y is
    linear in (sin x, cos x), so a least-squares fit recovers them, and a residual says when the task
    is not a sine (another 1-D regression) and the title must not claim one."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.size < 3 or x.size != y.size or not np.all(np.isfinite(y)):
        return None
    basis = np.stack([np.sin(x), np.cos(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, y, rcond=None)
    if np.max(np.abs(basis @ np.array([a, b]) - y)) > 1e-4 * max(1.0, float(np.max(np.abs(y)))):
        return None
    # A sin(x - phi) = A cos(phi) sin x - A sin(phi) cos x
    return float(np.hypot(a, b)), float(np.arctan2(-b, a))


def curve_plot(
    x: np.ndarray,
    curves: dict[str, tuple[np.ndarray, Color]],
    points: dict[str, tuple[np.ndarray, np.ndarray, Color]],
    title: str = "",
    truth: tuple[float, float] | None = None,
    size: tuple[int, int] = (360, 240),
) -> torch.Tensor:
    """Lines (`curves`: label -> (y over x, colour)) and dots (`points`: label -> (x, y, colour)) as a
    uint8 [3, H, W] picture: a matplotlib figure with axes and a legend outside the data, or without
    matplotlib a `size` Pillow raster. `truth` (amplitude, phase) adds the true sine, dashed."""

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        if truth is not None:
            amplitude, phase = truth
            ax.plot(x, amplitude * np.sin(np.asarray(x) - phase), color="0.6", linestyle="--", linewidth=1.5,
                    label="true function", zorder=1)
        for label, (y, color) in curves.items():
            ax.plot(x, y, color=_rgb(color), linewidth=2, label=label, zorder=2)
        for label, (px, py, color) in points.items():
            ax.scatter(px, py, color=_rgb(color), s=28, edgecolors="white", linewidths=0.6, label=label, zorder=3)
        ax.axhline(0.0, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xlim(float(np.min(x)), float(np.max(x)))
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.grid(True, color="0.92")
        if title:
            ax.set_title(title)
        # beside the axes, not inside them: nothing the model draws can end up under the legend
        figure.legend(loc="outside right upper", frameon=False)

    picture = render(draw)
    return picture if picture is not None else pillow_curve_plot(x, curves, points, size)


def pillow_curve_plot(
    x: np.ndarray,
    curves: dict[str, tuple[np.ndarray, Color]],
    points: dict[str, tuple[np.ndarray, np.ndarray, Color]],
    size: tuple[int, int] = (360, 240),
) -> torch.Tensor:
    """The fallback without matplotlib: lines and dots with a coloured legend, no axes; uint8 [3, H, W]."""
    width, height = size
    margin = 10
    ys = [y for y, _ in curves.values()] + [py for _, py, _ in points.values()]
    finite = np.concatenate([np.asarray(y, dtype=np.float64).ravel() for y in ys])
    finite = finite[np.isfinite(finite)]
    y_low, y_high = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if y_high - y_low < 1e-6:
        y_low, y_high = y_low - 1, y_high + 1
    x_low, x_high = float(np.min(x)), float(np.max(x))

    def to_pixel(px: np.ndarray, py: np.ndarray) -> list[tuple[float, float]]:
        u = margin + (np.asarray(px) - x_low) / max(x_high - x_low, 1e-9) * (width - 2 * margin)
        v = height - margin - (np.clip(py, y_low, y_high) - y_low) / (y_high - y_low) * (height - 2 * margin)
        return list(zip(u.tolist(), v.tolist()))

    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if y_low < 0 < y_high:  # the x axis
        draw.line(to_pixel(np.array([x_low, x_high]), np.array([0.0, 0.0])), fill=(200, 200, 200))
    for label, (y, color) in curves.items():
        draw.line(to_pixel(x, np.asarray(y)), fill=color, width=2)
    for label, (px, py, color) in points.items():
        for u, v in to_pixel(np.asarray(px), np.asarray(py)):
            draw.ellipse((u - 3, v - 3, u + 3, v + 3), fill=color)
    legend = [(label, color) for label, (_, color) in curves.items()] + [(l, c) for l, (_, _, c) in points.items()]
    for row, (label, color) in enumerate(legend):
        draw.text((margin + 4, margin + 12 * row), label, fill=color)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def path_plot(
    paths: dict[str, tuple[np.ndarray, Color]],
    goal: np.ndarray,
    title: str = "",
    limit: float = 0.6,
    size: tuple[int, int] = (300, 300),
) -> torch.Tensor:
    """2-D paths (`paths`: label -> ([L, 2] positions, NaN where the path has ended; colour)) from the origin
    and a goal, on the square [-limit, limit]^2 (MAML for RL's navigation figure, Finn et al. 2017 Fig. 4):
    uint8 [3, H, W], matplotlib when installed, else a `size` Pillow raster with a coloured legend."""

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        for label, (xy, color) in paths.items():
            ax.plot(xy[:, 0], xy[:, 1], color=_rgb(color), linewidth=2, label=label)
        ax.scatter([0.0], [0.0], color="0.3", s=30, marker="o", label="start", zorder=3)
        ax.scatter([goal[0]], [goal[1]], color=_rgb((220, 40, 40)), s=120, marker="*", label="goal", zorder=3)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.grid(True, color="0.92")
        if title:
            ax.set_title(title)
        figure.legend(loc="outside right upper", frameon=False)

    picture = render(draw, figsize=(6.4, 4.4))
    if picture is not None:
        return picture
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    canvas = ImageDraw.Draw(image)

    def to_pixel(xy: np.ndarray) -> list[tuple[float, float]]:
        u = (xy[:, 0] + limit) / (2 * limit) * width
        v = height - (xy[:, 1] + limit) / (2 * limit) * height
        return list(zip(u.tolist(), v.tolist()))

    for label, (xy, color) in paths.items():
        points = to_pixel(xy[np.isfinite(xy).all(-1)])
        if len(points) > 1:
            canvas.line(points, fill=color, width=2)
    gu, gv = to_pixel(np.asarray(goal, dtype=np.float64).reshape(1, 2))[0]
    canvas.ellipse((gu - 4, gv - 4, gu + 4, gv + 4), fill=(220, 40, 40))
    for row, (label, (_, color)) in enumerate(paths.items()):
        canvas.text((6, 6 + 12 * row), label, fill=color)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
