"""Bernoulli multi-armed bandits (Duan et al. 2016, "RL^2: Fast Reinforcement Learning via Slow Reinforcement
Learning", section 5.1): k arms with p ~ U[0, 1] each, n pulls per trial. The environment is metarun/rl/bandit.py.
"""

from __future__ import annotations

import functools

import torch

from metarun.benchmarks.base import Benchmark, TaskSpec
from metarun.defaults import option_defaults
from metarun.rl.bandit import make_bandit
from metarun.rl.checks import check_sample, integer_at_least
from metarun.rl.envs import EnvBatch, task_seeds

_DEFAULTS = option_defaults("benchmark", "bandit")


class BanditBenchmark(Benchmark):
    """Tasks are the arms' success probabilities; the splits share the distribution (their generators differ)."""

    def __init__(self, arms: int = _DEFAULTS["arms"], pulls: int = _DEFAULTS["pulls"]) -> None:
        self.arms = integer_at_least("benchmark.arms", arms, 2)
        self.pulls = integer_at_least("benchmark.pulls", pulls, 1)
        self.spec = TaskSpec(name="bandit", kind="reinforcement", input_shape=(1,), output_size=arms, ways=0,
                             shots=0, queries=0, horizon=1, episodes=pulls)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> EnvBatch:
        check_sample("bandit", split, ways, shots, queries)
        probs = torch.rand(num_tasks, self.arms, generator=generator)
        return EnvBatch({"probs": probs}, task_seeds(num_tasks, generator),
                        functools.partial(make_bandit, pulls=self.pulls))
