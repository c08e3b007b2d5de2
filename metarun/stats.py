"""Mean and 95% confidence interval over tasks: the one way every number in metarun is reported."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """Mean over finite per-task values, 1.96 * std / sqrt(n) half-width, and how many tasks were not finite."""

    mean: float
    ci95: float
    tasks: int
    nonfinite: int
    # the per-task values, in pool order: two runs scored on the same pool compare task by task (metarun compare)
    values: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci95": self.ci95, "tasks": self.tasks, "nonfinite_tasks": self.nonfinite}


def mean_ci95(values: Tensor) -> Estimate:
    """Estimate over tasks. Non-finite values (a diverged adaptation) are counted and left out, never
    averaged in silently: callers must show `nonfinite` next to the mean."""
    values = values.detach().double().flatten().cpu()
    per_task = tuple(values.tolist())
    finite = values[torch.isfinite(values)]
    n = int(finite.numel())
    nonfinite = int(values.numel()) - n
    if n == 0:
        return Estimate(float("nan"), float("nan"), int(values.numel()), nonfinite, per_task)
    mean = float(finite.mean())
    std = float(finite.std(unbiased=True)) if n > 1 else 0.0
    return Estimate(mean, 1.96 * std / math.sqrt(n), int(values.numel()), nonfinite, per_task)


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics (and RL's return) rise, errors, losses and RL's regret fall; `mse@3` (after 3
    steps) is judged as `mse`."""
    return metric.split("@")[0] not in ("mse", "loss", "regret")
