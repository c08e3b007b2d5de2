"""ResNet-12: the residual backbone of MetaOptNet and FEAT.

Lee, Maji, Ravichandran and Soatto, "Meta-Learning with Differentiable Convex Optimization", CVPR 2019
(kjunelee/MetaOptNet, models/ResNet12_embedding.py and models/dropblock.py), after TADAM (Oreshkin et al. 2018)
and SNAIL (Mishra et al. 2018); Ye et al., "Few-Shot Learning via Embedding Adaptation with Set-to-Set
Functions" (FEAT), CVPR 2020, use the same network (Sha-Lab/FEAT, model/networks/res12.py). Four residual
blocks of 64, 160, 320 and 640 channels (`channels`), each:

    x -> [3x3 conv, BN, LeakyReLU 0.1] -> [3x3 conv, BN, LeakyReLU 0.1] -> [3x3 conv, BN]
      + [1x1 conv, BN](x) -> LeakyReLU 0.1 -> 2x2 max-pool -> dropout (blocks 1, 2) or DropBlock (blocks 3, 4)

Convolutions have no bias (BatchNorm's shift replaces it; `bn: none` gives them one) and start from Kaiming
normal initialisation (fan_out, leaky_relu gain as the original calls it), BatchNorm from weight 1, bias 0.
Features are the flattened last map, as MetaOptNet (`pool: flatten`, 640 * 5 * 5 = 16000 at 84x84), or its
global average, as FEAT (`pool: avg`, 640).

DropBlock (Ghiasi, Lin and Le, NeurIPS 2018), as MetaOptNet's dropblock.py computes it: block seeds are drawn
with probability gamma = rate / b^2 * (h w) / ((h - b + 1)(w - b + 1)) at the positions where a b x b block
fits, each seed zeroes the b x b block it is the top-left corner of, and the kept units are scaled by
(units / kept units) of the task's batch. Departures: the block is clipped to the feature map (the original's
b = 5 does not fit the 3x3 and 1x1 maps of 28x28 Omniglot images, and its formula divides by zero there);
the rate warms up from 0 over `dropblock_warmup` training steps (`set_progress`, told by the trainer), where
the original anneals the keep probability 1 -> 0.9 linearly over its first 40,000 forward calls (20,000
meta-batches, support and query embedded separately; configs/model/resnet12.yaml). As we read the original, its counter is a Python attribute of each block,
which torch.nn.DataParallel (used there for miniImageNet and tieredImageNet) increments on throw-away
replicas, so its DropBlock may have stayed near keep probability 1 on those two benchmarks.

Under torch.func.vmap: the random masks need vmap's randomness="different" (metarun/vmap.py, which every
algorithm uses), so each task draws its own; the draws come from the global RNG (seeded by the run, saved in
every checkpoint). Normalisation is the Conv-4's TaskBatchNorm (models/cnn.py: tensor ops, exact
second-order meta-gradients under vmap, a pure forward pass) with the same `bn` modes, and
`update_running_stats` moves the inductive running statistics outside vmap, as ConvNet's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.defaults import option_defaults
from metarun.models.base import Backbone
from metarun.models.cnn import BN_MODES, UPDATE_CHUNK, BatchNormMode, TaskBatchNorm, batch_moments
from metarun.vmap import over_tasks

BLOCKS = 4
DROPBLOCK_FROM = 2  # blocks 0 and 1 use plain dropout, blocks 2 and 3 DropBlock (as the original)
NEGATIVE_SLOPE = 0.1  # LeakyReLU
POOLS: tuple[str, ...] = ("flatten", "avg")
Moments = list[tuple[Tensor, Tensor]]

_DEFAULTS = option_defaults("model", "resnet12")


def block_mask(seeds: Tensor, block_size: int) -> Tensor:
    """1 where units are kept, 0 in the block_size x block_size block whose top-left corner is each seed.

    seeds [..., h - b + 1, w - b + 1] (1 = a block starts here) -> mask [..., h, w]: a max-pool over the seeds
    padded by b - 1 on every side, the vectorised form of MetaOptNet's `_compute_block_mask` (no index lists,
    so it runs under vmap)."""
    pad = block_size - 1
    lead = seeds.shape[:-2]
    covered = F.max_pool2d(F.pad(seeds.reshape(-1, 1, *seeds.shape[-2:]), (pad, pad, pad, pad)), block_size, 1)
    return 1.0 - covered.reshape(*lead, *covered.shape[-2:])


def drop_block(x: Tensor, rate: float, block_size: int) -> Tensor:
    """DropBlock on one task's [N, C, H, W] batch, dropping about `rate` of the units (module docstring)."""
    height, width = x.shape[-2:]
    size = min(block_size, height, width)
    gamma = rate / size**2 * (height * width) / ((height - size + 1) * (width - size + 1))
    seeds = (torch.rand_like(x[..., : height - size + 1, : width - size + 1]) < gamma).to(x.dtype)
    keep = block_mask(seeds, size)
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    """Three 3x3 convolutions with BatchNorm, a 1x1 shortcut, LeakyReLU, max-pool, then dropout or DropBlock."""

    def __init__(self, in_channels: int, out_channels: int, bn: BatchNormMode, momentum: float,
                 drop: Literal["dropout", "dropblock"], rate: float, block_size: int) -> None:
        super().__init__()
        bias = bn == "none"  # BatchNorm subtracts the per-channel mean, which would cancel a conv bias

        def norm() -> TaskBatchNorm | None:
            return TaskBatchNorm(out_channels, bn, momentum) if bn != "none" else None

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.bn1 = norm()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.bn2 = norm()
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.bn3 = norm()
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.shortcut_bn = norm()
        self.drop, self.rate, self.block_size = drop, rate, block_size

    def norms(self) -> list[TaskBatchNorm]:
        """The BatchNorm layers in the order `forward` records their moments."""
        return [n for n in (self.bn1, self.bn2, self.bn3, self.shortcut_bn) if n is not None]

    def forward(self, x: Tensor, record: Moments | None = None) -> Tensor:
        """One task's [N, C, H, W] batch. With `record`, every BatchNorm normalises with the batch's statistics
        (training mode's) and appends its (mean, unbiased variance) to it, for `update_running_stats`."""
        out = F.leaky_relu(self._norm(self.bn1, self.conv1(x), record), NEGATIVE_SLOPE)
        out = F.leaky_relu(self._norm(self.bn2, self.conv2(out), record), NEGATIVE_SLOPE)
        out = self._norm(self.bn3, self.conv3(out), record)
        out = F.leaky_relu(out + self._norm(self.shortcut_bn, self.shortcut(x), record), NEGATIVE_SLOPE)
        out = F.max_pool2d(out, 2)
        if not self.training or self.rate == 0.0:
            return out
        if self.drop == "dropblock":
            return drop_block(out, self.rate, self.block_size)
        return F.dropout(out, self.rate, training=True)

    @staticmethod
    def _norm(norm: TaskBatchNorm | None, h: Tensor, record: Moments | None) -> Tensor:
        if norm is None:
            return h
        if record is None:
            return norm(h)
        mean, var = batch_moments(h)
        count = h.shape[0] * h.shape[2] * h.shape[3]
        record.append((mean, var * count / max(count - 1, 1)))
        return norm.normalise(h, mean, var)


class ResNet12(nn.Module, Backbone):
    """ResNet-12 (Lee et al. 2019; Ye et al. 2020): [N, C, H, W] images -> [N, out_features] features.

    `out_features` depends on the input size with `pool: flatten`: channels[-1] * h * w after four 2x2
    max-pools (84 -> 42 -> 21 -> 10 -> 5: 16000 with 640 channels; 28 -> 14 -> 7 -> 3 -> 1: 640).
    """

    accepts = frozenset({"image"})

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = _DEFAULTS["channels"],
        dropout: float = _DEFAULTS["dropout"],
        dropblock: float = _DEFAULTS["dropblock"],
        dropblock_size: int = _DEFAULTS["dropblock_size"],
        dropblock_warmup: int = _DEFAULTS["dropblock_warmup"],
        pool: Literal["flatten", "avg"] = _DEFAULTS["pool"],
        bn: BatchNormMode = _DEFAULTS["bn"],
        bn_momentum: float = _DEFAULTS["bn_momentum"],
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model=resnet12 needs image inputs (C, H, W); got input shape {tuple(input_shape)}")
        if len(channels) != BLOCKS or any(int(c) < 1 for c in channels):
            raise ValueError(f"model.channels must list {BLOCKS} positive block widths (got {list(channels)})")
        for name, rate in (("dropout", dropout), ("dropblock", dropblock)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1) (got {rate})")
        if dropblock_size < 1:
            raise ValueError(f"model.dropblock_size must be positive (got {dropblock_size})")
        if dropblock_warmup < 0:
            raise ValueError(f"model.dropblock_warmup must be a non-negative number of steps (got {dropblock_warmup})")
        if pool not in POOLS:
            raise ValueError(f"model.pool must be one of {', '.join(POOLS)} (got {pool!r})")
        if bn not in BN_MODES:
            raise ValueError(f"model.bn must be one of {', '.join(BN_MODES)} (got {bn!r})")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"model.bn_momentum must be in (0, 1] (got {bn_momentum})")
        in_channels, height, width = (int(s) for s in input_shape)
        if min(height, width) < 2**BLOCKS:
            raise ValueError(f"model=resnet12 needs images of at least {2**BLOCKS}x{2**BLOCKS} (four 2x2 max-pools); "
                             f"got {tuple(input_shape)[1:]}")
        blocks = []
        for i, out_channels in enumerate(int(c) for c in channels):
            drop: Literal["dropout", "dropblock"] = "dropblock" if i >= DROPBLOCK_FROM else "dropout"
            blocks.append(ResidualBlock(in_channels, out_channels, bn, bn_momentum, drop,
                                        dropblock if drop == "dropblock" else dropout, dropblock_size))
            in_channels, height, width = out_channels, height // 2, width // 2
        self.blocks = nn.ModuleList(blocks)
        self.bn, self.pool = bn, pool
        self.dropblock, self.dropblock_warmup = dropblock, dropblock_warmup
        self.set_progress(0)
        self.out_features = in_channels * (height * width if pool == "flatten" else 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        return self._features(x, None)

    def set_progress(self, step: int) -> None:
        """DropBlock's rate after `step` training steps: linear from 0 to `dropblock` over `dropblock_warmup`
        steps (the original's keep probability 1 -> 0.9 over 40,000 forward calls = 20,000 meta-batches), then
        constant; with warm-up 0, the full rate from the start. Plain dropout is not scheduled (nor there)."""
        fraction = 1.0 if self.dropblock_warmup == 0 else min(1.0, step / self.dropblock_warmup)
        for block in self.blocks:
            if block.drop == "dropblock":
                block.rate = self.dropblock * fraction

    def _features(self, x: Tensor, record: Moments | None) -> Tensor:
        for block in self.blocks:
            x = block(x, record)
        return x.flatten(start_dim=-3) if self.pool == "flatten" else x.mean(dim=(-2, -1))

    def _layer_moments(self, x: Tensor) -> Moments:
        """One task's forward pass in the module's mode, returning each BatchNorm's (mean, unbiased variance)."""
        record: Moments = []
        self._features(x, record)
        return record

    @torch.no_grad()
    def update_running_stats(self, *image_sets: Tensor) -> None:
        """Inductive mode: move the running statistics towards those of the images (no-op otherwise).

        As ConvNet.update_running_stats (models/cnn.py, which explains the choices): called by the trainer once
        per training step, outside vmap, with the step's support and query images, each [T, N_i, C, H, W]; a
        task's sets are one batch, normalised with its own statistics, and the statistics move once, towards
        their mean over tasks. Dropout and DropBlock are applied in this pass as in training (each task its own
        masks), so the recorded statistics are those nn.BatchNorm2d records in the original's training forward.
        """
        if self.bn != "inductive":
            return
        images = image_sets[0] if len(image_sets) == 1 else torch.cat(image_sets, dim=1)
        sums: Moments | None = None
        for start in range(0, images.shape[0], UPDATE_CHUNK):
            moments = over_tasks(self._layer_moments)(images[start:start + UPDATE_CHUNK])
            part = [(mean.sum(dim=0), var.sum(dim=0)) for mean, var in moments]
            sums = part if sums is None else [(m + pm, v + pv) for (m, v), (pm, pv) in zip(sums, part)]
        assert sums is not None
        norms = [norm for block in self.blocks for norm in block.norms()]
        for norm, (mean, var) in zip(norms, sums, strict=True):
            norm.update(mean / images.shape[0], var / images.shape[0])
