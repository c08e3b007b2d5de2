"""Finn et al. 2017's 2D point navigation (MAML, section 5.3 / appendix A.2): a goal per task, uniform in
`goal_range`^2 (the paper's [-0.5, 0.5]^2), episodes of `horizon` (100) steps from the origin. The environment,
its continuous actions and the facts' sources are in metarun/rl/navigation2d.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from metarun.benchmarks.base import Benchmark, TaskSpec
from metarun.defaults import option_defaults
from metarun.errors import UserInputError
from metarun.rl.checks import check_sample, integer_at_least
from metarun.rl.envs import EnvBatch, task_seeds
from metarun.rl.navigation2d import OBSERVATION_SIZE, Navigation2DEnv, make_navigation2d

_DEFAULTS = option_defaults("benchmark", "navigation2d")


def _number(value: object) -> float | None:
    """A finite float, or None (YAML gives "0.5", True or .nan as easily as 0.5)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def goal_range_of(value: object) -> tuple[float, float]:
    """(low, high) with low < high, both finite, or one UserInputError line."""
    pair = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None  # ListConfig too
    bounds = [_number(v) for v in pair] if pair is not None and len(pair) == 2 else None
    if bounds is None or None in bounds or not bounds[0] < bounds[1]:
        raise UserInputError(f"benchmark.goal_range must be two finite numbers [low, high] with low < high "
                             f"(got {value!r}); Finn et al.: [-0.5, 0.5]")
    return bounds[0], bounds[1]


def _non_negative(key: str, value: object, strictly: bool = False) -> float:
    number = _number(value)
    if number is None or number < 0 or (strictly and number == 0):
        raise UserInputError(f"benchmark.{key} must be a finite number {'>' if strictly else '>='} 0 "
                             f"(got {value!r})")
    return number


class Navigation2DBenchmark(Benchmark):
    """Tasks are goals [T, 2] drawn at `sample` from the generator; the splits share the distribution."""


    def __init__(self, horizon: int = _DEFAULTS["horizon"], episodes: int = _DEFAULTS["episodes"],
                 goal_range: tuple[float, float] = _DEFAULTS["goal_range"],
                 goal_tolerance: float = _DEFAULTS["goal_tolerance"],
                 action_scale: float = _DEFAULTS["action_scale"]) -> None:
        self.horizon = integer_at_least("benchmark.horizon", horizon, 1)
        self.episodes = integer_at_least("benchmark.episodes", episodes, 1)
        self.goal_range = goal_range_of(goal_range)
        self.goal_tolerance = _non_negative("goal_tolerance", goal_tolerance)
        self.action_scale = _non_negative("action_scale", action_scale, strictly=True)
        self.spec = TaskSpec(name="navigation2d", kind="reinforcement", input_shape=(OBSERVATION_SIZE,),
                             output_size=Navigation2DEnv.action_size, ways=0, shots=0, queries=0,
                             horizon=self.horizon, episodes=self.episodes, continuous_actions=True)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> EnvBatch:
        check_sample("navigation2d", split, ways, shots, queries)
        low, high = self.goal_range
        goals = low + (high - low) * torch.rand(num_tasks, OBSERVATION_SIZE, generator=generator)
        return EnvBatch({"goals": goals}, task_seeds(num_tasks, generator),
                        functools.partial(make_navigation2d, horizon=self.horizon, episodes=self.episodes,
                                          goal_tolerance=self.goal_tolerance, action_scale=self.action_scale))
