"""The four-layer network of R2-D2 (Bertinetto, Henriques, Torr and Vedaldi, ICLR 2019; bertinetto/r2d2,
fewshots/models/load_model.py, RRFeatures): wider than Conv-4 and with two layers' features.

Four blocks of [3x3 conv, BatchNorm, 2x2 max-pool, LeakyReLU 0.1] with 96, 192, 384 and 512 channels
(`channels`; the authors' "64C" variant: 64 each). Pooling has stride 2 in the first three blocks and stride 1
in the fourth; blocks 3 and 4 end with dropout (`dropout`: 0.1 on miniImageNet, 0 on Omniglot, 0.4 on
CIFAR-FS in the authors' experiments.sh). The features are the concatenation of the third block's output after
one more 2x2 max-pool of stride 1 and the fourth block's output, both flattened: (384 + 512) * 2 * 2 = 3584
for 28x28 Omniglot images, (384 + 512) * 9 * 9 = 72576 for 84x84 miniImageNet ones.

Normalisation is the Conv-4's TaskBatchNorm (models/cnn.py: tensor ops, a pure forward pass under vmap) with
the same `bn` modes; the authors' nn.BatchNorm2d uses running statistics at test time (`bn: inductive`, the
default here), which `update_running_stats` moves once per training step outside vmap, as ConvNet's does.
Dropout runs under metarun/vmap.py's randomness="different": each task draws its own masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.defaults import option_defaults
from metarun.models.base import Backbone
from metarun.models.cnn import BN_MODES, UPDATE_CHUNK, BatchNormMode, TaskBatchNorm, batch_moments
from metarun.vmap import over_tasks

BLOCKS = 4
DROPOUT_FROM = 2  # blocks 3 and 4 (0-based 2 and 3) end with dropout
NEGATIVE_SLOPE = 0.1  # LeakyReLU (the authors' model.lrelu)
Moments = list[tuple[Tensor, Tensor]]

_DEFAULTS = option_defaults("model", "r2d2net")


class R2D2Net(nn.Module, Backbone):
    """R2-D2's feature extractor: [N, C, H, W] images -> [N, out_features] (module docstring)."""

    accepts = frozenset({"image"})

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = _DEFAULTS["channels"],
        dropout: float = _DEFAULTS["dropout"],
        bn: BatchNormMode = _DEFAULTS["bn"],
        bn_momentum: float = _DEFAULTS["bn_momentum"],
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model=r2d2net needs image inputs (C, H, W); got input shape {tuple(input_shape)}")
        if len(channels) != BLOCKS or any(int(c) < 1 for c in channels):
            raise ValueError(f"model.channels must list {BLOCKS} positive block widths (got {list(channels)})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1) (got {dropout})")
        if bn not in BN_MODES:
            raise ValueError(f"model.bn must be one of {', '.join(BN_MODES)} (got {bn!r})")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"model.bn_momentum must be in (0, 1] (got {bn_momentum})")
        in_channels, height, width = (int(s) for s in input_shape)
        # three stride-2 pools, then two stride-1 ones (block 4's, and the extra one on block 3's output)
        side = min(height, width) // 2 // 2 // 2 - 1
        if side < 1:
            raise ValueError(f"model=r2d2net needs images of at least 16x16 (got {tuple(input_shape)[1:]})")
        widths = [int(c) for c in channels]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for out_channels in widths:
            self.convs.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bn == "none"))
            self.norms.append(TaskBatchNorm(out_channels, bn, bn_momentum) if bn != "none" else nn.Identity())
            in_channels = out_channels
        self.bn, self.dropout = bn, dropout
        third, fourth = height // 8 - 1, width // 8 - 1
        self.out_features = (widths[2] + widths[3]) * third * fourth

    def forward(self, x: Tensor) -> Tensor:
        return self._features(x, None)

    def _features(self, x: Tensor, record: Moments | None) -> Tensor:
        third = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = conv(x)
            if record is not None and isinstance(norm, TaskBatchNorm):
                mean, var = batch_moments(h)
                count = h.shape[0] * h.shape[2] * h.shape[3]
                record.append((mean, var * count / max(count - 1, 1)))
                h = norm.normalise(h, mean, var)
            else:
                h = norm(h)
            h = F.leaky_relu(F.max_pool2d(h, 2, stride=2 if i < BLOCKS - 1 else 1), NEGATIVE_SLOPE)
            if i >= DROPOUT_FROM and self.training and self.dropout > 0:
                h = F.dropout(h, self.dropout, training=True)
            x = h
            if i == BLOCKS - 2:
                third = F.max_pool2d(h, 2, stride=1)
        return torch.cat([third.flatten(start_dim=-3), x.flatten(start_dim=-3)], dim=-1)

    def _layer_moments(self, x: Tensor) -> Moments:
        record: Moments = []
        self._features(x, record)
        return record

    @torch.no_grad()
    def update_running_stats(self, *image_sets: Tensor) -> None:
        """Inductive mode: move the running statistics towards those of the images (no-op otherwise); as
        ConvNet.update_running_stats (models/cnn.py explains the choices), dropout applied as in training."""
        if self.bn != "inductive":
            return
        images = image_sets[0] if len(image_sets) == 1 else torch.cat(image_sets, dim=1)
        sums: Moments | None = None
        for start in range(0, images.shape[0], UPDATE_CHUNK):
            moments = over_tasks(self._layer_moments)(images[start:start + UPDATE_CHUNK])
            part = [(mean.sum(dim=0), var.sum(dim=0)) for mean, var in moments]
            sums = part if sums is None else [(m + pm, v + pv) for (m, v), (pm, pv) in zip(sums, part)]
        assert sums is not None
        for norm, (mean, var) in zip(self.norms, sums, strict=True):
            norm.update(mean / images.shape[0], var / images.shape[0])
