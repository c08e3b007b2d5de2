"""Random affine distortions of meta-training images, batched and seeded: one place every image benchmark uses.

Koch, Zemel and Salakhutdinov (2015, section 4.3) augment Omniglot pairs with small affine distortions:
rotation, shear, scale and translation, each component applied with probability 0.5. Here every image of a
batch gets its own transform, drawn from the episode's generator (the run's task stream, so a resumed run
draws the same distortions), and all images are warped at once by one `affine_grid` + `grid_sample` on the
images' device. Only meta-training episodes are distorted (EpisodeSampler asks for split "train"); the
validation and test pools never are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import UserInputError

KEYS = ("rotation", "shear", "scale", "translation", "probability")


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the distortions: rotation in degrees (+-), shear as a fraction (+-, each axis), scale as a
    (low, high) factor, translation in pixels (+-, each axis); `probability` of applying each component."""

    rotation: float = 0.0
    shear: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translation: float = 0.0
    probability: float = 0.5

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> "Augmentation | None":
        """`benchmark.augment` ({rotation: 10, shear: 0.3, scale: [0.8, 1.2], translation: 2, probability: 0.5})
        or null for none. Bad keys or values are one line."""
        if node is None:
            return None
        unknown = sorted(set(node) - set(KEYS))
        if unknown:
            raise UserInputError(f"benchmark.augment has unknown key(s) {', '.join(unknown)}; it takes {', '.join(KEYS)}")
        scale = node.get("scale", (1.0, 1.0))
        if not isinstance(scale, Sequence) or len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
            raise UserInputError(f"benchmark.augment.scale must be [low, high] with 0 < low <= high (got {scale})")
        made = cls(float(node.get("rotation", 0.0)), float(node.get("shear", 0.0)),
                   (float(scale[0]), float(scale[1])), float(node.get("translation", 0.0)),
                   float(node.get("probability", 0.5)))
        if min(made.rotation, made.shear, made.translation) < 0 or not 0.0 <= made.probability <= 1.0:
            raise UserInputError("benchmark.augment: rotation, shear and translation must be >= 0 and probability "
                                 f"in [0, 1] (got {node})")
        return made

    def matrices(self, count: int, size: int, generator: torch.Generator) -> Tensor:
        """[count, 2, 3] affine matrices in `affine_grid`'s normalised coordinates (the image spans [-1, 1])."""
        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return low + (high - low) * torch.rand(*shape, generator=generator, device=generator.device)

        def applied(values: Tensor, identity: float) -> Tensor:
            keep = torch.rand(values.shape, generator=generator, device=generator.device) < self.probability
            return torch.where(keep, values, torch.full_like(values, identity))

        angle = applied(uniform(-self.rotation, self.rotation, count), 0.0) * (math.pi / 180.0)
        shear = applied(uniform(-self.shear, self.shear, count, 2), 0.0)
        scale = applied(uniform(*self.scale, count, 2), 1.0)
        shift = applied(uniform(-self.translation, self.translation, count, 2), 0.0) * (2.0 / size)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [count, 2, 2]
        shearing = torch.eye(2).repeat(count, 1, 1)
        shearing[:, 0, 1], shearing[:, 1, 0] = shear[:, 0], shear[:, 1]
        linear = rotation @ shearing @ torch.diag_embed(scale)
        return torch.cat([linear, shift.unsqueeze(-1)], dim=-1)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Distort a batch [..., C, H, W] of float images (values in [0, 1]); background 0 stays 0 (zeros padding)."""
        shape = images.shape
        flat = images.reshape(-1, *shape[-3:])
        theta = self.matrices(flat.shape[0], shape[-1], generator).to(device=flat.device, dtype=flat.dtype)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        return F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False).view(shape)
