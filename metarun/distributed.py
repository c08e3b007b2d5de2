"""Data parallelism over tasks for `torchrun --nproc_per_node=N -m metarun train ...`.

Every rank draws the same global meta-batch from the same seeded generator and keeps its own slice,
so episodes are disjoint across ranks, reproducible, and together exactly the single-process batch.
After backward, gradients are averaged with an explicit all-reduce: the meta-gradient (second order
included) is computed locally by autograd, so nothing in the double backward has to cross processes.
Rank 0 alone validates, logs and checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from metarun.episodes import TaskBatch
from metarun.errors import UserInputError


class Distributed:
    """World size 1 makes every method a no-op, so the trainer has one code path."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_divides(self, meta_batch_size: int) -> None:
        if meta_batch_size % self.world_size:
            raise UserInputError(f"trainer.meta_batch_size={meta_batch_size} must be divisible by the "
                                 f"{self.world_size} processes of torchrun")

    def shard(self, batch: TaskBatch) -> TaskBatch:
        if self.world_size == 1:
            return batch
        per_rank = batch.num_tasks // self.world_size
        return batch.slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank scalar over ranks (logged losses and metrics match one process)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
