"""Conv-4: the four-block convolutional backbone of few-shot image classification.

Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016, introduced it: four blocks
of [3x3 conv with 64 filters, BatchNorm, ReLU, 2x2 max-pool]. Finn, Abbeel and Levine, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017, use it for MAML with two changes
that are options here: 32 filters on miniImageNet (`filters: 32`, against overfitting), and on
Omniglot stride-2 convolutions instead of max-pooling (`stride: 2`). Their BatchNorm normalises every
forward pass with the statistics of the batch it is given, test time included: the support set when
adapting, the query set when scoring (`bn: transductive`; Bronskill et al., "TaskNorm: Rethinking Batch
Normalization for Meta-Learning", ICML 2020, compare the options). `bn: inductive` is the usual
alternative (batch statistics in training, running statistics at test time); `bn: none` drops the
normalisation. The mode is explicit because it changes results.

Why BatchNorm is written out with tensor ops instead of calling torch's `batch_norm` (algorithms run the
backbone under torch.func.vmap over tasks and differentiate it twice):

* Second-order meta-gradients through the native kernel are wrong when torch.func.grad runs inside vmap
  (pytorch/functorch#534; measured on torch 2.13 in float64: 3e-3 relative error with one inner step;
  tests/test_cnn.py pins it), while the same normalisation written as var_mean, rsqrt and addcmul
  matches the per-task reference to ~1e-15. MAML now vmaps only forward passes, which the bug does not
  reach, but Meta-SGD and user algorithms may still nest grad in vmap: the layer stays exact for both.
* It is written as x * scale + shift with one var_mean (the form torch's own CPU kernel uses) rather
  than (x - mean) / std: fewer full-size temporaries, which matters because under vmap one activation
  holds every task's images (460 MB for the first max-pool block at meta-batch 32, 75 queries);
  measured peak RSS of a second-order meta-iteration fell from ~8 GB to ~6.5-7 GB there.
* The native layer updates its running statistics in place; under vmap the per-task statistics are
  batched tensors and the buffer is not, so the update fails. Here the forward pass is pure (it never
  writes a buffer) and `update_running_stats` runs outside vmap (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from metarun.defaults import option_defaults
from metarun.models.base import Backbone

BatchNormMode = Literal["transductive", "inductive", "none"]
BN_MODES: tuple[str, ...] = ("transductive", "inductive", "none")
BLOCKS = 4
UPDATE_CHUNK = 8  # tasks per no-grad pass of update_running_stats


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of one task's [N, C, H, W] batch over N, H and W."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


_DEFAULTS = option_defaults("model", "cnn")


class TaskBatchNorm(nn.Module):
    """BatchNorm2d for one task's batch, written with differentiable tensor ops (module docstring).

    The affine weight and bias are ordinary parameters, so MAML adapts them like any other.
    Inductive mode keeps running statistics as buffers, read (never written) by `forward` in eval mode.
    """

    def __init__(self, channels: int, mode: BatchNormMode, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.mode, self.momentum, self.eps = mode, momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if mode == "inductive":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "inductive" and not self.training:
            return self.normalise(x, self.running_mean, self.running_var)
        return self.normalise(x, *batch_moments(x))

    def normalise(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return torch.addcmul(shift[:, None, None], x, scale[:, None, None])

    @torch.no_grad()
    def update(self, mean: Tensor, var: Tensor) -> None:
        """Exponential moving average, as nn.BatchNorm2d does (`var` already unbiased)."""
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var, self.momentum)


class ConvBlock(nn.Module):
    """3x3 conv, BatchNorm, ReLU, then a 2x2 max-pool (stride 1) or nothing (stride 2 halves the map)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bn: BatchNormMode, momentum: float) -> None:
        super().__init__()
        # BatchNorm subtracts the per-channel mean, which would cancel a conv bias: only `bn: none` has one.
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bn == "none")
        self.norm = TaskBatchNorm(out_channels, bn, momentum) if bn != "none" else None
        self.pool = stride == 1

    def forward(self, x: Tensor, film: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """`film` (scale [C], shift [C] or None): FiLM after the normalisation, before the ReLU (MMAML's
        task-aware modulation of each convolutional block, Vuorio et al. 2019)."""
        h = self.norm(self.conv(x)) if self.norm is not None else self.conv(x)
        if film is not None:
            scale, shift = film
            h = h * scale[:, None, None] if shift is None else torch.addcmul(shift[:, None, None], h, scale[:, None, None])
        return self.finish(h)

    def finish(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return F.max_pool2d(x, 2) if self.pool else x

    def output_size(self, size: int) -> int:
        # conv (padding 1): size if stride 1, ceil(size / 2) if stride 2; max-pool 2: floor(size / 2)
        return size // 2 if self.pool else (size + 1) // 2


class ConvNet(nn.Module, Backbone):
    """Conv-4 (Vinyals et al. 2016; Finn et al. 2017): [N, C, H, W] images -> [N, out_features] features.

    Features are the flattened last feature map, so `out_features` = filters * h * w depends on the
    input size: 64 for 28x28 with max-pooling, 32 * 5 * 5 = 800 for 84x84 with 32 filters.
    """

    accepts = frozenset({"image"})

    def __init__(
        self,
        input_shape: Sequence[int],
        filters: int = _DEFAULTS["filters"],
        stride: int = _DEFAULTS["stride"],
        bn: BatchNormMode = _DEFAULTS["bn"],
        bn_momentum: float = _DEFAULTS["bn_momentum"],
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model=cnn needs image inputs (C, H, W); got input shape {tuple(input_shape)}")
        if filters < 1:
            raise ValueError(f"model.filters must be positive (got {filters})")
        if stride not in (1, 2):
            raise ValueError(f"model.stride must be 1 (conv + max-pool) or 2 (strided conv, no pool); got {stride}")
        if bn not in BN_MODES:
            raise ValueError(f"model.bn must be one of {', '.join(BN_MODES)} (got {bn!r})")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"model.bn_momentum must be in (0, 1] (got {bn_momentum})")
        channels, height, width = (int(s) for s in input_shape)
        blocks = []
        for i in range(BLOCKS):
            blocks.append(ConvBlock(channels if i == 0 else filters, filters, stride, bn, bn_momentum))
            height, width = blocks[-1].output_size(height), blocks[-1].output_size(width)
        if height < 1 or width < 1:
            raise ValueError(f"model=cnn with max-pooling needs images of at least {2**BLOCKS}x{2**BLOCKS} "
                             f"(got {tuple(input_shape)[1:]}); use model.stride=2")
        self.blocks = nn.Sequential(*blocks)
        self.bn = bn
        self.out_features = filters * height * width

    def forward(self, x: Tensor, modulation: Sequence[tuple[Tensor, Tensor | None]] | None = None) -> Tensor:
        """`modulation`: one (scale, shift) per block, over its channels (MMAML); None: the plain network."""
        if modulation is None:
            return self.blocks(x).flatten(start_dim=-3)
        for block, film in zip(self.blocks, modulation, strict=True):
            x = block(x, film)
        return x.flatten(start_dim=-3)

    def modulated_widths(self) -> list[int]:
        """The channels of each block, which a task-aware modulation (MMAML's FiLM) scales and shifts."""
        return [block.conv.out_channels for block in self.blocks]

    def _layer_moments(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """One task's training-mode forward pass, returning each BatchNorm's (mean, unbiased variance)."""
        moments = []
        for block in self.blocks:
            h = block.conv(x)
            mean, var = batch_moments(h)
            count = h.shape[0] * h.shape[2] * h.shape[3]
            moments.append((mean, var * count / max(count - 1, 1)))
            x = block.finish(block.norm.normalise(h, mean, var))
        return moments

    @torch.no_grad()
    def update_running_stats(self, *image_sets: Tensor) -> None:
        """Inductive mode: move the running statistics towards those of the images (no-op otherwise).

        The trainer calls this once per training step, outside the vmapped meta-loss (which cannot write a
        shared buffer), with the support and the query images of the step's tasks, each [T, N_i, C, H, W]:
        a separate no-grad forward pass with the meta-parameters, whatever the algorithm. A task's sets are
        joined into one batch, normalised with its own statistics as in training, and the running statistics
        move once per step towards the mean over tasks of the per-task statistics (each task a batch, as a
        per-task loop would feed nn.BatchNorm2d). Both sets, because at test time the running statistics
        normalise both (a per-task loop with nn.BatchNorm2d sees the support set in the inner steps and the
        query set in the outer loss); the support sets alone estimate the same statistics more noisily.
        Tasks go through in chunks of UPDATE_CHUNK, so the extra pass never holds more than that many tasks'
        activations; the mean over tasks is the same.

        They are the statistics of the network before adaptation, which the adapted network approximates
        after a few small inner steps (MAML++, Antoniou et al., ICLR 2019, keeps one set per inner step
        instead; not done here).
        """
        if self.bn != "inductive":
            return
        images = image_sets[0] if len(image_sets) == 1 else torch.cat(image_sets, dim=1)
        sums: list[tuple[Tensor, Tensor]] | None = None
        for start in range(0, images.shape[0], UPDATE_CHUNK):
            moments = vmap(self._layer_moments)(images[start:start + UPDATE_CHUNK])
            part = [(mean.sum(dim=0), var.sum(dim=0)) for mean, var in moments]
            sums = part if sums is None else [(m + pm, v + pv) for (m, v), (pm, pv) in zip(sums, part)]
        assert sums is not None
        for block, (mean, var) in zip(self.blocks, sums):
            block.norm.update(mean / images.shape[0], var / images.shape[0])
