"""`benchmark=folder`: N-way K-shot classification on any image data in a common on-disk layout.

The layout under `benchmark.root` is detected (benchmarks/layouts.py: split folders, LibFewShot CSVs,
easy-few-shot-learning JSON specs, or class folders split by class lists or a seeded random split) and said
in one line. Every image is decoded once (Pillow, LANCZOS to `image_size` squared, `channels` 1 or 3) by a
process pool over every core into a raw uint8 store [images, C, S, S] in the cache folder, each class's
images contiguous and each split's classes contiguous (benchmarks/store.py: written under a temporary
name, renamed when complete, with a marker holding its size and CRC). Classes may differ in size: the
sampler's ragged path draws from them, leaving out of an episode shape the classes with fewer than K+Q
images (one warning line that counts them, or an error with `benchmark.min_examples=strict`); classes of
equal size take the rectangular path, so the same images give the same episodes as any other benchmark.
A store over `benchmark.ram_share` of RAM is memory-mapped instead of loaded (`benchmark.memory_map`), and
episodes then read only their own images from it.

Normalisation (`benchmark.normalize`): null keeps pixels in [0, 1] like the other image benchmarks; `train`
uses the per-channel mean and standard deviation of the training split (computed while decoding, kept in
the cache marker); `{mean: [...], std: [...]}` gives them (on the [0, 1] scale).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarun.benchmarks.augment import Augmentation
from metarun.benchmarks.base import SPLITS, TaskSpec, check_positive, split_ranges
from metarun.benchmarks.decode import DecodeError, ImageRef, Preprocess, decode_into
from metarun.benchmarks.layouts import FolderSource, detect
from metarun.benchmarks.sampler import EpisodeSampler, SamplerBackedBenchmark
from metarun.benchmarks.store import Checksum, cached_raw_store
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError

_DEFAULTS = option_defaults("benchmark", "folder")
MIN_EXAMPLES = ("warn", "strict")


class FolderBenchmark(SamplerBackedBenchmark):
    """Constructor parameters are the `benchmark.*` keys of configs/benchmark/folder.yaml."""

    def __init__(
        self,
        root: str = _DEFAULTS["root"],
        layout: str = _DEFAULTS["layout"],
        splits: str | None = _DEFAULTS["splits"],
        split_fractions: Sequence[float] = _DEFAULTS["split_fractions"],
        split_seed: int = _DEFAULTS["split_seed"],
        ways: int = _DEFAULTS["ways"],
        shots: int = _DEFAULTS["shots"],
        queries: int = _DEFAULTS["queries"],
        image_size: int = _DEFAULTS["image_size"],
        channels: int = _DEFAULTS["channels"],
        invert: bool = _DEFAULTS["invert"],
        normalize: str | Mapping[str, Sequence[float]] | None = _DEFAULTS["normalize"],
        min_examples: str = _DEFAULTS["min_examples"],
        memory_map: str = _DEFAULTS["memory_map"],
        ram_share: float = _DEFAULTS["ram_share"],
        cache_dir: str | None = _DEFAULTS["cache_dir"],
        decode_workers: int = _DEFAULTS["decode_workers"],
        augment: dict[str, Any] | None = _DEFAULTS["augment"],
    ) -> None:
        from metarun.console import console

        check_positive(ways=ways, shots=shots, queries=queries, image_size=image_size)
        if channels not in (1, 3):
            raise UserInputError(f"benchmark.channels must be 1 (grey) or 3 (RGB) (got {channels})")
        if min_examples not in MIN_EXAMPLES:
            raise UserInputError(f"benchmark.min_examples must be warn or strict (got '{min_examples}')")
        started = time.perf_counter()
        source = detect(root, layout, splits, tuple(split_fractions), split_seed)  # type: ignore[arg-type]
        console.print(source.describe(), highlight=False, soft_wrap=True)
        prep = self.preprocess = Preprocess(size=image_size, mode="L" if channels == 1 else "RGB", invert=bool(invert))
        refs = [ref for s in SPLITS for _, files in source.classes[s] for ref in files]
        train_images = sum(len(files) for _, files in source.classes["train"])
        shape = (len(refs), prep.channels, prep.size, prep.size)
        decoding: dict[str, float] = {}
        store = cached_raw_store(
            "folder", source.listing, prep.as_dict(), shape,
            lambda out, checksum: _decode(source, refs, prep, out, checksum, train_images, decode_workers, decoding),
            cache_dir, memory_map, ram_share)
        for note in store.notes:
            console.print(f"[yellow]{note}", highlight=False, soft_wrap=True)
        self.names = [name for s in SPLITS for name, _ in source.classes[s]]
        counts = torch.tensor([len(files) for s in SPLITS for _, files in source.classes[s]], dtype=torch.long)
        ranges = split_ranges(source.classes)
        self.memory_mapped = store.memory_mapped
        self.min_examples = min_examples
        self._counts = counts
        self._held: list[tuple[str, int, Tensor]] | None = []  # left-out classes reported while constructing
        self.sampler = EpisodeSampler(store.images, ranges, ways, shots, queries, name="folder",
                                      augment=Augmentation.from_config(augment), counts=counts,
                                      keep_store_on_host=store.memory_mapped, on_left_out=self._left_out)
        held, self._held = self._held, None
        if held:
            self._report_left_out(held)
        self.normalization = _normalization(normalize, store.meta, channels)
        self._norm_on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.spec = TaskSpec(name="folder", kind="classification", input_shape=(channels, image_size, image_size),
                             output_size=ways, ways=ways, shots=shots, queries=queries)
        if store.hit:
            how = "loaded from cache"
        else:
            used = int(decoding.get("workers", 1))
            how = (f"decoded {len(refs)} images ({decoding.get('rate', 0):,.0f} images/s, "
                   f"{used} process{'es' if used > 1 else ''}), cached")
        mapped = "memory-mapped" if store.memory_mapped else "in memory"
        console.print(f"folder: {channels} channel{'s' if channels > 1 else ''} at {image_size}x{image_size}; {how} "
                      f"{store.path} ({mapped}, {time.perf_counter() - started:.1f} s)",
                      highlight=False, soft_wrap=True)

    def _left_out(self, split: str, per: int, classes: Tensor) -> None:
        """The sampler found classes with fewer than K+Q images: an error when strict, else a warning (gathered into
        one line for all splits while constructing, one line per new episode shape afterwards)."""
        if self._held is not None and self.min_examples != "strict":
            self._held.append((split, per, classes))
        else:
            self._report_left_out([(split, per, classes)])

    def _report_left_out(self, held: list[tuple[str, int, Tensor]]) -> None:
        from metarun.console import console

        total = sum(len(c) for _, _, c in held)
        per = held[0][1]
        by_split = ", ".join(f"{len(c)} {s}" for s, _, c in held)
        first = int(held[0][2][0])
        plural = "es" if total > 1 else ""
        example = f"'{self.names[first]}' has {int(self._counts[first])}"
        if self.min_examples == "strict":
            raise UserInputError(f"benchmark.min_examples=strict: {total} class{plural} ({by_split}) ha"
                                 f"{'ve' if total > 1 else 's'} fewer than shots + queries = {per} images "
                                 f"(e.g. {example}); remove them, lower shots or queries, or use "
                                 "benchmark.min_examples=warn")
        console.print(f"[yellow]warning: folder: {total} class{plural} ({by_split}) ha{'ve' if total > 1 else 's'} "
                      f"fewer than shots + queries = {per} images and {'are' if total > 1 else 'is'} left out of "
                      f"these episodes (e.g. {example}); benchmark.min_examples=strict makes this an error",
                      highlight=False, soft_wrap=True)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        batch = super().sample(split, num_tasks, generator, ways=ways, shots=shots, queries=queries)
        if self.normalization is not None:
            mean, std = self._norm_tensors(batch.support_x.device)
            for x in (batch.support_x, batch.query_x):
                x.sub_(mean).div_(std)
        return batch

    def load_inputs(self, paths: Sequence[Path]) -> Tensor:
        """Decoded as the store was, then normalised with the benchmark's statistics, as its episodes are."""
        x = super().load_inputs(paths)
        if self.normalization is not None:
            mean, std = self._norm_tensors(x.device)
            x.sub_(mean).div_(std)
        return x

    def _norm_tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        cached = self._norm_on.get(device)
        if cached is None:
            assert self.normalization is not None
            mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                         for v in self.normalization)
            cached = self._norm_on[device] = (mean, std)
        return cached


def _decode(source: FolderSource, refs: list[ImageRef], prep: Preprocess, out: np.ndarray, checksum: Checksum,
            train_images: int, workers: int, report: dict[str, float]) -> dict[str, Any]:
    """Cache miss: decode every image into `out` with a progress bar (images/s), keeping a running CRC and the
    training split's per-channel sums for `normalize: train`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    from metarun.console import console

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:,.0f} images/s" if task.speed else "", style="progress.data.speed")

    sums = np.zeros(prep.channels)
    squares = np.zeros(prep.channels)

    def written(start: int, chunk: np.ndarray) -> None:
        checksum.update(chunk)
        train = chunk[:max(0, train_images - start)]
        if len(train):
            values = train.astype(np.float64) / 255.0
            sums[:] += values.sum(axis=(0, 2, 3))
            squares[:] += np.square(values).sum(axis=(0, 2, 3))

    began = time.perf_counter()
    with Progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("decode", total=len(refs))
        try:
            used = decode_into(out, refs, prep, workers, progress=lambda n: progress.advance(task, n), written=written)
        except DecodeError as ex:
            raise UserInputError(f"{ex}; replace or delete that file") from None
    seconds = time.perf_counter() - began
    report.update(rate=len(refs) / seconds if seconds > 0 else 0.0, workers=used)
    pixels = max(1, train_images) * prep.size * prep.size
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    return {"classes": {s: [name for name, _ in source.classes[s]] for s in SPLITS},
            "train_mean": mean.tolist(), "train_std": std.tolist()}


def _normalization(normalize: str | Mapping[str, Sequence[float]] | None, meta: dict[str, Any],
                   channels: int) -> tuple[list[float], list[float]] | None:
    """(mean, std) per channel, or None to keep [0, 1] pixels."""
    if normalize is None or normalize in ("none", "null"):
        return None
    if normalize == "train":
        mean, std = list(meta["train_mean"]), list(meta["train_std"])
        return mean, [s if s > 0 else 1.0 for s in std]  # a constant channel: centre it, do not divide by zero
    if isinstance(normalize, Mapping) and set(normalize) == {"mean", "std"}:
        mean, std = [float(v) for v in normalize["mean"]], [float(v) for v in normalize["std"]]
        if len(mean) == len(std) == channels and all(s > 0 and math.isfinite(s) for s in std):
            return mean, std
    raise UserInputError(f"benchmark.normalize must be null, train, or {{mean: [...], std: [...]}} with {channels} "
                         f"value{'s' if channels > 1 else ''} each and positive std (got {normalize})")
