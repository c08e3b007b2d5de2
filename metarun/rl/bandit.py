"""Bernoulli multi-armed bandits as a TrialEnv (Duan et al. 2016, "RL^2", section 5.1).

A task is k arms with success probabilities p [k]; a trial is n pulls, each an episode of one step (horizon 1),
so the policy's memory across episodes is what lets it learn the arms. The observation is a constant zero
(Duan et al. feed a dummy observation): everything the policy learns comes from its previous action and reward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarun.rl.envs import TrialEnv
from metarun.rl.noise import TaskNoise

_REWARD_STREAM = 0  # the environment's stream of the pulls' outcomes


class BanditEnv(TrialEnv):
    """T tasks x E trials of `pulls` pulls; reward = 1 with probability probs[task, action]."""

    observation_size = 1
    horizon = 1

    def __init__(self, probs: Tensor, trials_per_task: int, noise: TaskNoise, pulls: int) -> None:
        self.probs = probs  # [T, k]
        self.num_tasks, self.num_actions = probs.shape
        self.trials_per_task = trials_per_task
        self.episodes = pulls
        self.noise = noise
        self._t = 0
        self._observation = torch.zeros(self.num_tasks, trials_per_task, 1, dtype=probs.dtype, device=probs.device)
        self._done = torch.ones(self.num_tasks, trials_per_task, dtype=torch.bool, device=probs.device)

    def reset(self) -> Tensor:
        self._t = 0
        return self._observation

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._t >= self.episodes:
            raise RuntimeError(f"the trial has ended after {self.episodes} pulls; call reset()")
        p = self.probs.gather(1, actions)  # [T, E]: the pulled arm's probability
        u = self.noise.uniform(_REWARD_STREAM, self._t).to(p.dtype)
        self._t += 1
        return self._observation, (u < p).to(p.dtype), self._done

    def optimal_return(self) -> Tensor:
        """The best arm every pull: pulls x max p."""
        return self.episodes * self.probs.max(dim=-1).values


def make_bandit(params: dict[str, Tensor], trials_per_task: int, noise: TaskNoise, *, pulls: int) -> BanditEnv:
    """EnvBatch's maker (with `pulls` bound by the benchmark)."""
    return BanditEnv(params["probs"], trials_per_task, noise, pulls)
