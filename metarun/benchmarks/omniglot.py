"""Omniglot N-way K-shot classification (Lake et al. 2015 data; Vinyals et al. 2016 protocol).

Every image is decoded once into a uint8 store of characters (ink 255, background 0: the 1-bit PNGs
are inverted, as most papers do, so that after /255 ink is 1), cached on disk; rotations are then
made from it in memory by `torch.rot90` (counter-clockwise, as the rotDDD of the Vinyals lists), each
character at each rotation being its own class. Episodes come from EpisodeSampler.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metarun.benchmarks.augment import Augmentation
from metarun.benchmarks.base import SPLITS, TaskSpec, check_positive, split_ranges
from metarun.benchmarks.decode import DecodeError, Preprocess, decode_all
from metarun.benchmarks.omniglot_source import OmniglotSource, Split, check_archive, locate, make_split
from metarun.benchmarks.sampler import EpisodeSampler, SamplerBackedBenchmark
from metarun.benchmarks.store import cached_store
from metarun.defaults import option_defaults
from metarun.errors import UserInputError


_DEFAULTS = option_defaults("benchmark", "omniglot")


class OmniglotBenchmark(SamplerBackedBenchmark):
    """Constructor parameters are the `benchmark.*` keys of configs/benchmark/omniglot.yaml.

    split_scheme: `vinyals` (1028/172/423 characters), `lake` (background alphabets train, 5 of them held
    out seeded for val; evaluation alphabets test) or `random` (seeded 1100/100/423, MAML's code); see
    omniglot_source. `rotations` multiplies the classes of every split (the Vinyals lists name them).
    """

    def __init__(
        self,
        root: str = _DEFAULTS["root"],
        ways: int = _DEFAULTS["ways"],
        shots: int = _DEFAULTS["shots"],
        queries: int = _DEFAULTS["queries"],
        split_scheme: str = _DEFAULTS["split_scheme"],
        image_size: int = _DEFAULTS["image_size"],
        rotations: Sequence[int] = _DEFAULTS["rotations"],
        split_seed: int = _DEFAULTS["split_seed"],
        cache_dir: str | None = _DEFAULTS["cache_dir"],
        decode_workers: int = _DEFAULTS["decode_workers"],
        augment: dict[str, Any] | None = _DEFAULTS["augment"],
        within_alphabet: bool = _DEFAULTS["within_alphabet"],
    ) -> None:
        from metarun.console import console

        check_positive(ways=ways, shots=shots, queries=queries, image_size=image_size)
        started = time.perf_counter()
        rotations = tuple(int(r) for r in rotations)
        source = locate(root)
        split = make_split(source.characters, split_scheme, rotations, split_seed)
        prep = self.preprocess = Preprocess(size=image_size, mode="L", invert=True)
        base, _, cache_file, hit = cached_store("omniglot", source.listing, prep.as_dict(),
                                                lambda: _decode(source, prep, decode_workers), cache_dir)
        store, ranges = arrange(base, split)
        alphabets = sorted({c.alphabet for c in source.characters})
        groups = torch.tensor([alphabets.index(source.characters[c].alphabet) for s in SPLITS for c, _ in split[s]])
        self.sampler = EpisodeSampler(store, ranges, ways, shots, queries, name=f"omniglot ({split_scheme} split)",
                                      augment=Augmentation.from_config(augment),
                                      groups=groups if within_alphabet else None)
        self.spec = TaskSpec(name="omniglot", kind="classification", input_shape=(1, image_size, image_size),
                             output_size=ways, ways=ways, shots=shots, queries=queries)
        counts = "/".join(str(ranges[s][1] - ranges[s][0]) for s in SPLITS)
        how = "loaded from cache" if hit else f"decoded {base.shape[0] * base.shape[1]} images, cached"
        console.print(f"{source.describe()}; {split_scheme} split {counts} train/val/test classes at "
                      f"{image_size}x{image_size}; {how} {cache_file} ({time.perf_counter() - started:.1f} s)",
                      highlight=False, soft_wrap=True)



def _decode(source: OmniglotSource, prep: Preprocess, workers: int) -> tuple[Tensor, dict[str, list[str]]]:
    """Cache miss: check the archives read from, decode every image, stack as [characters, drawers, 1, S, S]."""
    for archive in source.archives.values():
        if str(archive) in source.origins.values():  # only the zips read from; extracted folders have no md5
            check_archive(archive, source.root)
    counts = {len(c.images) for c in source.characters}
    if len(counts) != 1:
        short = min(source.characters, key=lambda c: len(c.images))
        raise UserInputError(f"omniglot characters must all have the same number of drawings; {short.key} has "
                             f"{len(short.images)}, others up to {max(counts)} (run `metarun data verify omniglot`)")
    drawers = counts.pop()
    refs = [ref for char in source.characters for ref in char.images]
    try:
        images = decode_all(refs, prep, workers)
    except DecodeError as ex:
        raise UserInputError(f"{ex}; re-download it (`metarun data download omniglot`)") from None
    stacked = torch.from_numpy(images).view(len(source.characters), drawers, *images.shape[1:])
    return stacked, {"characters": [c.key for c in source.characters]}


def arrange(base: Tensor, split: Split) -> tuple[Tensor, dict[str, tuple[int, int]]]:
    """The class-indexed store: each split's (character, rotation) classes, contiguous, in split order.

    Each rotation used is made once for all characters, then one index_select picks the classes
    (about 4x faster than rotating per class group)."""
    turns = sorted({r // 90 for s in SPLITS for _, r in split[s]})
    rotated = torch.cat([torch.rot90(base, k, dims=(-2, -1)) for k in turns])  # [len(turns) * characters, ...]
    slot = {k: i * base.shape[0] for i, k in enumerate(turns)}
    index = torch.tensor([slot[r // 90] + c for s in SPLITS for c, r in split[s]], dtype=torch.long)
    store = rotated.index_select(0, index)
    return store, split_ranges(split)
