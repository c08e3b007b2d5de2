"""Any Gymnasium environment with a discrete action space as a TrialEnv: T tasks x E trials in one SyncVectorEnv.

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


def probe(env_id: str, task_parameter: str | None) -> tuple[int, int]:
    """(observation size, number of actions) of `env_id`, after checking that metarun can run it: a Discrete
    action space, a Box or Discrete observation space, and the task parameter an attribute of the env."""
    gym = require_gymnasium()
    env = _make(env_id)
    try:
        action_space, observation_space = env.action_space, env.observation_space
        if not isinstance(action_space, gym.spaces.Discrete):
            raise UserInputError(f"benchmark=gym supports discrete action spaces only; {env_id} has {action_space} "
                                 f"(continuous actions are not supported yet)")
        if isinstance(observation_space, gym.spaces.Box):
            observation_size = int(np.prod(observation_space.shape))
        elif isinstance(observation_space, gym.spaces.Discrete):
            observation_size = int(observation_space.n)
        else:
            raise UserInputError(f"benchmark=gym needs a Box or Discrete observation space; {env_id} has "
                                 f"{observation_space}")
        if task_parameter is not None:
            _task_attribute(env.unwrapped, task_parameter, env_id)
        return observation_size, int(action_space.n)
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
                 task_parameter: str | None, horizon: int, episodes: int) -> None:
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
        self._action_start = int(self.vector.single_action_space.start)
        self.num_actions = int(self.vector.single_action_space.n)
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
        chosen = actions.reshape(-1).cpu().numpy().astype(np.int64) + self._action_start
        observation, reward, terminated, truncated, _ = self.vector.step(chosen)
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

    def optimal_return(self) -> Tensor:
        """Not known for a Gymnasium task: NaN."""
        return torch.full((self.num_tasks,), float("nan"), device=self.device)

    def close(self) -> None:
        self.vector.close()


def make_gym(params: dict[str, Tensor], trials_per_task: int, noise: TaskNoise, *, env_id: str,
             task_parameter: str | None, horizon: int, episodes: int) -> GymTrialEnv:
    """EnvBatch's maker (with the environment and the episode shape bound by the benchmark)."""
    return GymTrialEnv(params["task_value"], trials_per_task, noise, env_id=env_id, task_parameter=task_parameter,
                       horizon=horizon, episodes=episodes)
