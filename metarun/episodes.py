"""TaskBatch: the one typed value that carries a batch of episodes through the system.

Support/query splitting happens exactly once, in a benchmark's sampler; everything
downstream reads these four tensors, each with a leading task dimension T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Batch(Protocol):
    """What the trainer, the evaluation and the distributed sharding need of a batch of tasks: TaskBatch
    (supervised episodes) and metarun.rl.envs.EnvBatch (reinforcement tasks) both are one."""

    @property
    def num_tasks(self) -> int: ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch": ...

    def slice(self, start: int, stop: int) -> "Batch": ...

    def normalisation_inputs(self) -> tuple[Tensor, ...]:
        """The inputs the backbone's running normalisation statistics follow (Backbone.update_running_stats)."""
        ...

    def task_groups(self) -> dict[str, Tensor]:
        """Named subsets of the tasks (name -> bool mask [T]) the evaluation also reports the headline metric
        on, as `<metric>/<name>` (benchmark=multimodal: its modes). Most batches: none."""
        ...


@dataclass(frozen=True)
class TaskBatch:
    """T tasks: support_x [T, S, *input], support_y [T, S] (labels) or [T, S, D] (targets), same for query."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TaskBatch":
        """Move to `device`; `dtype` converts floating inputs/targets only (labels stay integer)."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        return TaskBatch(move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y))

    def slice(self, start: int, stop: int) -> "TaskBatch":
        """Tasks start..stop-1 (views, no copy): used to chunk a pool for evaluation."""
        return TaskBatch(
            self.support_x[start:stop], self.support_y[start:stop], self.query_x[start:stop], self.query_y[start:stop]
        )

    def normalisation_inputs(self) -> tuple[Tensor, ...]:
        """Support and query images: what a per-task loop with nn.BatchNorm2d normalises with (see trainer)."""
        return self.support_x, self.query_x

    def task_groups(self) -> dict[str, Tensor]:
        return {}
