"""Any Gymnasium environment as a TrialEnv: T tasks x E trials in one SyncVectorEnv.

Discrete action spaces take long actions [T, E] (RL^2, the baselines); Box action spaces take float actions
[T, E, action_size], clipped to the space's bounds (MAML for RL's Gaussian policy), with `active()` marking the
padding after an episode ended early.

A task is a value of one attribute of the environment (`task_parameter`, e.g. CartPole's gravity), set on each
sub-environment's `unwrapped` object. Trials have fixed-length episodes like every TrialEnv: an episode that
terminates (or is truncated by the environment's own time limit) before `horizon` is padded until the horizon:
reward 0, the last observation repeated, the policy's actions ignored. Each episode of each trial is reset with a
seed drawn from the task's TaskNoise, so a rollout is a function of the task's seed as for the tensor
environments (Gymnasium's own random draws then follow from that seed). Gymnasium is an optional extra: this
module imports it only when an environment is built.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import UserInputError
from metarun.rl.envs import TrialEnv
from metarun.rl.noise import TaskNoise

_SEED_STREAMS = (0, 1)  # two 24-bit halves of each episode's reset seed


def require_gymnasium() -> ModuleType:
    """The gymnasium module, or the one line that says how to install it."""
    try:
        import gymnasium
    except ImportError:
        raise UserInputError('benchmark=gym needs Gymnasium: pip install ".[rl]"') from None
    return gymnasium


def _make(env_id: str, **kwargs: Any) -> Any:
    gym = require_gymnasium()
    try:
        return gym.make(env_id, **kwargs)
    except (gym.error.Error, ImportError) as ex:  # unknown id or version, a missing dependency of the env
        reason = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
        raise UserInputError(f"benchmark.env_id={env_id}: {reason}") from None


# Task-defined rewards (Finn et al. 2017, 5.3, after rllab's half_cheetah_env_rand*.py): the task value is a target
# forward velocity (reward -|v - goal|) or a direction (sign of the value: reward sign x v), minus the control cost
# 0.5 x 0.1 x |a|^2; v is the x velocity Gymnasium's MuJoCo locomotion envs report in `info["x_velocity"]`.
TASK_REWARDS = ("forward_velocity", "direction")
CONTROL_COST = 0.05


def task_reward(kind: str, task_values: np.ndarray, x_velocity: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The reward of each sub-environment's step under its task (`TASK_REWARDS`)."""
    control = CONTROL_COST * np.square(actions).sum(-1)
    if kind == "forward_velocity":
        return -np.abs(x_velocity - task_values) - control
    return np.sign(task_values) * x_velocity - control


def probe(env_id: str, task_parameter: str | None) -> tuple[int, int, int]:
    """(observation size, number of discrete actions, continuous action size) of `env_id`, after checking that
    metarun can run it: a Discrete or Box action space, a Box or Discrete observation space, and the task
    parameter an attribute of the env."""
    gym = require_gymnasium()
    env = _make(env_id)
    try:
        action_space, observation_space = env.action_space, env.observation_space
        if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)):
            raise UserInputError(f"benchmark=gym needs a Discrete or Box action space; {env_id} has {action_space}")
        if isinstance(observation_space, gym.spaces.Box):
            observation_size = int(np.prod(observation_space.shape))
        elif isinstance(observation_space, gym.spaces.Discrete):
            observation_size = int(observation_space.n)
        else:
            raise UserInputError(f"benchmark=gym needs a Box or Discrete observation space; {env_id} has "
                                 f"{observation_space}")
        if task_parameter is not None:
            _task_attribute(env.unwrapped, task_parameter, env_id)
        if isinstance(action_space, gym.spaces.Discrete):
            return observation_size, int(action_space.n), 0
        return observation_size, 0, int(np.prod(action_space.shape))
    finally:
        env.close()


def _task_attribute(unwrapped: Any, name: str, env_id: str) -> type:
    """The type of the numeric attribute `name` of the environment (what a task's value is cast to)."""
    value = getattr(unwrapped, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        numeric = sorted(k for k, v in vars(unwrapped).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_"))
        what = f"{name!r} is not a number" if hasattr(unwrapped, name) else f"has no attribute {name!r}"
        raise UserInputError(f"benchmark.task_parameter: {env_id} {what}; its numeric attributes: "
                             f"{', '.join(numeric) or 'none'}")
    return float if isinstance(value, (float, np.floating)) else int


class GymTrialEnv(TrialEnv):
    """T x E sub-environments of one SyncVectorEnv, task-major (sub-env i*E + e is trial e of task i)."""

    def __init__(self, task_values: Tensor, trials_per_task: int, noise: TaskNoise, *, env_id: str,
                 task_parameter: str | None, horizon: int, episodes: int, reward: str | None = None) -> None:
        gym = require_gymnasium()
        self.num_tasks = task_values.shape[0]
        self.trials_per_task = trials_per_task
        self.horizon = horizon
        self.episodes = episodes
        self.noise = noise
        self.device = task_values.device
        count = self.num_tasks * trials_per_task
        self.vector = gym.vector.SyncVectorEnv([functools.partial(_make, env_id, disable_env_checker=True)] * count,
                                               autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
        if task_parameter is not None:
            cast = _task_attribute(self.vector.envs[0].unwrapped, task_parameter, env_id)
            values = task_values.repeat_interleave(trials_per_task).tolist()
            for sub_env, value in zip(self.vector.envs, values):
                setattr(sub_env.unwrapped, task_parameter, cast(value))
        space = self.vector.single_observation_space
        self._one_hot = int(space.n) if isinstance(space, gym.spaces.Discrete) else 0
        self._observation_start = int(space.start) if self._one_hot else 0
        actions = self.vector.single_action_space
        self.continuous = isinstance(actions, gym.spaces.Box)
        self._action_start = 0 if self.continuous else int(actions.start)
        self.num_actions = 0 if self.continuous else int(actions.n)
        self.action_size = int(np.prod(actions.shape)) if self.continuous else 0
        self._action_bounds = (actions.low.reshape(-1), actions.high.reshape(-1)) if self.continuous else None
        self.reward = reward
        self._task_values = task_values.double().repeat_interleave(trials_per_task).cpu().numpy()
        self.observation_size = self._one_hot or int(np.prod(space.shape))
        self._t = 0
        self._alive = torch.ones(count, dtype=torch.bool)
        self._observation = torch.zeros(count, self.observation_size)

    def _convert(self, observation: np.ndarray) -> Tensor:
        if self._one_hot:
            index = torch.as_tensor(np.asarray(observation) - self._observation_start, dtype=torch.long)
            return F.one_hot(index, self._one_hot).float()
        return torch.as_tensor(np.asarray(observation, dtype=np.float32).reshape(len(self._alive), -1))

    def _shaped(self, x: Tensor) -> Tensor:
        return x.view(self.num_tasks, self.trials_per_task, *x.shape[1:]).to(self.device)

    def _begin_episode(self, step: int) -> None:
        """Reset every sub-environment with the seeds of the episode that starts at `step`."""
        high, low = (torch.floor(self.noise.uniform(s, step) * (1 << 24)).long() for s in _SEED_STREAMS)
        seeds = ((high << 24) | low).reshape(-1).tolist()
        observation, _ = self.vector.reset(seed=seeds)
        self._observation = self._convert(observation)
        self._alive = torch.ones_like(self._alive)

    def reset(self) -> Tensor:
        self._t = 0
        self._begin_episode(0)
        return self._shaped(self._observation)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._t >= self.episodes * self.horizon:
            raise RuntimeError(f"the trial has ended after {self.episodes} x {self.horizon} steps; call reset()")
        if self.continuous:
            low, high = self._action_bounds
            chosen = np.clip(actions.reshape(len(self._alive), -1).detach().cpu().numpy(), low, high)
            chosen = chosen.astype(self.vector.single_action_space.dtype)
        else:
            chosen = actions.reshape(-1).cpu().numpy().astype(np.int64) + self._action_start
        observation, reward, terminated, truncated, info = self.vector.step(chosen)
        if self.reward is not None:
            if "x_velocity" not in info:
                raise UserInputError(f"benchmark.task_reward={self.reward} needs info['x_velocity'] (MuJoCo "
                                     f"locomotion environments report it); this environment does not")
            reward = task_reward(self.reward, self._task_values, np.asarray(info["x_velocity"], dtype=np.float64),
                                 chosen.astype(np.float64))
        alive = self._alive
        reward_t = torch.as_tensor(np.asarray(reward, dtype=np.float32)) * alive
        self._observation = torch.where(alive[:, None], self._convert(observation), self._observation)
        self._alive = alive & ~torch.as_tensor(np.logical_or(terminated, truncated))
        self._t += 1
        ended = self._t % self.horizon == 0
        if ended and self._t < self.episodes * self.horizon:
            self._begin_episode(self._t)
        done = torch.full((self.num_tasks, self.trials_per_task), ended, dtype=torch.bool, device=self.device)
        return self._shaped(self._observation), self._shaped(reward_t), done

    def active(self) -> Tensor:
        """[T, E] bool: whether the next step counts (False after the episode ended early: padding)."""
        return self._shaped(self._alive)

    def optimal_return(self) -> Tensor:
        """Not known for a Gymnasium task: NaN."""
        return torch.full((self.num_tasks,), float("nan"), device=self.device)

    def close(self) -> None:
        self.vector.close()


def make_gym(params: dict[str, Tensor], trials_per_task: int, noise: TaskNoise, *, env_id: str,
             task_parameter: str | None, horizon: int, episodes: int, reward: str | None = None) -> GymTrialEnv:
    """EnvBatch's maker (with the environment, the episode shape and the task reward bound by the benchmark)."""
    return GymTrialEnv(params["task_value"], trials_per_task, noise, env_id=env_id, task_parameter=task_parameter,
                       horizon=horizon, episodes=episodes, reward=reward)
