"""Per-task evaluation metrics of a rollout: what every meta-RL algorithm's `evaluate` returns.

`return` (the trial's return, averaged over the E trials of a task), `return@k` (the return of episode k of the
trial, 1-based: how fast the policy improves within a trial), and `regret` (the optimal return minus `return`)
where the optimum is known.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarun.rl.envs import TrialEnv
from metarun.rl.rollout import Trajectory


def episode_marks(episodes: int) -> list[int]:
    """The episodes `return@k` is reported at: every one up to 10, else 1, 2, 5, 10, 20, 50, ... <= episodes."""
    if episodes <= 10:
        return list(range(1, episodes + 1))
    marks, scale = [], 1
    while scale <= episodes:
        marks += [k for k in (scale, 2 * scale, 5 * scale) if k <= episodes]
        scale *= 10
    return marks


def trial_metrics(env: TrialEnv, trajectory: Trajectory) -> dict[str, Tensor]:
    """{metric: [T]} of a rollout of `env` (every tensor float, on the rollout's device)."""
    returns = trajectory.returns.mean(dim=1)
    metrics = {"return": returns}
    per_episode = trajectory.episode_returns(env.horizon).mean(dim=1)  # [T, episodes]
    for k in episode_marks(env.episodes):
        metrics[f"return@{k}"] = per_episode[:, k - 1]
    optimal = env.optimal_return().to(returns)
    if not torch.isnan(optimal).any():
        metrics["regret"] = optimal - returns
    return metrics
