"""Any Gymnasium environment (discrete or Box actions) as a meta-RL benchmark: a task is a value of one attribute of
the environment (`task_parameter`, uniform over `task_range`), e.g. CartPole's gravity. Stepped through
Gymnasium's vector API (metarun/rl/gym_env.py). Gymnasium is the optional extra `rl`: without it, constructing
the benchmark is one line saying what to install.

CartPole's default parameter is `gravity` rather than the pole's `length`: CartPoleEnv derives
`polemass_length` from `length` once, in its constructor, so setting `length` afterwards changes only part of
the dynamics; `gravity` enters the equations directly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from metarun.benchmarks.base import Benchmark, TaskSpec
from metarun.defaults import option_defaults
from metarun.errors import UserInputError
from metarun.rl.checks import check_sample, integer_at_least
from metarun.rl.envs import EnvBatch, task_seeds
from metarun.rl.gym_env import TASK_REWARDS, make_gym, probe

_DEFAULTS = option_defaults("benchmark", "gym")


class GymBenchmark(Benchmark):
    """Checks the environment once at construction (id, spaces, attribute); builds T x E copies per rollout."""

    def __init__(self, env_id: str = _DEFAULTS["env_id"], task_parameter: str | None = _DEFAULTS["task_parameter"],
                 task_range: Sequence[float] = _DEFAULTS["task_range"], horizon: int = _DEFAULTS["horizon"],
                 episodes: int = _DEFAULTS["episodes"], task_reward: str | None = _DEFAULTS["task_reward"]) -> None:
        self.horizon = integer_at_least("benchmark.horizon", horizon, 1)
        self.episodes = integer_at_least("benchmark.episodes", episodes, 1)
        if isinstance(task_range, (str, bytes)) or not isinstance(task_range, Sequence) or len(task_range) != 2 \
                or not float(task_range[0]) <= float(task_range[1]):
            raise UserInputError(f"benchmark.task_range must be [lo, hi] with lo <= hi (got {list(task_range)})")
        self.task_range = (float(task_range[0]), float(task_range[1]))
        self.env_id = str(env_id)
        self.task_parameter = task_parameter
        if task_reward is not None and task_reward not in TASK_REWARDS:
            raise UserInputError(f"benchmark.task_reward must be null or one of {', '.join(TASK_REWARDS)} "
                                 f"(got {task_reward!r})")
        self.task_reward = task_reward
        observation_size, num_actions, action_size = probe(self.env_id, task_parameter)
        self.spec = TaskSpec(name="gym", kind="reinforcement", input_shape=(observation_size,),
                             output_size=num_actions or action_size, ways=0, shots=0, queries=0, horizon=horizon,
                             episodes=episodes, continuous_actions=action_size > 0)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> EnvBatch:
        check_sample("gym", split, ways, shots, queries)
        lo, hi = self.task_range
        values = lo + (hi - lo) * torch.rand(num_tasks, generator=generator, dtype=torch.float64)
        maker = functools.partial(make_gym, env_id=self.env_id, task_parameter=self.task_parameter,
                                  horizon=self.horizon, episodes=self.episodes, reward=self.task_reward)
        return EnvBatch({"task_value": values}, task_seeds(num_tasks, generator), maker)
