"""Fully connected backbone (the MAML paper's sine network is MLP 40-40 plus a linear head)."""

from __future__ import annotations

from collections.abc import Sequence
import math

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Flattens the input and applies Linear+ReLU layers; `out_features` tells the algorithm the feature size."""

    accepts = frozenset({"vector", "image"})

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (40, 40)) -> None:
        super().__init__()
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"model.hidden must list positive layer widths (got {list(hidden)})")
        in_features = math.prod(int(s) for s in input_shape)
        layers: list[nn.Module] = [nn.Flatten(start_dim=-len(input_shape))] if len(input_shape) > 1 else []
        for width in hidden:
            layers += [nn.Linear(in_features, int(width)), nn.ReLU()]
            in_features = int(width)
        self.layers = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
