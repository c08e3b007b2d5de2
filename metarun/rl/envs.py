"""The meta-RL task contract: an `EnvBatch` of T tasks, stepped as `TrialEnv`s of T x E parallel trials.

A *trial* (Duan et al. 2016) is `episodes` consecutive episodes of `horizon` steps in one task; a policy keeps
its memory across the episodes of a trial and forgets it between trials. Trials have a fixed length
L = episodes x horizon, so a rollout is a set of [T, E, L] tensors: no ragged bookkeeping, no Python loop over
tasks or episodes (one loop over the L time steps).

All randomness of a rollout (the environment's and the policy's action draws) is counter-based: a hash of
(the task's seed, the trial, the time step, the stream) (metarun/rl/noise.py). Each task's seed is drawn by the
generator that sampled the task, so a training step is a function of the trainer's checkpointed generator state
(resuming is exact), a validation/test pool's tasks *and* rollouts are fixed by the pool's seed, and a task's
rollout is the same whatever the tasks beside it, however the pool is chunked, and on CPU or CUDA alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from metarun.rl.noise import TaskNoise


class TrialEnv(Protocol):
    """T tasks x E parallel trials, one tensor operation per step, on the device of the task parameters.

    Observations are float [T, E, observation_size]; actions long [T, E] in [0, num_actions); rewards float
    [T, E]; `done` bool [T, E] marks the last step of an episode, after which the environment resets that
    episode by itself (the observation returned is the first of the next episode). Every trial's episodes end at
    the same steps (fixed horizon), so `done` is the same for all T x E entries of a step.
    """

    num_tasks: int
    trials_per_task: int  # E
    observation_size: int
    num_actions: int
    horizon: int  # steps per episode
    episodes: int  # episodes per trial

    def reset(self) -> Tensor:
        """Start every trial: the first observation [T, E, observation_size]."""
        ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(next observation, reward, done) of one step of every trial."""
        ...

    noise: TaskNoise  # the rollout's random stream; the policy draws from streams >= POLICY_STREAM

    def optimal_return(self) -> Tensor:
        """[T]: the expected return of a trial of the best policy that knows the task (bandit: pulls x the best
        arm's mean; tabular MDP: episodes x the finite-horizon optimal value of the start distribution). Regret is
        measured against it. Where it is not known (Gymnasium tasks), NaN."""
        ...


@dataclass(frozen=True)
class EnvBatch:
    """The parameters of T tasks (name -> [T, ...] tensor) and each task's rollout seed (seeds [T] int64).

    It travels through the trainer as a TaskBatch does (`num_tasks`, `to`, `slice`); `make(E)` builds the
    environment. `maker` is the benchmark's function (params, E, noise) -> TrialEnv."""

    params: dict[str, Tensor]
    seeds: Tensor
    maker: Any = field(compare=False)

    @property
    def num_tasks(self) -> int:
        return self.seeds.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EnvBatch":
        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return replace(self, params={k: move(v) for k, v in self.params.items()}, seeds=self.seeds.to(device))

    def slice(self, start: int, stop: int) -> "EnvBatch":
        """Tasks start..stop-1 with their own seeds: a task's rollouts do not depend on the chunking."""
        return replace(self, params={k: v[start:stop] for k, v in self.params.items()}, seeds=self.seeds[start:stop])

    def normalisation_inputs(self) -> tuple[Tensor, ...]:
        """Inputs whose statistics the backbone's normalisation follows (Backbone.update_running_stats): none
        here (the data of an RL step is the rollout)."""
        return ()

    def task_groups(self) -> dict[str, Tensor]:
        return {}

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    def noise(self, trials_per_task: int) -> TaskNoise:
        """The counter-based random stream of these tasks' rollouts (E = trials_per_task parallel trials)."""
        return TaskNoise(self.seeds, trials_per_task)

    def make(self, trials_per_task: int) -> TrialEnv:
        """The environment of these tasks with `trials_per_task` parallel trials each. The policy draws its
        actions from `env.noise` (streams POLICY_STREAM and up); the environment from streams below it."""
        return self.maker(self.params, trials_per_task, self.noise(trials_per_task))


def task_seeds(num_tasks: int, generator: torch.Generator) -> Tensor:
    """Each sampled task's rollout seed [T] int64, drawn from the generator that sampled the tasks."""
    return torch.randint(0, 2**62, (num_tasks,), generator=generator, dtype=torch.int64)
