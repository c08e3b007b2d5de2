"""Roll a policy out over the trials of a TrialEnv: one loop over the L time steps, all T x E trials at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from metarun.rl.envs import TrialEnv
from metarun.rl.noise import TaskNoise


@dataclass(frozen=True)
class StepInput:
    """What a policy sees at time t of a trial: the observation and the previous step's action, reward and
    done flag (RL^2's input; at t = 0: action -1, reward 0, done True, i.e. "a trial starts")."""

    observation: Tensor  # [T, E, observation_size]
    prev_action: Tensor  # [T, E] long, -1 at the first step
    prev_reward: Tensor  # [T, E]
    prev_done: Tensor  # [T, E] bool


class RolloutPolicy(Protocol):
    """Acts in every trial at once. `start` gives the memory at a trial's start; `act` draws the actions of one
    step from `noise` (streams >= noise.POLICY_STREAM) and returns the new memory and any per-step extras the
    learner keeps (log-probability, value: each [T, E])."""

    def start(self, env: TrialEnv) -> Any:
        ...

    def act(self, step: StepInput, memory: Any, t: int, noise: TaskNoise) -> tuple[Tensor, Any, dict[str, Tensor]]:
        ...


@dataclass(frozen=True)
class Trajectory:
    """One trial per (task, parallel trial): every tensor [T, E, L, ...] (L = episodes x horizon)."""

    observations: Tensor  # [T, E, L, observation_size]
    actions: Tensor  # [T, E, L] long
    rewards: Tensor  # [T, E, L]
    dones: Tensor  # [T, E, L] bool: step t ended an episode
    extras: dict[str, Tensor] = field(default_factory=dict)  # the policy's per-step extras, stacked on L

    @property
    def returns(self) -> Tensor:
        """[T, E]: the undiscounted return of each trial (what Duan et al.'s tables report)."""
        return self.rewards.sum(-1)

    def prev_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(prev_action, prev_reward, prev_done) of every step, as the policy saw them: the learner's full-sequence
        forward reads the same inputs the rollout's step-by-step one did."""
        shift = lambda x, first: torch.cat([torch.full_like(x[..., :1], first), x[..., :-1]], dim=-1)  # noqa: E731
        return shift(self.actions, -1), shift(self.rewards, 0.0), shift(self.dones, True)

    def episode_returns(self, horizon: int) -> Tensor:
        """[T, E, episodes]: the return of each episode of each trial."""
        return self.rewards.unflatten(-1, (-1, horizon)).sum(-1)


@torch.no_grad()
def rollout(env: TrialEnv, policy: RolloutPolicy) -> Trajectory:
    """Run every trial of `env` to its end under `policy` (no gradient: learners recompute what they need)."""
    observation = env.reset()
    T, E = observation.shape[:2]
    device = observation.device
    prev_action = torch.full((T, E), -1, dtype=torch.long, device=device)
    prev_reward = torch.zeros((T, E), dtype=observation.dtype, device=device)
    prev_done = torch.ones((T, E), dtype=torch.bool, device=device)
    memory = policy.start(env)
    observations, actions, rewards, dones = [], [], [], []
    extras: dict[str, list[Tensor]] = {}
    for t in range(env.episodes * env.horizon):
        action, memory, step_extras = policy.act(StepInput(observation, prev_action, prev_reward, prev_done),
                                                 memory, t, env.noise)
        observations.append(observation)
        next_observation, reward, done = env.step(action)
        actions.append(action)
        rewards.append(reward)
        dones.append(done)
        for key, value in step_extras.items():
            extras.setdefault(key, []).append(value)
        observation, prev_action, prev_reward, prev_done = next_observation, action, reward, done
    stack = lambda xs: torch.stack(xs, dim=2)  # noqa: E731
    return Trajectory(stack(observations), stack(actions), stack(rewards), stack(dones),
                      {k: stack(v) for k, v in extras.items()})
