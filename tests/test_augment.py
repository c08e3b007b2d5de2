"""The natural-image augmentations against their definitions: a padded random crop moves pixels by whole
pixels unchanged (torchvision's RandomCrop with padding), a flip mirrors, a resized crop reads a window, colour
jitter is brightness, contrast and saturation blends; seeded; bad settings are one line."""

from __future__ import annotations

import pytest
import torch

from metarun.benchmarks.augment import Augmentation
from metarun.errors import UserInputError


def images(count: int = 6, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def padded_crop(image: torch.Tensor, dx: int, dy: int, padding: int) -> torch.Tensor:
    """RandomCrop(size, padding) by hand: zero-pad, then cut the window offset by (dx, dy) from the centre."""
    size = image.shape[-1]
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    return padded[:, padding + dy: padding + dy + size, padding + dx: padding + dx + size]


def test_a_padded_random_crop_shifts_whole_pixels_unchanged() -> None:
    x = images()
    out = Augmentation.from_config({"crop_padding": 2})(x, torch.Generator().manual_seed(1))
    for image, moved in zip(x, out):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)
                   if torch.allclose(moved, padded_crop(image, dx, dy, 2), atol=1e-12, rtol=0)]
        assert len(matches) == 1, "every output is exactly one of the 25 padded crops"
    shifts = {tuple(torch.nonzero(out[i].sum(0) != 0)[0].tolist()) for i in range(len(x))}
    assert len(shifts) > 1  # each image draws its own window


def test_flip_mirrors_and_only_with_its_probability() -> None:
    x = images()
    always = Augmentation.from_config({"flip": 1.0})(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(always, x.flip(-1), atol=1e-12, rtol=0)
    half = Augmentation.from_config({"flip": 0.5})(images(200), torch.Generator().manual_seed(0))
    flipped = sum(bool(torch.allclose(a, b.flip(-1))) for a, b in zip(half, images(200)))
    assert 70 < flipped < 130
    never = Augmentation.from_config({"flip": 0.0, "crop_padding": 0})
    assert not never.geometric and torch.equal(never(x, torch.Generator().manual_seed(0)), x)


def test_a_resized_crop_of_the_whole_area_is_the_image_and_smaller_ones_zoom_in() -> None:
    x = images(size=16)
    whole = Augmentation.from_config({"resized_crop": [1.0, 1.0]})
    # area 1 leaves aspect ratio r: width sqrt(r) clipped to 1 and height sqrt(1/r): one axis is the full image
    theta = whole.matrices(50, 16, torch.Generator().manual_seed(0))
    assert torch.all(torch.maximum(theta[:, 0, 0], theta[:, 1, 1]) == 1.0)
    small = Augmentation.from_config({"resized_crop": [0.1, 0.3]})
    theta = small.matrices(200, 16, torch.Generator().manual_seed(0))
    area = theta[:, 0, 0] * theta[:, 1, 1]
    assert float(area.min()) >= 0.1 - 1e-6 and float(area.max()) <= 0.3 + 1e-6
    assert bool(((theta[:, :, 2].abs() + torch.stack([theta[:, 0, 0], theta[:, 1, 1]], -1)) <= 1 + 1e-6).all())
    assert small(x, torch.Generator().manual_seed(0)).shape == x.shape  # the window stays inside the image


def test_color_jitter_is_the_three_blends() -> None:
    x = images(count=1)
    grey = (x * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
    bright = Augmentation.from_config({"color_jitter": {"brightness": 0.4}})
    g = torch.Generator().manual_seed(3)
    factor = 0.6 + 0.8 * torch.rand(1, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    torch.testing.assert_close(bright(x, g), (x * factor).clamp(0, 1), atol=1e-6, rtol=0)
    saturation = Augmentation.from_config({"color_jitter": {"saturation": 1.0}})
    out = saturation(x, torch.Generator().manual_seed(4))
    f = 2.0 * torch.rand(1, generator=torch.Generator().manual_seed(4)).double()
    torch.testing.assert_close(out, (f * x + (1 - f) * grey).clamp(0, 1), atol=1e-6, rtol=0)
    contrast = Augmentation.from_config({"color_jitter": {"contrast": 1.0}})(x, torch.Generator().manual_seed(5))
    c = 2.0 * torch.rand(1, generator=torch.Generator().manual_seed(5)).double()
    torch.testing.assert_close(contrast, (c * x + (1 - c) * grey.mean()).clamp(0, 1), atol=1e-6, rtol=0)
    single = Augmentation.from_config({"color_jitter": {"saturation": 0.5}})
    one_channel = images(channels=1)
    assert torch.equal(single(one_channel, torch.Generator().manual_seed(0)), one_channel)  # nothing to saturate


def test_the_metaoptnet_recipe_is_seeded_and_stays_in_range() -> None:
    recipe = {"crop_padding": 4, "flip": 0.5, "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}}
    augment = Augmentation.from_config(recipe)
    x = images(32, size=32)
    a, b = augment(x, torch.Generator().manual_seed(7)), augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@pytest.mark.parametrize("node, message", [
    ({"crop_padding": -1}, "crop_padding must be a non-negative integer"),
    ({"crop_padding": 2.5}, "crop_padding must be a non-negative integer"),
    ({"resized_crop": [0.5, 0.2]}, "resized_crop must be"),
    ({"resized_crop": [0.5, 1.5]}, "resized_crop must be"),
    ({"crop_padding": 4, "resized_crop": [0.5, 1.0]}, "not both"),
    ({"flip": 1.5}, "flip must be in"),
    ({"color_jitter": {"hue": 0.1}}, "color_jitter takes"),
    ({"color_jitter": {"brightness": -0.1}}, "color_jitter ranges"),
])
def test_bad_settings_are_one_line(node: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message) as info:
        Augmentation.from_config(node)
    assert "\n" not in str(info.value)
