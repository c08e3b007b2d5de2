"""evaluate_pool: on CPU, image tasks are scored in forwards of at most CPU_EVAL_PIXELS input pixels, whatever
trainer.eval_batch_size says, and the estimates do not depend on how the pool is cut."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from metarun.benchmarks.base import TaskSpec
from metarun.episodes import TaskBatch
from metarun.evaluation import CPU_EVAL_PIXELS, evaluate_pool

SPEC = TaskSpec(name="toy", kind="classification", input_shape=(1, 16, 16), output_size=20, ways=20, shots=1,
                queries=15)


class ToyBenchmark:
    spec = SPEC

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        n_s, n_q = SPEC.ways * SPEC.shots, SPEC.ways * SPEC.queries
        return TaskBatch(torch.rand(num_tasks, n_s, 1, 16, 16, generator=generator),
                         torch.arange(SPEC.ways).repeat(num_tasks, 1),
                         torch.rand(num_tasks, n_q, 1, 16, 16, generator=generator),
                         torch.arange(SPEC.ways).repeat_interleave(SPEC.queries).repeat(num_tasks, 1))


class RecordingAlgorithm(torch.nn.Module):
    """Scores a task by its mean query pixel, and records how many tasks each call saw."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        self.calls.append(batch.num_tasks)
        return {"accuracy": batch.query_x.double().flatten(1).mean(dim=1)}


def test_image_tasks_are_cut_to_the_image_budget_with_the_same_estimates() -> None:
    per_task = SPEC.ways * (SPEC.shots + SPEC.queries) * 16 * 16  # 320 images of 16x16: 19 tasks per forward
    algorithm = RecordingAlgorithm()
    cut = evaluate_pool(algorithm, ToyBenchmark(), "test", 120, 0, torch.device("cpu"), batch_size=100)
    assert max(algorithm.calls) == CPU_EVAL_PIXELS // per_task < 50 and sum(algorithm.calls) == 120
    one_by_one = evaluate_pool(RecordingAlgorithm(), ToyBenchmark(), "test", 120, 0, torch.device("cpu"), batch_size=1)
    # equal up to the summation order of a float64 reduction (threads split it by batch shape)
    assert cut["accuracy"].mean == pytest.approx(one_by_one["accuracy"].mean, rel=1e-12)
    assert cut["accuracy"].tasks == one_by_one["accuracy"].tasks == 120
