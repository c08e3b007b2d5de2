"""Finn et al. 2017's 2D point navigation (MAML, section 5.3 and appendix A.2) as a TrialEnv with continuous
actions.

A task is a goal g in the plane; the point starts every episode at the origin, its observation is its position,
an action is a velocity command clipped to [-0.1, 0.1] per coordinate, the reward of a step is minus the
Euclidean distance from the new position to the goal, and the episode ends when the point is within 0.01 of the
goal in both coordinates, or at the horizon (100). The facts are those of Finn's own code
(cbfinn/maml_rl, maml_examples/point_env_randgoal.py: goals U[-0.5, 0.5]^2, start (0, 0), reward
-sqrt(dx^2 + dy^2), done when |dx| < 0.01 and |dy| < 0.01; max_path_length 100 in maml_trpo_point.py), which
tristandeleu/pytorch-maml-rl (maml_rl/envs/navigation.py) reproduces. (The paper's appendix says "negative
squared distance"; both codes use the distance, and so does the issue.)

Continuous actions: `action_size` (2) > 0 says so, and `step` takes float actions [T, E, action_size] in the
policy's own units; the environment scales them by `action_scale` and clips. With `action_scale` 1 the policy
outputs the velocity itself (the paper's wording, pytorch-maml-rl); Finn's code wraps the environment in rllab's
`normalize`, which maps a policy output a in [-1, 1] to 0.1 a before the same clip: `action_scale` 0.1.

Fixed-length trials: an episode that reaches the goal before the horizon is padded until it (as benchmark=gym
pads): the point stays, the rewards are 0, the policy's actions are ignored, and `active()` is False for those
steps, so a learner can leave them out of its averages (reference implementations never see them: their paths
end there). The dynamics are deterministic: the environment draws no random numbers (all rollout randomness is
the policy's, from `noise`'s streams >= POLICY_STREAM).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarun.rl.envs import TrialEnv
from metarun.rl.noise import TaskNoise

ACTION_BOUND = 0.1  # |velocity| per coordinate and step (Finn et al.; Box(-0.1, 0.1) in both codes)
OBSERVATION_SIZE = 2


def clip_velocity(actions: Tensor, action_scale: float) -> Tensor:
    """The velocity a policy output commands: scaled, then clipped to the box [-0.1, 0.1]^2."""
    return (actions * action_scale).clamp(-ACTION_BOUND, ACTION_BOUND)


def optimal_episode_return(goals: Tensor, horizon: int, goal_tolerance: float) -> Tensor:
    """[T]: the best return of one episode for goals [T, 2], exact.

    After k steps the point can be anywhere in the box B_k = [-0.1 k, 0.1 k]^2 and nowhere else, so step k's reward
    is at most -dist(g, B_k). Moving along p_k = clip(g, -0.1 k, 0.1 k) attains that bound at every step at once
    (p_{k+1} - p_k is within [-0.1, 0.1] per coordinate), and it enters the goal box no later than any other
    policy (the projection is the closest point of B_k in every coordinate), after which rewards are 0. So the
    optimum is -sum of dist(g, B_k) up to and including the first step within the tolerance (|g| <= 0.5 reaches
    the goal exactly by step 5)."""
    k = torch.arange(1, horizon + 1, dtype=goals.dtype, device=goals.device)[:, None]  # [H, 1]
    reach = (k * ACTION_BOUND).expand(horizon, 2)
    projected = torch.maximum(torch.minimum(goals[:, None, :], reach), -reach)  # [T, H, 2]
    gap = goals[:, None, :] - projected
    distance = gap.norm(dim=-1)  # [T, H]
    if goal_tolerance > 0:
        reached = (gap.abs() < goal_tolerance).all(-1)
        counted = (reached.cumsum(-1) - reached.long()) == 0  # steps up to and including the first arrival
        distance = distance * counted
    return -distance.sum(-1)


class Navigation2DEnv(TrialEnv):
    """T tasks x E trials of `episodes` episodes of `horizon` steps; position [T, E, 2], goal [T, 2]."""

    observation_size = OBSERVATION_SIZE
    num_actions = 0  # no discrete actions ...
    action_size = 2  # ... but a 2-D continuous one (the proposed contract: actions float [T, E, action_size])

    def __init__(self, goals: Tensor, trials_per_task: int, noise: TaskNoise, *, horizon: int, episodes: int,
                 goal_tolerance: float, action_scale: float) -> None:
        self.goals = goals  # [T, 2]
        self.num_tasks = goals.shape[0]
        self.trials_per_task = trials_per_task
        self.horizon = horizon
        self.episodes = episodes
        self.goal_tolerance = goal_tolerance
        self.action_scale = action_scale
        self.noise = noise
        self._t = 0
        shape = (self.num_tasks, trials_per_task)
        self.position = torch.zeros(*shape, OBSERVATION_SIZE, dtype=goals.dtype, device=goals.device)
        self._alive = torch.ones(shape, dtype=torch.bool, device=goals.device)
        self._done = {flag: torch.full(shape, flag, dtype=torch.bool, device=goals.device) for flag in (False, True)}

    def _start_episode(self) -> None:
        self.position = torch.zeros_like(self.position)
        self._alive = torch.ones_like(self._alive)

    def reset(self) -> Tensor:
        self._t = 0
        self._start_episode()
        return self.position

    def active(self) -> Tensor:
        """[T, E] bool: whether the next step counts (False once the episode reached its goal: padding)."""
        return self._alive

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._t >= self.episodes * self.horizon:
            raise RuntimeError(f"the trial has ended after {self.episodes} x {self.horizon} steps; call reset()")
        if actions.shape != self.position.shape:
            raise ValueError(f"navigation2d takes float actions {tuple(self.position.shape)}, got "
                             f"{tuple(actions.shape)}")
        alive = self._alive
        velocity = clip_velocity(actions.to(self.position.dtype), self.action_scale) * alive.unsqueeze(-1)
        position = self.position + velocity
        gap = position - self.goals[:, None, :]
        reward = -gap.norm(dim=-1) * alive
        if self.goal_tolerance > 0:
            self._alive = alive & ~(gap.abs() < self.goal_tolerance).all(-1)
        self.position = position
        self._t += 1
        ended = self._t % self.horizon == 0
        if ended:
            self._start_episode()
        return self.position, reward, self._done[ended]

    def optimal_return(self) -> Tensor:
        """episodes x the exact optimum of an episode (`optimal_episode_return`)."""
        return self.episodes * optimal_episode_return(self.goals, self.horizon, self.goal_tolerance)


def make_navigation2d(params: dict[str, Tensor], trials_per_task: int, noise: TaskNoise, *, horizon: int,
                      episodes: int, goal_tolerance: float, action_scale: float) -> Navigation2DEnv:
    """EnvBatch's maker (with the episode shape and the dynamics' constants bound by the benchmark)."""
    return Navigation2DEnv(params["goals"], trials_per_task, noise, horizon=horizon, episodes=episodes,
                           goal_tolerance=goal_tolerance, action_scale=action_scale)
