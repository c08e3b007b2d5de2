"""Random distortions of meta-training images, batched and seeded: one place every image benchmark uses.

Two families, combinable:

* Koch, Zemel and Salakhutdinov (2015, section 4.3) augment Omniglot pairs with small affine distortions:
  rotation, shear, scale and translation, each component applied with `probability` (0.5 there).
* The natural-image recipe of Gidaris and Komodakis (2018), which MetaOptNet and FEAT train with: a random crop
  after zero padding (`crop_padding`: torchvision's RandomCrop(size, padding=p), an integer shift of up to p
  pixels), or a random resized crop (`resized_crop: [low, high]`: the crop's area fraction, aspect ratio in
  [3/4, 4/3] log-uniformly, as RandomResizedCrop), a horizontal flip with probability `flip`, and colour
  jitter (`color_jitter: {brightness, contrast, saturation}`: factors uniform in [1 - b, 1 + b], as
  ColorJitter; applied in that fixed order, where torchvision shuffles it per image).

Every image of a batch gets its own draw from the episode's generator (the run's task stream, so a resumed run
draws the same distortions). The geometric parts compose into one affine matrix per image, and all images are
warped at once by one `affine_grid` + `grid_sample` on the images' device (integer shifts land exactly on
pixel centres: a padded crop moves pixels unchanged); the colour jitter is three batched blends. Only
meta-training episodes are distorted (EpisodeSampler asks for split "train"); the validation and test pools
never are.
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

KEYS = ("rotation", "shear", "scale", "translation", "probability", "flip", "crop_padding", "resized_crop",
        "color_jitter")
JITTER_KEYS = ("brightness", "contrast", "saturation")
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the distortions: rotation in degrees (+-), shear as a fraction (+-, each axis), scale as a
    (low, high) factor, translation in pixels (+-, each axis); `probability` of applying each of those four;
    `flip` the probability of a horizontal flip; `crop_padding` the padding (pixels) of a random crop;
    `resized_crop` the (low, high) area fraction of a random resized crop; `color_jitter` the brightness,
    contrast and saturation ranges."""

    rotation: float = 0.0
    shear: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translation: float = 0.0
    probability: float = 0.5
    flip: float = 0.0
    crop_padding: int = 0
    resized_crop: tuple[float, float] | None = None
    color_jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)

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
        crop = node.get("resized_crop")
        if crop is not None and (not isinstance(crop, Sequence) or len(crop) != 2
                                 or not 0 < float(crop[0]) <= float(crop[1]) <= 1):
            raise UserInputError(f"benchmark.augment.resized_crop must be [low, high] area fractions with "
                                 f"0 < low <= high <= 1 (got {crop})")
        jitter = node.get("color_jitter") or {}
        if not isinstance(jitter, Mapping) or set(jitter) - set(JITTER_KEYS):
            raise UserInputError(f"benchmark.augment.color_jitter takes {', '.join(JITTER_KEYS)} (got {jitter})")
        padding = node.get("crop_padding", 0)
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise UserInputError(f"benchmark.augment.crop_padding must be a non-negative integer (got {padding})")
        if padding and crop is not None:
            raise UserInputError("benchmark.augment: give crop_padding (a padded random crop) or resized_crop "
                                 "(a random resized crop), not both")
        made = cls(float(node.get("rotation", 0.0)), float(node.get("shear", 0.0)),
                   (float(scale[0]), float(scale[1])), float(node.get("translation", 0.0)),
                   float(node.get("probability", 0.5)), float(node.get("flip", 0.0)), int(padding),
                   None if crop is None else (float(crop[0]), float(crop[1])),
                   tuple(float(jitter.get(k, 0.0)) for k in JITTER_KEYS))  # type: ignore[arg-type]
        if min(made.rotation, made.shear, made.translation) < 0 or not 0.0 <= made.probability <= 1.0:
            raise UserInputError("benchmark.augment: rotation, shear and translation must be >= 0 and probability "
                                 f"in [0, 1] (got {node})")
        if not 0.0 <= made.flip <= 1.0 or min(made.color_jitter) < 0:
            raise UserInputError(f"benchmark.augment: flip must be in [0, 1] and the color_jitter ranges >= 0 "
                                 f"(got {node})")
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
        affine = torch.cat([linear, shift.unsqueeze(-1)], dim=-1)
        if self.flip > 0:  # a flipped image reads input x from output -x: the x column negated
            flipped = torch.rand(count, generator=generator, device=generator.device) < self.flip
            affine = torch.cat([affine[:, :, :1] * torch.where(flipped, -1.0, 1.0).view(count, 1, 1).to(affine),
                                affine[:, :, 1:]], dim=-1)
        # the crop's window applied to the distorted coordinates: input = crop(affine(output))
        crop = self._crop(count, size, generator).to(affine)
        return torch.cat([crop[:, :, :2] @ affine[:, :, :2], crop[:, :, :2] @ affine[:, :, 2:] + crop[:, :, 2:]], dim=-1)

    @property
    def geometric(self) -> bool:
        """Whether any distortion moves pixels (else the warp is skipped: colour jitter alone)."""
        return bool(self.rotation or self.shear or self.scale != (1.0, 1.0) or self.translation or self.flip
                    or self.crop_padding or self.resized_crop is not None)

    def _crop(self, count: int, size: int, generator: torch.Generator) -> Tensor:
        """[count, 2, 3]: where each output image's [-1, 1] square reads from in the input: a padded crop's
        integer shift, a resized crop's window, or the whole image."""
        device = generator.device
        out = torch.zeros(count, 2, 3, device=device)
        if self.resized_crop is not None:
            area = self.resized_crop[0] + (self.resized_crop[1] - self.resized_crop[0]) * torch.rand(
                count, generator=generator, device=device)
            ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(count, generator=generator, device=device))
            width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
            centre = (torch.rand(count, 2, generator=generator, device=device) * 2 - 1) * torch.stack(
                [1 - width, 1 - height], dim=-1)
            out[:, 0, 0], out[:, 1, 1] = width, height
            out[:, :, 2] = centre
            return out
        out[:, 0, 0] = out[:, 1, 1] = 1.0
        if self.crop_padding:
            shift = torch.randint(-self.crop_padding, self.crop_padding + 1, (count, 2), generator=generator,
                                  device=device)
            out[:, :, 2] = shift.to(out.dtype) * (2.0 / size)
        return out

    def jitter(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Brightness, contrast and saturation factors per image [N, C, H, W], uniform in [1 - b, 1 + b]."""
        count, channels = images.shape[0], images.shape[1]

        def factors(spread: float) -> Tensor:
            low = max(0.0, 1.0 - spread)
            drawn = low + (1.0 + spread - low) * torch.rand(count, generator=generator, device=generator.device)
            return drawn.to(device=images.device, dtype=images.dtype).view(count, 1, 1, 1)

        brightness, contrast, saturation = self.color_jitter
        if brightness:
            images = (images * factors(brightness)).clamp(0, 1)
        grey_weights = torch.tensor(GREY, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        grey = (images * grey_weights).sum(1, keepdim=True) if channels == 3 else images
        if contrast:
            f = factors(contrast)
            images = (f * images + (1 - f) * grey.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
            grey = (images * grey_weights).sum(1, keepdim=True) if channels == 3 else images
        if saturation and channels == 3:
            f = factors(saturation)
            images = (f * images + (1 - f) * grey).clamp(0, 1)
        return images

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Distort a batch [..., C, H, W] of float images (values in [0, 1]); background 0 stays 0 (zeros padding)."""
        shape = images.shape
        warped = flat = images.reshape(-1, *shape[-3:])
        if self.geometric:
            theta = self.matrices(flat.shape[0], shape[-1], generator).to(device=flat.device, dtype=flat.dtype)
            grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
            warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if any(self.color_jitter):
            warped = self.jitter(warped, generator)
        return warped.view(shape)
