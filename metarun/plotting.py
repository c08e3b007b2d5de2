"""Small raster plots for TensorBoard images, drawn with Pillow (already a dependency; no matplotlib)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

Color = tuple[int, int, int]


def curve_plot(
    x: np.ndarray,
    curves: dict[str, tuple[np.ndarray, Color]],
    points: dict[str, tuple[np.ndarray, np.ndarray, Color]],
    size: tuple[int, int] = (360, 240),
) -> torch.Tensor:
    """Lines (`curves`: label -> (y over x, colour)) and dots (`points`: label -> (x, y, colour)) with a
    legend; returns a [3, H, W] float tensor in [0, 1] for SummaryWriter.add_image."""
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
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
