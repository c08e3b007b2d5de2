"""Attention matrices as pictures for TensorBoard: uint8 RGB tensors [3, H, W] (see metarun.plotting).

With matplotlib installed, `attention_map` draws a figure: imshow in viridis with a colour bar of the
actual weights, axis labels, class boundaries as lines and ticks at the classes. Without it, `heatmap`
paints the matrix with plain torch: the colour map is a piecewise-linear approximation of viridis
through nine of its colours (perceptually ordered, readable in greyscale, the same on every machine),
class boundaries are 1-pixel white lines, and there are no axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from metarun.plotting import render

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# viridis sampled at 0, 1/8, ..., 1 (the nine colours of R's `viridis(9)`)
_VIRIDIS_HEX = ("440154", "472D7B", "3B528B", "2C728E", "21908C", "27AD81", "5DC863", "AADC32", "FDE725")
_VIRIDIS = torch.tensor([[int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)] for h in _VIRIDIS_HEX])
_SEPARATOR = 1.0  # white lines between groups (classes) of rows or columns

# Images stay below this many pixels on their long side: cells shrink for big matrices, never below 1 px.
MAX_SIDE = 512
MAX_CELL = 32
# attention figures: a little taller than the curve plots, for matrices with many query rows
FIGSIZE = (6.4, 4.8)


def colormap(values: Tensor) -> Tensor:
    """[H, W] values in [0, 1] -> [3, H, W] viridis colours (values outside are clamped)."""
    stops = _VIRIDIS.to(values.device)
    position = values.clamp(0, 1) * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)
    frac = (position - low).unsqueeze(-1)
    rgb = stops[low] * (1 - frac) + stops[low + 1] * frac  # [H, W, 3]
    return rgb.permute(2, 0, 1).contiguous()


def heatmap(matrix: Tensor, row_breaks: Sequence[int] = (), col_breaks: Sequence[int] = (),
            cell: int | None = None) -> Tensor:
    """[R, C] non-negative matrix (attention weights) -> uint8 [3, H, W] raster, the fallback without matplotlib.

    Values are divided by the matrix's maximum, so weak but structured attention is still visible
    (a softmax row over many keys rarely gets near 1); the picture shows where attention goes, not
    its absolute level. Each entry becomes a `cell` x `cell` square, or by default a rectangle as tall
    and as wide as fits in MAX_SIDE pixels per side (so 75 queries x 5 support examples still gives a
    readable picture); `row_breaks`/`col_breaks` are indices before which a 1-pixel white line is
    drawn, to mark class blocks.
    """
    if matrix.dim() != 2:
        raise ValueError(f"heatmap takes a 2-D matrix (got shape {tuple(matrix.shape)})")
    values = matrix.detach().to(device="cpu", dtype=torch.float32)
    rows, cols = values.shape
    top = values.max()
    values = values / top if top > 0 else torch.zeros_like(values)
    height = cell if cell is not None else max(1, min(MAX_CELL, MAX_SIDE // max(rows, 1)))
    width = cell if cell is not None else max(1, min(MAX_CELL, MAX_SIDE // max(cols, 1)))
    image = colormap(values).repeat_interleave(height, dim=1).repeat_interleave(width, dim=2)
    image = _insert_lines(image, sorted(set(row_breaks)), height, dim=1)
    image = _insert_lines(image, sorted(set(col_breaks)), width, dim=2)
    return (image * 255).round().to(torch.uint8)


def attention_map(matrix: Tensor, *, title: str, row_label: str, col_label: str,
                  row_names: Sequence[str] | None = None, col_names: Sequence[str] | None = None,
                  row_breaks: Sequence[int] = (), col_breaks: Sequence[int] = (),
                  annotate: bool = False) -> Tensor:
    """[R, C] attention weights -> uint8 [3, H, W]: a matplotlib figure, or `heatmap` without matplotlib.

    The colour bar shows the weights themselves (0 to the matrix's maximum), so the picture tells
    both where attention goes and how peaked it is. `row_breaks`/`col_breaks` are the indices where a
    new class starts: a white line is drawn there and each class gets one tick, named by its first
    entry in `row_names`/`col_names`; without breaks, up to 25 entries are ticked one by one by name.
    `annotate` writes each weight in its cell, for small matrices (FEAT's N x N prototypes).
    """
    if matrix.dim() != 2:
        raise ValueError(f"attention_map takes a 2-D matrix (got shape {tuple(matrix.shape)})")
    values = matrix.detach().to(device="cpu", dtype=torch.float32).numpy()
    rows, cols = values.shape
    top = float(values.max()) if values.size and float(values.max()) > 0 else 1.0

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
        figure.colorbar(image, ax=ax, label="attention weight")
        for b in sorted(set(row_breaks)):
            if 0 < b < rows:
                ax.axhline(b - 0.5, color="white", linewidth=1.5)
        for b in sorted(set(col_breaks)):
            if 0 < b < cols:
                ax.axvline(b - 0.5, color="white", linewidth=1.5)
        ax.set_yticks(*_ticks(rows, row_names, row_breaks))
        ax.set_xticks(*_ticks(cols, col_names, col_breaks))
        if annotate:
            for (r, c), value in np.ndenumerate(values):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=10,
                        color="black" if value > 0.6 * top else "white")
        ax.set_xlabel(col_label)
        ax.set_ylabel(row_label)
        ax.set_title(title)

    picture = render(draw, FIGSIZE)
    return picture if picture is not None else heatmap(matrix, row_breaks, col_breaks)


def _ticks(count: int, names: Sequence[str] | None, breaks: Sequence[int]) -> tuple[list[float], list[str]]:
    """Tick positions and labels along one side: one per class block when there are breaks, else one per
    entry (up to 25), else about ten evenly spaced."""
    labels = list(names) if names is not None else [str(i) for i in range(count)]
    edges = [b for b in sorted(set(breaks)) if 0 < b < count]
    if edges:
        starts, stops = [0, *edges], [*edges, count]
        return [(start + stop - 1) / 2 for start, stop in zip(starts, stops)], [labels[s] for s in starts]
    step = 1 if count <= 25 else -(-count // 10)
    positions = list(range(0, count, step))
    return [float(p) for p in positions], [labels[p] for p in positions]


def _insert_lines(image: Tensor, breaks: Sequence[int], size: int, dim: int) -> Tensor:
    """Insert a white 1-pixel line before cell index b for each b in `breaks` (0 < b < cells)."""
    cells = image.shape[dim] // size
    parts, start = [], 0
    for b in breaks:
        if 0 < b < cells:
            parts.append(image.narrow(dim, start * size, (b - start) * size))
            line_shape = list(image.shape)
            line_shape[dim] = 1
            parts.append(torch.full(line_shape, _SEPARATOR))
            start = b
    parts.append(image.narrow(dim, start * size, (cells - start) * size))
    return torch.cat(parts, dim=dim)


def group_breaks(sorted_labels: Tensor) -> list[int]:
    """Indices where a sorted label vector changes value: the class boundaries to draw."""
    labels = sorted_labels.detach().cpu()
    return (torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1).tolist()
