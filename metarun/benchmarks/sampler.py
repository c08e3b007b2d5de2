"""N-way K-shot Q-query episodes as index arithmetic on a class-indexed uint8 tensor store.

The store is `[classes, examples, C, H, W]` with each split's classes contiguous (`ranges`). A batch
of T tasks costs two small random draws and one `index_select` on the flattened store, on whatever
device the store lives, instead of T * N * (K + Q) PIL decodes (scripts/bench_sampling.py measures it).

- Classes are drawn without replacement per task: the top-N of T x C uniform numbers (a random
  N-subset in random order, about 10x faster than an argsort of the same numbers).
- Examples are drawn without replacement per class the same way: top-(K+Q) of E uniform numbers.
- Labels are 0..N-1 in the order of the drawn classes. That order is random, so the class a label
  names is a random permutation per task, and no model can learn "label 0 is class c".
- Support and query are laid out class-major (class 0's K shots, then class 1's, ...), so
  support_y = [0]*K + [1]*K + ...; they are split here, once.
- Only the seeded `generator` is used, never the global RNG; it may live on the CPU while the
  store lives on the GPU (the indices, not the images, cross devices).
- Classes of unequal size (benchmark=folder: CUB, a user's data) come as a flat store [images, C, H, W] with
  a count per class. Equal counts are viewed as the rectangular store (same episodes, bit for bit); unequal
  ones take the same two top-k draws with masks: a class with fewer than K+Q images scores -1 (never among
  the top-N), and positions past a class's last image score -1 (never among its top-(K+Q)).
- A memory-mapped store (bigger than RAM) stays on the host (`keep_store_on_host`): the gather reads only
  the chosen images' pages, and only those images, as uint8, move to the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metarun.benchmarks.augment import Augmentation
from metarun.benchmarks.base import Benchmark
from metarun.benchmarks.decode import DecodeError, ImageRef, Preprocess, decode_one
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError


class EpisodeSampler:
    """Draws TaskBatches [T, N*K, C, H, W] float32 in [0, 1] from a uint8 store (value / 255).

    `sample` may ask for another episode shape than the benchmark's (keyword `ways`, `shots`, `queries`),
    e.g. the wider meta-training episodes of Prototypical Networks (60-way on Omniglot).
    """

    def __init__(self, store: Tensor, ranges: dict[str, tuple[int, int]], ways: int, shots: int, queries: int,
                 name: str = "benchmark", augment: Augmentation | None = None, groups: Tensor | None = None,
                 counts: Tensor | None = None, keep_store_on_host: bool = False,
                 on_left_out: Callable[[str, int, Tensor], None] | None = None) -> None:
        """`augment`: random distortions of meta-training episodes (benchmarks/augment.py). `groups`: a group id
        per class (Omniglot: its alphabet); when given, every episode's classes come from one group (Lake et
        al.'s within-alphabet one-shot tasks), the group drawn uniformly among those with enough classes.

        `counts`: images per class, for a flat store [images, C, H, W] holding each class's images contiguously
        (classes of unequal size). Equal counts are viewed as the rectangular store (the same episodes, bit for
        bit); unequal ones are sampled by the ragged path, where a class with fewer than K+Q images is left out
        of the episodes needing K+Q, reported once per (split, K+Q) to `on_left_out(split, K+Q, classes)`.
        `keep_store_on_host`: a memory-mapped store stays where it is on `to(device)`; only the chosen images
        of each batch are gathered from it (reading just their pages) and moved."""
        self.counts: Tensor | None = None
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.long).cpu()
            if store.dtype != torch.uint8 or store.dim() != 4 or counts.dim() != 1 or len(counts) == 0 \
                    or int(counts.sum()) != store.shape[0] or bool((counts < 0).any()):
                raise ValueError(f"a ragged store must be uint8 [images, C, H, W] with counts summing to its images, "
                                 f"not {store.dtype} {tuple(store.shape)} with {counts.sum()} counted")
            if bool((counts == counts[0]).all()) and int(counts[0]) > 0:  # rectangular after all: the fast path
                store = store.view(len(counts), int(counts[0]), *store.shape[1:])
            else:
                if groups is not None:
                    raise ValueError("within-group episodes need a rectangular store (classes of equal size)")
                self.counts = counts
        if self.counts is None and (store.dtype != torch.uint8 or store.dim() != 5):
            raise ValueError(f"the store must be uint8 [classes, examples, C, H, W], "
                             f"not {store.dtype} {tuple(store.shape)}")
        self.name = name
        self.ranges = dict(ranges)
        self.on_left_out = on_left_out
        self._ragged: dict[tuple[str, int, torch.device], tuple[Tensor, Tensor, Tensor, int]] = {}
        if self.counts is None:
            self.examples = store.shape[1]
            self.image_shape = tuple(store.shape[2:])
            self.flat = store.reshape(-1, *self.image_shape)  # [classes * examples, C, H, W]: one index per image
        else:
            self.examples = int(self.counts.max())
            self.image_shape = tuple(store.shape[1:])
            self.flat = store
            self.offsets = torch.cumsum(self.counts, 0) - self.counts  # first row of each class in the flat store
        self.keep_store_on_host = keep_store_on_host
        self._device: torch.device | None = None  # where episodes go when the store stays on the host
        self._check(ways, shots, queries, list(self.ranges), "benchmark.")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.augment = augment
        self.groups = None if groups is None else groups.to(torch.long).cpu()
        self._eligible: dict[tuple[str, int], Tensor] = {}
        if self.groups is not None:
            for split in self.ranges:
                self._eligible_groups(split, ways)  # a split with no group of `ways` classes: one line now
        # per (T, N, K, Q, device): gather order and label templates, built once (a run uses few shapes)
        self._layouts: dict[tuple[int, int, int, int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def _check(self, ways: int, shots: int, queries: int, splits: list[str], prefix: str) -> None:
        if self.counts is not None:
            self._check_ragged(ways, shots, queries, splits, prefix)
            return
        if shots + queries > self.examples:
            raise UserInputError(f"{prefix}shots + {prefix}queries = {shots} + {queries} = {shots + queries} "
                                 f"but {self.name} has {self.examples} examples per class; lower shots or queries")
        for split in splits:
            start, stop = self.ranges[split]
            if ways > stop - start:
                raise UserInputError(f"{prefix}ways={ways} but the {split} split of {self.name} has only "
                                     f"{stop - start} classes; use {prefix}ways <= {stop - start}")

    def _check_ragged(self, ways: int, shots: int, queries: int, splits: list[str], prefix: str) -> None:
        """Ragged store: each split needs `ways` classes with at least K+Q images; the others are left out."""
        per = shots + queries
        for split in splits:
            _, eligible, _, _ = self._ragged_split(split, per, torch.device("cpu"))
            usable = int(eligible.sum())
            if ways > usable:
                start, stop = self.ranges[split]
                raise UserInputError(f"{prefix}ways={ways} but the {split} split of {self.name} has only {usable} of "
                                     f"its {stop - start} classes with at least {prefix}shots + {prefix}queries = "
                                     f"{shots} + {queries} = {per} images; lower ways, shots or queries")

    def _ragged_split(self, split: str, per: int, draw: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
        """(counts, eligible mask, first rows, largest eligible count) of the split's classes for K+Q = `per`, on
        the drawing device; worked out once per (split, per, device), reporting the left-out classes once."""
        key = (split, per, draw)
        cached = self._ragged.get(key)
        if cached is not None:
            return cached
        assert self.counts is not None
        start, stop = self.ranges[split]
        counts = self.counts[start:stop]
        eligible = counts >= per
        if not any(k[:2] == (split, per) for k in self._ragged):
            left_out = torch.nonzero(~eligible).flatten() + start
            if left_out.numel() and self.on_left_out is not None:
                self.on_left_out(split, per, left_out)
        largest = int(counts[eligible].max()) if bool(eligible.any()) else per
        cached = (counts.to(draw), eligible.to(draw), self.offsets[start:stop].to(draw), largest)
        self._ragged[key] = cached
        return cached

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else self.flat.device

    def to(self, device: torch.device | str) -> "EpisodeSampler":
        """Move the store to `device`; episodes are then built there. A store kept on the host (memory-mapped)
        stays; the episodes gathered from it are moved instead."""
        if self.keep_store_on_host:
            self._device = torch.device(device)
        else:
            self.flat = self.flat.to(device)
        self._layouts.clear()
        return self

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        if split not in self.ranges:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.ranges)}")
        n, k, q = ways or self.ways, shots or self.shots, queries or self.queries
        if (n, k, q) != (self.ways, self.shots, self.queries):
            self._check(n, k, q, [split], "episode ")
        start, stop = self.ranges[split]
        t, e = num_tasks, self.examples
        draw = generator.device
        if self.counts is not None:
            rows = self._ragged_rows(split, t, n, k, q, generator)
        else:
            scores = torch.rand(t, stop - start, generator=generator, device=draw)
            if self.groups is not None:  # only the classes of one group per task can win the top-N
                local = self.groups[start:stop].to(draw)
                eligible = self._eligible_groups(split, n).to(draw)
                chosen = eligible[torch.randint(len(eligible), (t,), generator=generator, device=draw)]
                scores = scores.masked_fill(local.unsqueeze(0) != chosen.unsqueeze(1), -1.0)
            classes = scores.topk(n, dim=1).indices  # [T, N]
            picks = torch.rand(t, n, e, generator=generator, device=draw).topk(k + q, dim=2).indices  # [T, N, K+Q]
            rows = picks.add_(classes.mul_(e).add_(start * e).unsqueeze(2))  # rows of the flat store
        order, support_y, query_y = self._layout(t, n, k, q, draw)
        # support rows of all tasks, then query rows: one gather, and both parts are contiguous views of it
        index = rows.view(-1).index_select(0, order).to(self.flat.device)
        # index_select on the flat store (advanced indexing on the 5-D store is ~20x slower); uint8 -> [0, 1].
        # Converting to float32 is most of the cost, and mul_ by 1/255 is ~1.5x faster than div_ by 255
        # (within 1 ulp of it): the batch is written once and rescaled once, nothing more.
        gathered = self.flat.index_select(0, index)
        if gathered.device != self.device:  # a store kept on the host: only the chosen images cross, as uint8
            gathered = gathered.to(self.device)
        images = gathered.to(torch.float32).mul_(1.0 / 255.0)
        if self.augment is not None and split == "train":
            images = self.augment(images, generator)
        support = images[: t * n * k].view(t, n * k, *self.image_shape)
        query = images[t * n * k:].view(t, n * q, *self.image_shape)
        # labels are fresh copies, so a consumer may modify them in place
        return TaskBatch(support, support_y.clone(), query, query_y.clone())

    def _ragged_rows(self, split: str, t: int, n: int, k: int, q: int, generator: torch.Generator) -> Tensor:
        """Rows [T, N, K+Q] of the flat store for classes of unequal size: the rectangular draw with masks. Classes
        with fewer than K+Q images score -1, so the top-N never picks them; within a class of c images the
        scores of positions >= c are -1, so the top-(K+Q) is a random (K+Q)-subset of its own c images."""
        draw = generator.device
        counts, eligible, offsets, largest = self._ragged_split(split, k + q, draw)
        scores = torch.rand(t, len(counts), generator=generator, device=draw).masked_fill_(~eligible, -1.0)
        classes = scores.topk(n, dim=1).indices  # [T, N], within the split
        noise = torch.rand(t, n, largest, generator=generator, device=draw)
        beyond = torch.arange(largest, device=draw) >= counts[classes].unsqueeze(2)  # past each class's last image
        picks = noise.masked_fill_(beyond, -1.0).topk(k + q, dim=2).indices  # [T, N, K+Q]
        return picks.add_(offsets[classes].unsqueeze(2))

    def _eligible_groups(self, split: str, ways: int) -> Tensor:
        """The groups of `split` with at least `ways` classes (within-group episodes draw among them); worked out
        once per (split, ways), not at every draw."""
        assert self.groups is not None
        cached = self._eligible.get((split, ways))
        if cached is not None:
            return cached
        start, stop = self.ranges[split]
        ids, counts = self.groups[start:stop].unique(return_counts=True)
        eligible = ids[counts >= ways]
        if eligible.numel() == 0:
            raise UserInputError(f"{ways}-way episodes within one group: no group of the {split} split of {self.name} "
                                 f"has {ways} classes (the largest has {int(counts.max()) if counts.numel() else 0})")
        self._eligible[(split, ways)] = eligible
        return eligible

    def _layout(self, t: int, n: int, k: int, q: int, draw: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Positions in a [T, N, K+Q] draw of its support entries (task, class, shot order), then of its query
        entries; and the class-major labels [T, N*K] and [T, N*Q] on the store's device."""
        key = (t, n, k, q, draw)
        layout = self._layouts.get(key)
        if layout is None:
            position = torch.arange(t * n * (k + q), device=draw).view(t, n, k + q)
            order = torch.cat((position[:, :, :k].reshape(-1), position[:, :, k:].reshape(-1)))
            labels = torch.arange(n, device=self.device)
            layout = (order, labels.repeat_interleave(k).repeat(t, 1), labels.repeat_interleave(q).repeat(t, 1))
            self._layouts[key] = layout
        return layout


class SamplerBackedBenchmark(Benchmark):
    """What the image benchmarks share once their store is built: episodes and device moves go to
    `self.sampler` (an EpisodeSampler), so each benchmark only reads its data format."""

    sampler: EpisodeSampler
    preprocess: Preprocess  # how the store's images were decoded: a user's files are decoded the same way

    def load_inputs(self, paths: Sequence[Path]) -> Tensor:
        """The files decoded as the store was (size, channels, inversion), as float32 in [0, 1]: value / 255,
        what the sampler gives; a file Pillow cannot read is one line naming it."""
        try:
            arrays = [decode_one(ImageRef(str(path)), self.preprocess) for path in paths]
        except DecodeError as ex:
            raise UserInputError(str(ex)) from None
        return torch.from_numpy(np.stack(arrays)).float().div_(255.0)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        """Episodes of the configured shape, or of another one when asked (see EpisodeSampler)."""
        return self.sampler.sample(split, num_tasks, generator, ways=ways, shots=shots, queries=queries)

    def to(self, device: torch.device | str) -> "SamplerBackedBenchmark":
        self.sampler.to(device)
        return self
