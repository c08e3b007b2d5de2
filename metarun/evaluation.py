"""Score an algorithm on a benchmark's fixed task pool: mean and 95% CI per metric."""

from __future__ import annotations

from collections import defaultdict

import torch

from metarun.algorithms.base import MetaAlgorithm
from metarun.benchmarks.base import Benchmark, task_pool
from metarun.defaults import option_defaults
from metarun.stats import Estimate, mean_ci95

_TRAINER = option_defaults("trainer", "default")  # the pool's size and seed, as `metarun train` tests with

# Input pixels per evaluation forward on CPU (2,048 Omniglot images of 28x28). The task batch
# (trainer.eval_batch_size) is cut so that one forward holds at most this many: 50 Omniglot 20-way 1-shot
# tasks at once are 16,000 images, a 3.2 GB first activation, and their evaluation spent most of its time in
# the kernel allocating pages (measured: 66 s -> 48 s for 200 tasks, kernel time 44 s -> 9 s). Counting pixels
# rather than images keeps the activations of 84x84 miniImageNet tasks to the same size.
CPU_EVAL_PIXELS = 2048 * 28 * 28


def evaluate_pool(
    algorithm: MetaAlgorithm,
    benchmark: Benchmark,
    split: str = "test",
    num_tasks: int = _TRAINER["eval_tasks"],
    pool_seed: int = _TRAINER["pool_seed"],
    device: torch.device | None = None,
    batch_size: int = _TRAINER["eval_batch_size"],
) -> dict[str, Estimate]:
    """Per-task metrics over the pool, reduced to estimates. The algorithm is put in eval mode and back.
    `device` None: the device of the algorithm's parameters."""
    if device is None:
        device = next(algorithm.parameters()).device  # type: ignore[attr-defined]
    spec = benchmark.spec
    if device.type == "cpu" and spec.is_image:
        pixels_per_task = spec.ways * (spec.shots + spec.queries) * spec.input_shape[1] * spec.input_shape[2]
        batch_size = max(1, min(batch_size, CPU_EVAL_PIXELS // pixels_per_task))
    was_training = algorithm.training  # type: ignore[attr-defined]
    algorithm.eval()  # type: ignore[attr-defined]
    values: dict[str, list[torch.Tensor]] = defaultdict(list)
    try:
        for chunk in task_pool(benchmark, split, num_tasks, pool_seed):
            for start in range(0, chunk.num_tasks, batch_size):
                batch = chunk.slice(start, start + batch_size).to(device)
                scores = algorithm.evaluate(batch)
                metric = scores[benchmark.spec.metric]
                # named subsets of the tasks (multimodal's modes): the headline metric on each, for every algorithm
                scores.update({f"{benchmark.spec.metric}/{name}": metric[mask]
                               for name, mask in batch.task_groups().items()
                               if f"{benchmark.spec.metric}/{name}" not in scores})
                for key, per_task in scores.items():
                    values[key].append(per_task.detach().cpu())
    finally:
        algorithm.train(was_training)  # type: ignore[attr-defined]
    return {key: mean_ci95(torch.cat(parts)) for key, parts in values.items()}
