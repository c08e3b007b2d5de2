"""The bandit baselines of Duan et al. 2016's Table 1, batched over [T, E]: random, UCB1, Thompson sampling and
the (finite-horizon) Gittins index. Their memory is each arm's successes and failures [T, E, k]; ties between the
best arms are broken uniformly at random (all arms tie at the first pull) from the policy's noise streams.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metarun.rl.envs import TrialEnv
from metarun.rl.gittins import gittins_table
from metarun.rl.noise import POLICY_STREAM, TaskNoise
from metarun.rl.posterior import beta
from metarun.rl.rollout import RolloutPolicy, StepInput

_TIE_STREAM = POLICY_STREAM  # random tie-breaks and random actions
_SAMPLE_STREAM = POLICY_STREAM + 1  # posterior draws (three streams)

Counts = tuple[Tensor, Tensor]  # successes, failures: [T, E, k]


def choose_best(scores: Tensor, noise: TaskNoise, step: int) -> Tensor:
    """argmax over the last dimension with ties broken uniformly at random: [T, E, K] -> [T, E] long."""
    best = scores.max(dim=-1, keepdim=True).values
    tied = (scores >= best).to(scores.dtype)
    return noise.categorical(_TIE_STREAM, step, tied / tied.sum(-1, keepdim=True))


class RandomPolicy(RolloutPolicy):
    """Uniformly random actions: the floor of every table (Duan et al.'s "Random")."""

    def __init__(self, num_actions: int) -> None:
        self.num_actions = num_actions

    def start(self, env: TrialEnv) -> None:
        return None

    def act(self, step: StepInput, memory: None, t: int, noise: TaskNoise) -> tuple[Tensor, None, dict[str, Tensor]]:
        u = noise.uniform(_TIE_STREAM, t)
        return (u * self.num_actions).long().clamp_max(self.num_actions - 1), None, {}


class _CountingPolicy(RolloutPolicy):
    """Keeps each arm's successes and failures; subclasses score the arms from them."""

    def __init__(self, arms: int, pulls: int) -> None:
        self.arms = arms
        self.pulls = pulls

    def start(self, env: TrialEnv) -> Counts:
        zeros = torch.zeros(env.num_tasks, env.trials_per_task, self.arms, device=env.noise.seeds.device)
        return zeros, zeros.clone()

    def act(self, step: StepInput, memory: Counts, t: int,
            noise: TaskNoise) -> tuple[Tensor, Counts, dict[str, Tensor]]:
        successes, failures = memory
        if t > 0:  # the previous pull's outcome
            pulled = torch.nn.functional.one_hot(step.prev_action, self.arms).to(successes.dtype)
            reward = step.prev_reward.to(successes.dtype).unsqueeze(-1)
            successes, failures = successes + pulled * reward, failures + pulled * (1.0 - reward)
        return self.choose(successes, failures, t, noise), (successes, failures), {}

    def choose(self, successes: Tensor, failures: Tensor, t: int, noise: TaskNoise) -> Tensor:
        raise NotImplementedError


class UCB1(_CountingPolicy):
    """Auer, Cesa-Bianchi and Fischer 2002: pull each arm once, then argmax mean + c sqrt(2 ln t / n_i), t the
    pulls so far (c = 1 is Auer et al.'s UCB1; Duan et al. tune c)."""

    def __init__(self, arms: int, pulls: int, c: float) -> None:
        super().__init__(arms, pulls)
        self.c = c

    def choose(self, successes: Tensor, failures: Tensor, t: int, noise: TaskNoise) -> Tensor:
        if t < self.arms:
            return torch.full(successes.shape[:2], t, dtype=torch.long, device=successes.device)
        pulls = successes + failures
        return choose_best(successes / pulls + self.c * torch.sqrt(2.0 * math.log(t) / pulls), noise, t)


class Thompson(_CountingPolicy):
    """Thompson sampling with a Beta(1, 1) prior per arm: pull the arm whose posterior draw is largest."""

    def choose(self, successes: Tensor, failures: Tensor, t: int, noise: TaskNoise) -> Tensor:
        return choose_best(beta(noise, _SAMPLE_STREAM, t, 1.0 + successes, 1.0 + failures), noise, t)


class Gittins(_CountingPolicy):
    """The finite-horizon Gittins index with a Beta(1, 1) prior (metarun/rl/gittins.py): with k = n - t pulls
    left, pull the arm of largest nu_k(successes, failures)."""

    def __init__(self, arms: int, pulls: int) -> None:
        super().__init__(arms, pulls)
        self.table = gittins_table(pulls)  # [n + 1, n + 1, n + 1], built or loaded once per process

    def choose(self, successes: Tensor, failures: Tensor, t: int, noise: TaskNoise) -> Tensor:
        left = self.table[self.pulls - t].to(device=successes.device)  # [n + 1, n + 1] over (s, f)
        index = left[successes.long(), failures.long()]
        return choose_best(index, noise, t)
