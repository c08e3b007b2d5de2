"""N-way K-shot Q-query episodes as index arithmetic on a class-indexed uint8 tensor store.

The store is `[classes, examples, C, H, W]` with each split's classes contiguous (`ranges`). A batch
of T tasks costs two small random draws and two `index_select`s on the flattened store, on whatever
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
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarun.episodes import TaskBatch
from metarun.errors import UserInputError


class EpisodeSampler:
    """Draws TaskBatches [T, N*K, C, H, W] float32 in [0, 1] from a uint8 store (255 -> 1.0)."""

    def __init__(self, store: Tensor, ranges: dict[str, tuple[int, int]], ways: int, shots: int, queries: int,
                 name: str = "benchmark") -> None:
        if store.dtype != torch.uint8 or store.dim() != 5:
            raise ValueError(f"the store must be uint8 [classes, examples, C, H, W] (got {store.dtype} {tuple(store.shape)})")
        examples = store.shape[1]
        if shots + queries > examples:
            raise UserInputError(f"benchmark.shots + benchmark.queries = {shots} + {queries} = {shots + queries} "
                                 f"but {name} has {examples} examples per class; lower shots or queries")
        for split, (start, stop) in ranges.items():
            if ways > stop - start:
                raise UserInputError(f"benchmark.ways={ways} but the {split} split of {name} has only "
                                     f"{stop - start} classes; use benchmark.ways <= {stop - start}")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.ranges = dict(ranges)
        self.examples = examples
        self.image_shape = tuple(store.shape[2:])
        self.flat = store.reshape(-1, *self.image_shape)  # [classes * examples, C, H, W]: one index per image
        # label of each support/query position, class-major; shared by all tasks
        self.support_labels = torch.arange(ways).repeat_interleave(shots)
        self.query_labels = torch.arange(ways).repeat_interleave(queries)

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def to(self, device: torch.device | str) -> "EpisodeSampler":
        """Move the store (and the label templates) to `device`; episodes are then built there."""
        self.flat = self.flat.to(device)
        self.support_labels = self.support_labels.to(device)
        self.query_labels = self.query_labels.to(device)
        return self

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        if split not in self.ranges:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.ranges)}")
        start, stop = self.ranges[split]
        n, k, q, e = self.ways, self.shots, self.queries, self.examples
        draw = generator.device
        classes = torch.rand(num_tasks, stop - start, generator=generator, device=draw).topk(n, dim=1).indices
        picks = torch.rand(num_tasks, n, e, generator=generator, device=draw).topk(k + q, dim=2).indices
        index = ((classes + start) * e).unsqueeze(2) + picks  # [T, N, K+Q] rows of the flat store
        index = index.to(self.device)
        support = self._gather(index[:, :, :k], num_tasks * n * k).view(num_tasks, n * k, *self.image_shape)
        query = self._gather(index[:, :, k:], num_tasks * n * q).view(num_tasks, n * q, *self.image_shape)
        # labels are copied per task (repeat, not expand) so a consumer may modify them in place
        return TaskBatch(support, self.support_labels.repeat(num_tasks, 1), query, self.query_labels.repeat(num_tasks, 1))

    def _gather(self, index: Tensor, count: int) -> Tensor:
        # index_select on the flat store: one contiguous gather (advanced indexing on the 5-D store is ~20x slower)
        return self.flat.index_select(0, index.reshape(count)).to(torch.float32).div_(255.0)
