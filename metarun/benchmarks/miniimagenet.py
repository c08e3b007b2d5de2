"""miniImageNet N-way K-shot classification (Vinyals et al. 2016; 64/16/20 classes of Ravi & Larochelle 2017).

Whatever form the data comes in (see miniimagenet_source), it is decoded once into a uint8 RGB store
[100 classes, 600 images, 3, 84, 84] (1.3 GB), cached on disk and memory-mapped on later runs; the
episodes come from EpisodeSampler.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sized
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metarun.benchmarks.augment import Augmentation
from metarun.benchmarks.base import SPLITS, TaskSpec, check_positive, split_ranges
from metarun.benchmarks.decode import DecodeError, Preprocess, decode_all, to_array
from metarun.benchmarks.miniimagenet_source import MiniSource, detect, image_classes, pickle_classes
from metarun.benchmarks.sampler import EpisodeSampler, SamplerBackedBenchmark
from metarun.benchmarks.store import cached_store
from metarun.defaults import option_defaults
from metarun.errors import UserInputError


_DEFAULTS = option_defaults("benchmark", "miniimagenet")


class MiniImageNetBenchmark(SamplerBackedBenchmark):
    """Constructor parameters are the `benchmark.*` keys of configs/benchmark/miniimagenet.yaml."""

    def __init__(
        self,
        root: str = _DEFAULTS["root"],
        ways: int = _DEFAULTS["ways"],
        shots: int = _DEFAULTS["shots"],
        queries: int = _DEFAULTS["queries"],
        image_size: int = _DEFAULTS["image_size"],
        cache_dir: str | None = _DEFAULTS["cache_dir"],
        decode_workers: int = _DEFAULTS["decode_workers"],
        augment: dict[str, Any] | None = _DEFAULTS["augment"],
    ) -> None:
        from metarun.console import console

        check_positive(ways=ways, shots=shots, queries=queries, image_size=image_size)
        started = time.perf_counter()
        source = detect(root)
        prep = self.preprocess = Preprocess(size=image_size, mode="RGB", invert=False)
        settings = {**prep.as_dict(), "format": source.format}
        store, meta, cache_file, hit = cached_store("miniimagenet", source.listing, settings,
                                                    lambda: build_store(source, prep, decode_workers), cache_dir)
        ranges = split_ranges(meta["classes"])
        self.sampler = EpisodeSampler(store, ranges, ways, shots, queries, name="miniimagenet",
                                      augment=Augmentation.from_config(augment))
        self.spec = TaskSpec(name="miniimagenet", kind="classification", input_shape=(3, image_size, image_size),
                             output_size=ways, ways=ways, shots=shots, queries=queries)
        counts = "/".join(str(ranges[s][1] - ranges[s][0]) for s in SPLITS)
        how = "loaded from cache" if hit else "decoded and cached"
        console.print(f"{source.describe()}; {counts} train/val/test classes x {store.shape[1]} images at "
                      f"{image_size}x{image_size}; {how} {cache_file} ({time.perf_counter() - started:.1f} s)",
                      highlight=False, soft_wrap=True)



def build_store(source: MiniSource, prep: Preprocess, workers: int) -> tuple[Tensor, dict[str, object]]:
    """Cache miss: every split's classes as uint8 [classes, images, 3, S, S], splits in train/val/test order."""
    parts: list[np.ndarray] = []
    names: dict[str, list[str]] = {}
    for split in SPLITS:
        if source.format in ("ravi-csv", "folders"):
            classes = image_classes(source, split)
            per_class = _uniform(classes, split, source)
            refs = [ref for files in classes.values() for ref in files]
            try:
                images = decode_all(refs, prep, workers)
            except DecodeError as ex:
                raise UserInputError(f"{ex}; replace or delete that file") from None
            parts.append(images.reshape(len(classes), per_class, *images.shape[1:]))
        else:
            arrays = pickle_classes(source, split)
            per_class = _uniform(arrays, split, source)
            parts.append(np.stack([_resize_stack(a, prep) for a in arrays.values()]))
            classes = arrays
        names[split] = list(classes)
    counts = {split: part.shape[1] for split, part in zip(SPLITS, parts)}
    if len(set(counts.values())) != 1:
        raise UserInputError(f"miniImageNet splits must have the same number of images per class (got {counts})")
    return torch.from_numpy(np.concatenate(parts)), {"format": source.format, "classes": names}


def _uniform(classes: Mapping[str, Sized], split: str, source: MiniSource) -> int:
    """The store is rectangular, so every class needs the same number of images (600 in miniImageNet)."""
    counts = {name: len(items) for name, items in classes.items()}
    if len(set(counts.values())) != 1:
        fewest = min(counts, key=counts.__getitem__)
        raise UserInputError(f"every miniImageNet class needs the same number of images, but {split} class {fewest} "
                             f"has {counts[fewest]} and others up to {max(counts.values())} ({source.splits[split]})")
    return next(iter(counts.values()))


def _resize_stack(images: np.ndarray, prep: Preprocess) -> np.ndarray:
    """uint8 [n, H, W, 3] -> [n, 3, S, S]; resized with the same filter as decoded files when H, W != S."""
    if images.shape[1:3] == (prep.size, prep.size):
        return images.transpose(0, 3, 1, 2)
    return np.stack([to_array(Image.fromarray(image), prep) for image in images])
