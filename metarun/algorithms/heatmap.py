"""Attention matrices as RGB images for TensorBoard, drawn with plain torch.

matplotlib is not a dependency (and not installable on the machines this runs on), so the colour map
is a piecewise-linear approximation of viridis through nine of its colours: perceptually ordered,
readable in greyscale, the same on every machine. An image is a float tensor [3, H, W] in [0, 1], the
layout `SummaryWriter.add_image` takes by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# viridis sampled at 0, 1/8, ..., 1 (the nine colours of R's `viridis(9)`)
_VIRIDIS_HEX = ("440154", "472D7B", "3B528B", "2C728E", "21908C", "27AD81", "5DC863", "AADC32", "FDE725")
_VIRIDIS = torch.tensor([[int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)] for h in _VIRIDIS_HEX])
_SEPARATOR = 1.0  # white lines between groups (classes) of rows or columns

# Images stay below this many pixels on their long side: cells shrink for big matrices, never below 1 px.
MAX_SIDE = 512
MAX_CELL = 32


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
    """[R, C] non-negative matrix (attention weights) -> [3, H, W] image in [0, 1].

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
    return _insert_lines(image, sorted(set(col_breaks)), width, dim=2)


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
