"""Random tabular MDPs as a TrialEnv (Duan et al. 2016, "RL^2", section 5.2), and finite-horizon planning.

The task distribution (Duan et al. 5.2, following Osband et al. 2013's PSRL experiments): S states, A actions;
per (s, a) a mean reward ~ N(1, 1) and a transition distribution ~ Dirichlet(1, ..., 1) (flat); an observed
reward is N(mean, 1). Episodes have a fixed horizon and start from `initial` (the first state, as in the paper,
or uniform over the states: metarun/benchmarks/tabular_mdp.py). The observation is the
one-hot state. A step costs two table look-ups per trial: the mean reward, and the next state by Walker's alias
method (built once per environment), not a gather of the transition row and a search in it (measured ~25% of a
step at 10,000 trials). The look-ups are `index_select` on flat tables: at 10,000 trials the alias tables hold
5M entries and each step's indices are fresh, so a look-up waits on memory, where `Tensor.take` measured ~3x
slower than `index_select` (it was the larger part of a step); the alias table is int32, half the bytes. `plan`
is the batched finite-horizon value iteration that gives both the optimal return (regret's reference) and the
posterior-sampling and greedy baselines' policies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarun.rl.envs import TrialEnv
from metarun.rl.noise import TaskNoise

# the task distribution's constants (Duan et al. 5.2); the Bayesian baselines use them as their exact prior
REWARD_MEAN_PRIOR = (1.0, 1.0)  # mean and standard deviation of a (s, a) pair's mean reward
REWARD_NOISE_STD = 1.0  # standard deviation of an observed reward around its mean
DIRICHLET_CONCENTRATION = 1.0  # flat Dirichlet over next states

# the environment's streams (TaskNoise): rewards, transitions, episode starts
_REWARD_STREAM, _TRANSITION_STREAM, _START_STREAM = 0, 1, 2
_HALF_CELL = 2.0**-25  # TaskNoise uniforms are k / 2^24: the cell centres keep ndtri finite


def normal_quantile(u: Tensor) -> Tensor:
    """The N(0, 1) quantile of each cell centre u + 2^-25 of TaskNoise's uniforms u = k / 2^24, in float64 (in
    float32 the last cell's centre rounds to 1 and its quantile to inf): finite, symmetric, |z| <= 5.42."""
    return torch.special.ndtri(u.double() + _HALF_CELL).to(u.dtype)


def standard_normal(noise: TaskNoise, stream: int, step: int) -> Tensor:
    """N(0, 1) draws [T, E] by the inverse normal CDF of one TaskNoise uniform: one stream, and measured 20%
    cheaper than TaskNoise.normal's Box-Muller (two streams), the largest cost of a step at 10,000 trials."""
    return normal_quantile(noise.uniform(stream, step))


def alias_tables(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Walker's alias tables of every distribution over the last dimension (K outcomes): (keep [..., K] float,
    alias [..., K] long). A draw from one uniform u: column j = floor(u K), then j if frac(u K) < keep[j], else
    alias[j]; two look-ups instead of a row gather and a search. Built in K - 1 vectorised rounds, each pairing
    the smallest remaining scaled probability (< = 1) with the largest (>= 1) of every distribution at once."""
    K = probs.shape[-1]
    q = probs.to(torch.float64) * K  # remaining mass of each column, in units of one column's 1/K
    keep = torch.ones_like(q)
    alias = torch.arange(K, device=probs.device).expand(probs.shape).clone()
    finished = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    inf = torch.tensor(float("inf"), dtype=q.dtype, device=q.device)
    for _ in range(K - 1):
        small = torch.where(finished, inf, q).argmin(-1, keepdim=True)
        large = torch.where(finished, -inf, q).argmax(-1, keepdim=True)
        q_small = q.gather(-1, small)
        keep.scatter_(-1, small, q_small.clamp(0.0, 1.0))
        alias.scatter_(-1, small, large)
        q.scatter_(-1, large, q.gather(-1, large) - (1.0 - q_small))
        finished.scatter_(-1, small, True)
    return keep.to(probs.dtype), alias


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """table[index] for a flat table and an index of any shape: `index_select`, not `take` (module docstring)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def plan(transitions: Tensor, rewards: Tensor, horizon: int) -> Tensor:
    """Finite-horizon value iteration, batched over any leading dimensions.

    transitions [..., S, A, S], rewards [..., S, A] (means) -> Q [horizon, ..., S, A] where Q[h] is the optimal
    action value with h + 1 steps left (so step j of an episode acts on Q[horizon - 1 - j])."""
    q = []
    value = torch.zeros(rewards.shape[:-1], dtype=rewards.dtype, device=rewards.device)  # [..., S]
    for _ in range(horizon):
        step_q = rewards + (transitions @ value[..., None, :, None]).squeeze(-1)  # [..., S, A]
        q.append(step_q)
        value = step_q.max(dim=-1).values
    return torch.stack(q)


class TabularMDPEnv(TrialEnv):
    """T tasks x E trials of `episodes` episodes of `horizon` steps; state [T, E] long, observed one-hot."""

    def __init__(self, transitions: Tensor, reward_means: Tensor, initial: Tensor, trials_per_task: int,
                 noise: TaskNoise, horizon: int, episodes: int) -> None:
        self.transitions = transitions  # [T, S, A, S]
        self.reward_means = reward_means  # [T, S, A]
        self.initial = initial  # [T, S]
        self.num_tasks, self.num_states, self.num_actions = reward_means.shape
        self.observation_size = self.num_states
        self.trials_per_task = trials_per_task
        self.horizon = horizon
        self.episodes = episodes
        self.noise = noise
        self._t = 0
        self.state = torch.zeros(self.num_tasks, trials_per_task, dtype=torch.long, device=reward_means.device)
        # one flat index per (task, s, a): a step looks up its mean reward and its alias-table cell, no gathers
        S, A = self.num_states, self.num_actions
        self._base = torch.arange(self.num_tasks, device=reward_means.device).unsqueeze(1) * (S * A)
        keep, alias = alias_tables(transitions)
        self._keep, self._alias = keep.reshape(-1), alias.reshape(-1).to(torch.int32)  # [T * S * A * S]
        self._means = reward_means.reshape(-1)
        self._initial_cdf = initial.cumsum(-1).contiguous()  # [T, S]
        self._eye = torch.eye(S, dtype=reward_means.dtype, device=reward_means.device)
        self._done = {flag: torch.full(  # returned by every step: read-only
self.state.shape, flag, dtype=torch.bool, device=reward_means.device)
                      for flag in (False, True)}

    def _start(self, step: int) -> None:
        """Draw every trial's first state of the episode that begins at `step` (inverse CDF on one uniform)."""
        u = self.noise.uniform(_START_STREAM, step).to(self._initial_cdf.dtype)
        self.state = torch.searchsorted(self._initial_cdf, u, right=True).clamp_max(self.num_states - 1)

    def _observe(self) -> Tensor:
        return self._eye.index_select(0, self.state.reshape(-1)).view(*self.state.shape, self.num_states)

    def reset(self) -> Tensor:
        self._t = 0
        self._start(0)
        return self._observe()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self._t
        if t >= self.episodes * self.horizon:
            raise RuntimeError(f"the trial has ended after {self.episodes} x {self.horizon} steps; call reset()")
        pair = self._base + self.state * self.num_actions + actions  # [T, E] flat index of (task, s, a)
        mean = _lookup(self._means, pair)
        reward = mean + REWARD_NOISE_STD * standard_normal(self.noise, _REWARD_STREAM, t).to(mean.dtype)
        scaled = self.noise.uniform(_TRANSITION_STREAM, t).mul_(self.num_states)  # the next state: an alias draw
        column = scaled.long().clamp_max_(self.num_states - 1)
        cell = (pair * self.num_states).add_(column)
        keep = scaled.sub_(column) < _lookup(self._keep, cell)  # the fraction of the column against its keep
        self.state = torch.where(keep, column, _lookup(self._alias, cell))
        self._t = t + 1
        ended = self._t % self.horizon == 0
        if ended:
            self._start(self._t)
        return self._observe(), reward, self._done[ended]

    def optimal_return(self) -> Tensor:
        """episodes x the optimal finite-horizon value of the start distribution (value iteration)."""
        q = plan(self.transitions, self.reward_means, self.horizon)[-1]  # [T, S, A], horizon steps left
        return self.episodes * (self.initial * q.max(dim=-1).values).sum(-1)


def make_tabular_mdp(params: dict[str, Tensor], trials_per_task: int, noise: TaskNoise, *, horizon: int,
                     episodes: int) -> TabularMDPEnv:
    """EnvBatch's maker (with the episode shape bound by the benchmark)."""
    return TabularMDPEnv(params["transitions"], params["reward_means"], params["initial"], trials_per_task, noise,
                         horizon, episodes)
