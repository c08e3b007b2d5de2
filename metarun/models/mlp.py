"""Fully connected backbone (the MAML paper's sine network is MLP 40-40 plus a linear head)."""

from __future__ import annotations

from collections.abc import Sequence
import math

import torch
from torch import Tensor, nn

from metarun.defaults import option_defaults
from metarun.models import per_task
from metarun.models.base import Backbone

_DEFAULTS = option_defaults("model", "mlp")


class MLP(nn.Module, Backbone):
    """Flattens the input and applies Linear+ReLU layers; `out_features` tells the algorithm the feature size."""


    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = _DEFAULTS["hidden"]) -> None:
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

    def forward_per_task(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """`forward` for T tasks at once: x [T, N, *input_shape], params[name] [T, *shape] (see per_task.py)."""
        h = x
        for index, layer in enumerate(self.layers):
            if isinstance(layer, nn.Linear):
                h = per_task.linear(h, params[f"layers.{index}.weight"], params.get(f"layers.{index}.bias"))
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            else:  # the Flatten of image inputs, shifted by the task dimension
                h = h.flatten(start_dim=2)
        return h
