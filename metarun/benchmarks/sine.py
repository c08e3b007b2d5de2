"""Sine-wave regression (Finn et al. 2017, "Model-Agnostic Meta-Learning", section 5.1).

Each task is y = A sin(x - phi) with A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metarun.benchmarks.base import SPLITS, Benchmark, TaskSpec, check_positive
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError


_DEFAULTS = option_defaults("benchmark", "sine")


class SineBenchmark(Benchmark):
    """K support and Q query points per task. Splits share the distribution; their generators differ."""

    def __init__(
        self,
        shots: int = _DEFAULTS["shots"],
        queries: int = _DEFAULTS["queries"],
        ways: int = _DEFAULTS["ways"],
        amplitude: Sequence[float] = _DEFAULTS["amplitude"],
        phase: Sequence[float] = _DEFAULTS["phase"],
        x_range: Sequence[float] = _DEFAULTS["x_range"],
        root: str | None = _DEFAULTS["root"],
    ) -> None:
        if ways != 1:
            raise UserInputError(f"benchmark=sine is regression with one output, so benchmark.ways must be 1 (got {ways})")
        check_positive(shots=shots, queries=queries)
        self.amplitude = (float(amplitude[0]), float(amplitude[1]))
        self.phase = (float(phase[0]), float(phase[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))
        self.spec = TaskSpec(
            name="sine", kind="regression", input_shape=(1,), output_size=1, ways=1, shots=shots, queries=queries
        )

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        if ways not in (None, 1):
            raise UserInputError(f"benchmark=sine has one output per task, so its episodes cannot be {ways}-way")
        shots, queries = shots or self.spec.shots, queries or self.spec.queries

        def uniform(low_high: tuple[float, float], *shape: int) -> torch.Tensor:
            low, high = low_high
            return low + (high - low) * torch.rand(*shape, generator=generator)

        amplitude = uniform(self.amplitude, num_tasks, 1, 1)
        phase = uniform(self.phase, num_tasks, 1, 1)
        x = uniform(self.x_range, num_tasks, shots + queries, 1)
        y = amplitude * torch.sin(x - phase)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
