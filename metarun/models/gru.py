"""GRU over a sequence of per-step inputs: the recurrent policy body of RL^2 (Duan et al. 2016).

One nn.GRU serves both paths: the whole trial at once (batch_first, cuDNN on CUDA) for the learner's
forward, and one step at a time with the hidden state as memory for rollouts. Same weights, same kernel,
so the two agree to rounding (tests/test_sequence_models.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metarun.defaults import option_defaults
from metarun.models.base import SequenceBackbone

_DEFAULTS = option_defaults("model", "gru")


class GRU(nn.Module, SequenceBackbone):
    """input_shape (L, F): x [B, L, F] -> hidden states [B, L, hidden] (causal by construction)."""

    def __init__(self, input_shape: Sequence[int], hidden: int = _DEFAULTS["hidden"],
                 layers: int = _DEFAULTS["layers"]) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 2:
            raise ValueError(f"model=gru takes sequence inputs (length, features), got shape {shape}")
        if hidden < 1 or layers < 1:
            raise ValueError(f"model.hidden and model.layers must be >= 1 (got {hidden}, {layers})")
        self.length, features = shape
        self.layers = layers
        self.gru = nn.GRU(features, hidden, num_layers=layers, batch_first=True)
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.gru(x)[0]

    def initial_memory(self, batch_size: int) -> Tensor:
        """The hidden state at a trial's start: zeros [layers, B, hidden]."""
        weight = self.gru.weight_hh_l0
        return torch.zeros(self.layers, batch_size, self.out_features, dtype=weight.dtype, device=weight.device)

    def step(self, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        out, memory = self.gru(x.unsqueeze(1), memory)
        return out.squeeze(1), memory
