"""The tabular-MDP baselines, batched over [T, E]: posterior sampling (PSRL) and its greedy counterpart.

Both keep the exact posterior of the task distribution (metarun/rl/tabular_mdp.py): Dirichlet(1 + counts) on
each (s, a)'s next state, and N(m, 1/precision) on its mean reward from the N(1, 1) prior and unit-variance
rewards. At the start of each episode PSRL (Osband, Russo and Van Roy 2013, "(More) efficient reinforcement
learning via posterior sampling") draws one MDP from the posterior and follows its finite-horizon optimal policy
for the episode; `greedy` plans on the posterior mean instead (no exploration beyond the prior's optimism).
The last step of an episode shows a reward but no transition (the environment resets), so it updates the
reward posterior only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metarun.rl.bandit_policies import choose_best
from metarun.rl.envs import TrialEnv
from metarun.rl.noise import POLICY_STREAM, TaskNoise
from metarun.rl.posterior import STREAMS, dirichlet
from metarun.rl.rollout import RolloutPolicy, StepInput
from metarun.rl.tabular_mdp import DIRICHLET_CONCENTRATION, REWARD_MEAN_PRIOR, REWARD_NOISE_STD, plan

_TRANSITION_STREAM = POLICY_STREAM + 1  # three streams (Gamma draws)
_REWARD_STREAM = _TRANSITION_STREAM + STREAMS  # two streams (normal draws)


@dataclass
class Posterior:
    """Sufficient statistics of T x E trials so far, and the plan of the current episode."""

    transitions: Tensor  # [T, E, S, A, S] observed transition counts
    visits: Tensor  # [T, E, S, A] rewards observed per pair
    reward_sum: Tensor  # [T, E, S, A]
    state: Tensor  # [T, E] long: the state the last action was taken in
    q: Tensor | None = None  # [H, T, E, S, A] the episode's plan (metarun.rl.tabular_mdp.plan)


class _PlanningPolicy(RolloutPolicy):
    def __init__(self, states: int, actions: int, horizon: int) -> None:
        self.states, self.actions, self.horizon = states, actions, horizon

    def start(self, env: TrialEnv) -> Posterior:
        T, E, S, A = env.num_tasks, env.trials_per_task, self.states, self.actions
        device = env.noise.seeds.device
        return Posterior(torch.zeros(T, E, S, A, S, device=device), torch.zeros(T, E, S, A, device=device),
                         torch.zeros(T, E, S, A, device=device), torch.zeros(T, E, dtype=torch.long, device=device))

    def act(self, step: StepInput, memory: Posterior, t: int,
            noise: TaskNoise) -> tuple[Tensor, Posterior, dict[str, Tensor]]:
        state = step.observation.argmax(-1)
        if t > 0:
            self._update(memory, step, state)
        if t % self.horizon == 0:
            memory.q = plan(*self.model(memory, t, noise), self.horizon)
        values = memory.q[self.horizon - 1 - t % self.horizon]  # [T, E, S, A] with the episode's steps left
        q = values.gather(2, state[:, :, None, None].expand(-1, -1, 1, self.actions)).squeeze(2)
        memory.state = state
        return choose_best(q, noise, t), memory, {}

    def _update(self, memory: Posterior, step: StepInput, state: Tensor) -> None:
        T, E, S, A = memory.visits.shape
        pair = (memory.state * A + step.prev_action).unsqueeze(-1)  # [T, E, 1] index of (s, a)
        dtype = memory.visits.dtype
        memory.visits.view(T, E, S * A).scatter_add_(2, pair, torch.ones_like(pair, dtype=dtype))
        memory.reward_sum.view(T, E, S * A).scatter_add_(2, pair, step.prev_reward.unsqueeze(-1).to(dtype))
        seen = (~step.prev_done).to(dtype).unsqueeze(-1)  # no transition across an episode's end
        memory.transitions.view(T, E, S * A * S).scatter_add_(2, pair * S + state.unsqueeze(-1), seen)

    def reward_posterior(self, memory: Posterior) -> tuple[Tensor, Tensor]:
        """(mean, standard deviation) of each pair's mean reward: Normal prior, known noise variance."""
        prior_mean, prior_std = REWARD_MEAN_PRIOR
        precision = 1.0 / prior_std**2 + memory.visits / REWARD_NOISE_STD**2
        mean = (prior_mean / prior_std**2 + memory.reward_sum / REWARD_NOISE_STD**2) / precision
        return mean, precision.rsqrt()

    def model(self, memory: Posterior, t: int, noise: TaskNoise) -> tuple[Tensor, Tensor]:
        """(transitions [T, E, S, A, S], mean rewards [T, E, S, A]) of the MDP to plan this episode on."""
        raise NotImplementedError


class PSRL(_PlanningPolicy):
    """An MDP drawn from the posterior at each episode's start, followed optimally for the episode."""

    def model(self, memory: Posterior, t: int, noise: TaskNoise) -> tuple[Tensor, Tensor]:
        mean, std = self.reward_posterior(memory)
        rewards = mean + std * noise.normal(_REWARD_STREAM, t, self.states, self.actions).to(mean.dtype)
        return dirichlet(noise, _TRANSITION_STREAM, t, DIRICHLET_CONCENTRATION + memory.transitions), rewards


class GreedyPosterior(_PlanningPolicy):
    """The posterior-mean MDP, followed optimally for the episode (Duan et al.'s "Greedy")."""

    def model(self, memory: Posterior, t: int, noise: TaskNoise) -> tuple[Tensor, Tensor]:
        concentration = DIRICHLET_CONCENTRATION + memory.transitions
        return concentration / concentration.sum(-1, keepdim=True), self.reward_posterior(memory)[0]
