"""Random tabular MDPs (Duan et al. 2016, "RL^2", section 5.2): 10 states, 5 actions, Gaussian rewards whose
means are N(1, 1), flat-Dirichlet transitions, episodes of 10 steps, n episodes per trial.

Episodes start in the first state: "an episode always starts on the first state" (Duan et al. 2016, as quoted
in tristandeleu/pytorch-maml-rl's TabularMDPEnv, whose earlier version drew the start uniformly;
lucaslingle/pytorch_rl2 also starts in state 0). Under this task distribution the states are exchangeable, so a
uniform start (`initial_state: uniform`) changes the variance of a trial, not what can be learned.
The environment is metarun/rl/tabular_mdp.py.
"""

from __future__ import annotations

import functools

import torch

from metarun.benchmarks.base import Benchmark, TaskSpec
from metarun.defaults import option_defaults
from metarun.errors import UserInputError
from metarun.rl.checks import check_sample, integer_at_least
from metarun.rl.envs import EnvBatch, task_seeds
from metarun.rl.tabular_mdp import DIRICHLET_CONCENTRATION, REWARD_MEAN_PRIOR, make_tabular_mdp

_DEFAULTS = option_defaults("benchmark", "tabular_mdp")
INITIAL_STATES = ("uniform", "first")


class TabularMDPBenchmark(Benchmark):
    """Tasks are (transitions [S, A, S], mean rewards [S, A], start distribution [S]), drawn at `sample`."""

    def __init__(self, states: int = _DEFAULTS["states"], actions: int = _DEFAULTS["actions"],
                 horizon: int = _DEFAULTS["horizon"], episodes: int = _DEFAULTS["episodes"],
                 initial_state: str = _DEFAULTS["initial_state"]) -> None:
        self.states = integer_at_least("benchmark.states", states, 1)
        self.actions = integer_at_least("benchmark.actions", actions, 2)
        self.horizon = integer_at_least("benchmark.horizon", horizon, 1)
        self.episodes = integer_at_least("benchmark.episodes", episodes, 1)
        if initial_state not in INITIAL_STATES:
            raise UserInputError(f"benchmark.initial_state must be one of {', '.join(INITIAL_STATES)} "
                                 f"(got {initial_state!r})")
        self.initial_state = initial_state
        self.spec = TaskSpec(name="tabular_mdp", kind="reinforcement", input_shape=(states,), output_size=actions,
                             ways=0, shots=0, queries=0, horizon=horizon, episodes=episodes)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> EnvBatch:
        check_sample("tabular_mdp", split, ways, shots, queries)
        S, A = self.states, self.actions
        mean, std = REWARD_MEAN_PRIOR
        reward_means = mean + std * torch.randn(num_tasks, S, A, generator=generator)
        # a flat Dirichlet is normalised unit-rate exponentials (Gamma(1) draws)
        assert DIRICHLET_CONCENTRATION == 1.0
        weights = torch.empty(num_tasks, S, A, S).exponential_(generator=generator)
        transitions = weights / weights.sum(-1, keepdim=True)
        initial = torch.zeros(num_tasks, S)
        if self.initial_state == "uniform":
            initial += 1.0 / S
        else:
            initial[:, 0] = 1.0
        params = {"transitions": transitions, "reward_means": reward_means, "initial": initial}
        return EnvBatch(params, task_seeds(num_tasks, generator),
                        functools.partial(make_tabular_mdp, horizon=self.horizon, episodes=self.episodes))
