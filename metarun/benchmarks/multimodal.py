"""Multimodal few-shot regression (Vuorio, Sun, Hu and Lim, "Multimodal Model-Agnostic Meta-Learning via
Task-Aware Modulation", NeurIPS 2019, section 5.1).

A task is one function drawn from one of several families (its mode), with x ~ U[-5, 5] and Gaussian noise
(sigma 0.3) on every target; ranges as in the authors' released code (vuoristo/MMAML-Regression):

    sinusoid   A sin(x - phi)              A ~ U[0.1, 5], phi ~ U[0, pi]
    linear     a x + b                     a, b ~ U[-3, 3]
    quadratic  s q (x - c)^2 + beta        q ~ U[0.02, 0.15], s = +-1, c, beta ~ U[-3, 3]
    tanh       a tanh(x - c) + beta        a, c, beta ~ U[-3, 3]
    l1_norm    a |x - c| + beta            a, c, beta ~ U[-3, 3]  (the paper's "transformed l1 norm")

The modes of a batch are balanced as in the paper's meta-batches (each mode T / M times, up to one), in a
random order. Each task's mode and coefficients travel with its episode (ModalTaskBatch), so an algorithm
can report per-mode metrics (`mse/<mode>`) and draw its task embeddings coloured by mode, and the oracle
Multi-MAML can pick the network of the task's true mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metarun.benchmarks.base import SPLITS, Benchmark, TaskSpec, check_positive
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError, closest

# Every family, in the order of the paper's task ids; a mode's index in a batch is its index here, whichever
# subset `benchmark.modes` chooses, so a checkpoint's per-mode parts mean the same family on any subset.
FAMILIES: tuple[str, ...] = ("sinusoid", "linear", "quadratic", "tanh", "l1_norm")


@dataclass(frozen=True)
class ModalTaskBatch(TaskBatch):
    """A TaskBatch whose tasks know their family: mode [T] (index into FAMILIES) and coefficients [T, 3]
    (sinusoid: A, phi, 0; linear: a, b, 0; quadratic: s q, c, beta; tanh and l1_norm: a, c, beta)."""

    mode: Tensor
    coefficients: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModalTaskBatch":
        base = TaskBatch.to(self, device, dtype)
        coefficients = self.coefficients.to(device=device, dtype=dtype or self.coefficients.dtype)
        return ModalTaskBatch(base.support_x, base.support_y, base.query_x, base.query_y,
                              self.mode.to(device), coefficients)

    def task_groups(self) -> dict[str, Tensor]:
        """Each mode present in the batch: the evaluation reports `mse/<mode>` for every algorithm."""
        return {FAMILIES[index]: self.mode == index for index in self.mode.unique().tolist()}

    def slice(self, start: int, stop: int) -> "ModalTaskBatch":
        base = TaskBatch.slice(self, start, stop)
        return ModalTaskBatch(base.support_x, base.support_y, base.query_x, base.query_y,
                              self.mode[start:stop], self.coefficients[start:stop])


def family_outputs(mode: Tensor, coefficients: Tensor, x: Tensor) -> Tensor:
    """Noise-free targets of T tasks: mode [T], coefficients [T, 3], x [T, N, 1] -> y [T, N, 1]. Every family
    is computed for every task and the task's own is kept: five elementwise formulas cost less than indexing."""
    first, second, third = (coefficients[:, i].view(-1, 1, 1) for i in range(3))
    values = {
        "sinusoid": first * torch.sin(x - second),
        "linear": first * x + second,
        "quadratic": first * (x - second).square() + third,
        "tanh": first * torch.tanh(x - second) + third,
        "l1_norm": first * (x - second).abs() + third,
    }
    y = torch.zeros_like(x)
    for index, family in enumerate(FAMILIES):
        y = torch.where(mode.view(-1, 1, 1) == index, values[family], y)
    return y


def per_mode(batch: TaskBatch, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """`<key>/<mode>`: each per-task metric [T] restricted to the tasks of one mode, for a ModalTaskBatch
    (nothing for other batches). The evaluation concatenates them over the pool like any metric, so
    results.json's `test/metrics` gets each mode's mean and CI over that mode's tasks."""
    if not isinstance(batch, ModalTaskBatch):
        return {}
    out: dict[str, Tensor] = {}
    for index in batch.mode.unique().tolist():
        chosen = batch.mode == index
        for key, values in metrics.items():
            out[f"{key}/{FAMILIES[index]}"] = values[chosen]
    return out


_DEFAULTS = option_defaults("benchmark", "multimodal")


def _interval(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2 or float(value[0]) > float(value[1]):
        raise UserInputError(f"benchmark.{name} must be [low, high] with low <= high (got {list(value)})")
    return float(value[0]), float(value[1])


class MultimodalBenchmark(Benchmark):
    """Tasks from a mixture of function families (Vuorio et al. 2019); splits share the distribution, their
    generators differ (as benchmark=sine)."""

    def __init__(
        self,
        shots: int = _DEFAULTS["shots"],
        queries: int = _DEFAULTS["queries"],
        ways: int = _DEFAULTS["ways"],
        modes: Sequence[str] = _DEFAULTS["modes"],
        noise_std: float = _DEFAULTS["noise_std"],
        x_range: Sequence[float] = _DEFAULTS["x_range"],
        amplitude: Sequence[float] = _DEFAULTS["amplitude"],
        phase: Sequence[float] = _DEFAULTS["phase"],
        slope: Sequence[float] = _DEFAULTS["slope"],
        intercept: Sequence[float] = _DEFAULTS["intercept"],
        curvature: Sequence[float] = _DEFAULTS["curvature"],
        center: Sequence[float] = _DEFAULTS["center"],
        bias: Sequence[float] = _DEFAULTS["bias"],
        root: str | None = _DEFAULTS["root"],
    ) -> None:
        if ways != 1:
            raise UserInputError(f"benchmark=multimodal is regression with one output, so benchmark.ways must be 1 "
                                 f"(got {ways})")
        check_positive(shots=shots, queries=queries)
        if noise_std < 0:
            raise UserInputError(f"benchmark.noise_std must be >= 0 (got {noise_std})")
        modes = [str(m) for m in modes]
        if not modes:
            raise UserInputError(f"benchmark.modes is empty; list one or more of {', '.join(FAMILIES)}")
        for mode in modes:
            if mode not in FAMILIES:
                raise UserInputError(f"benchmark.modes: unknown mode '{mode}'{closest(mode, FAMILIES)}; "
                                     f"the modes are {', '.join(FAMILIES)}")
        if len(set(modes)) != len(modes):
            raise UserInputError(f"benchmark.modes lists a mode twice ({modes}); list each once")
        self.modes = tuple(modes)
        self.mode_index = torch.tensor([FAMILIES.index(m) for m in modes])
        self.noise_std = float(noise_std)
        self.ranges = {name: _interval(name, value) for name, value in (
            ("x_range", x_range), ("amplitude", amplitude), ("phase", phase), ("slope", slope),
            ("intercept", intercept), ("curvature", curvature), ("center", center), ("bias", bias))}
        self.spec = TaskSpec(name="multimodal", kind="regression", input_shape=(1,), output_size=1, ways=1,
                             shots=shots, queries=queries)

    def coefficient_ranges(self, family: str) -> tuple[tuple[float, float], ...]:
        """The U[low, high] of each of a family's three coefficients (the third unused: (0, 0))."""
        r = self.ranges
        return {"sinusoid": (r["amplitude"], r["phase"], (0.0, 0.0)),
                "linear": (r["slope"], r["intercept"], (0.0, 0.0)),
                "quadratic": (r["curvature"], r["center"], r["bias"]),
                "tanh": (r["slope"], r["center"], r["bias"]),
                "l1_norm": (r["slope"], r["center"], r["bias"])}[family]

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> ModalTaskBatch:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        if ways not in (None, 1):
            raise UserInputError(f"benchmark=multimodal has one output per task, so its episodes cannot be {ways}-way")
        shots, queries = shots or self.spec.shots, queries or self.spec.queries
        # balanced modes in a random order (the paper's meta-batches hold T / M tasks of each mode)
        order = torch.randperm(num_tasks, generator=generator)
        mode = self.mode_index[order % len(self.modes)]
        # the same draws for every family (three uniforms and a sign per task), so a task's numbers do not
        # depend on which families the other tasks of the batch belong to
        unit = torch.rand(num_tasks, 3, generator=generator)
        sign = torch.where(torch.rand(num_tasks, generator=generator) < 0.5, -1.0, 1.0)
        low = torch.zeros(len(FAMILIES), 3)
        high = torch.zeros(len(FAMILIES), 3)
        for index, family in enumerate(FAMILIES):
            for j, (a, b) in enumerate(self.coefficient_ranges(family)):
                low[index, j], high[index, j] = a, b
        coefficients = low[mode] + (high[mode] - low[mode]) * unit
        quadratic = mode == FAMILIES.index("quadratic")
        coefficients[:, 0] = torch.where(quadratic, sign * coefficients[:, 0], coefficients[:, 0])
        x_low, x_high = self.ranges["x_range"]
        x = x_low + (x_high - x_low) * torch.rand(num_tasks, shots + queries, 1, generator=generator)
        y = family_outputs(mode, coefficients, x)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=generator)
        return ModalTaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], mode, coefficients)
