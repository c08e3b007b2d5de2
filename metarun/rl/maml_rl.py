"""MAML on reinforcement-learning benchmarks (Finn et al. 2017, 3.2 and 5.3): what algorithms/maml.py runs
when the benchmark's tasks are environments.

A training step of the one trainer:
1. `collect_adaptation` (the algorithm's `updates`): for every task of the meta-batch at once, roll the policy
   out (`rollouts` trajectories per task), take a policy-gradient step on them (REINFORCE with the linear
   feature baseline, metarun/rl/policy_gradient.py), repeat `inner_steps` times, and roll the adapted policy out
   once more. The rollouts are fixed from here on: an `AdaptationRollouts` batch, with the adapted policy's
   action log-probabilities and its Gaussian (for TRPO's ratio and KL).
2. `meta_loss`: the same inner steps again, now differentiable (second order unless first_order), and the
   adapted policies' surrogate on the last rollouts: -mean ratio x advantage, ratio = pi'(a|s) / pi'_old(a|s),
   which is 1 at the current parameters, so its gradient is the MAML policy gradient (what the trainer's
   Adam or plain gradient step uses); TRPO's line search needs the ratio form to compare parameters.
3. `trust_region_terms` (trainer/optimizer=trpo): that surrogate and the mean KL(pi'_old || pi') over the last
   rollouts' valid steps.
Each phase of rollouts (before step 0, 1, ..., after the last) draws its action noise from the task's seed
mixed with the phase (`phase_batch`): rollouts are a function of the tasks' seeds and the parameters only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from metarun.rl.envs import EnvBatch
from metarun.rl.policy_gradient import (Episodes, GaussianPolicy, Params, PolicyFn, PolicyGradientBatch, adapt,
                                        advantages, collect, gaussian_kl, gaussian_log_prob, per_task,
                                        reinforce_losses)

_PHASE_STRIDE = 0x2545F4914F6CDD1D  # odd, < 2^62: phase k's seeds are (seed + k x stride) mod 2^62
_SEED_MODULUS = 2**62  # task_seeds draws seeds in [0, 2^62)


def phase_batch(batch: EnvBatch, phase: int) -> EnvBatch:
    """The same tasks with seeds for rollout phase `phase` (0: the sampled seeds): a new noise stream each."""
    if phase == 0:
        return batch
    return replace(batch, seeds=(batch.seeds + (phase * _PHASE_STRIDE) % _SEED_MODULUS) % _SEED_MODULUS)


def trial_returns(episodes: Episodes) -> Tensor:
    """[T]: each task's return of a trial (summed rewards), averaged over its parallel trials."""
    return episodes.rewards.sum(-1).mean(-1)


@dataclass(frozen=True)
class RLSettings:
    """The options of MAML's RL side (configs/algo/maml.yaml), with the policy head bound."""

    policy: PolicyFn  # per-task parameters [T, ...], observations [T, ...] -> (mean, log_std)
    rollouts: int  # trajectories per task and phase (Finn et al.: 20 for 2D navigation)
    gamma: float
    horizon: int
    adapted: frozenset[str] | None  # the parameters the inner step moves (None: all)


@dataclass(frozen=True)
class AdaptationRollouts:
    """One training step's fixed rollouts: `inner[k]` before inner step k, `outer` after the last, with the
    adapted policy's log-probabilities and Gaussian at the outer steps; `returns` [T, steps + 1] per phase.
    A Batch (episodes.py): the trainer chunks and moves it like a TaskBatch."""

    inner: tuple[PolicyGradientBatch, ...]
    outer: PolicyGradientBatch
    old_log_prob: Tensor  # [T, N, L]
    old_mean: Tensor  # [T, N, L, A]
    old_log_std: Tensor  # [T, N, L, A]
    returns: Tensor  # [T, steps + 1]

    @property
    def num_tasks(self) -> int:
        return self.outer.num_tasks

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "AdaptationRollouts":
        def pg(b: PolicyGradientBatch) -> PolicyGradientBatch:
            return PolicyGradientBatch(fn(b.observations), fn(b.actions), fn(b.advantages), fn(b.valid))

        return AdaptationRollouts(tuple(pg(b) for b in self.inner), pg(self.outer), fn(self.old_log_prob),
                                  fn(self.old_mean), fn(self.old_log_std), fn(self.returns))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "AdaptationRollouts":
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def slice(self, start: int, stop: int) -> "AdaptationRollouts":
        return self._map(lambda t: t[start:stop])

    def normalisation_inputs(self) -> tuple[Tensor, ...]:
        return ()

    def task_groups(self) -> dict[str, Tensor]:
        return {}


def _detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


@torch.no_grad()
def collect_adaptation(shared: Params, batch: EnvBatch, steps: int, lr: float | Tensor,
                       s: RLSettings) -> AdaptationRollouts:
    """Rollouts before each of `steps` inner steps and after the last, the inner steps taken on them (no graph)."""
    fast = per_task(_detached(shared), batch.num_tasks)
    inner, returns = [], []
    for phase in range(steps):
        episodes = collect(phase_batch(batch, phase).make(s.rollouts), GaussianPolicy(fast, policy=s.policy))
        returns.append(trial_returns(episodes))
        pg = advantages(episodes, gamma=s.gamma, horizon=s.horizon)
        inner.append(pg)
        with torch.enable_grad():
            fast = _detached(adapt(fast, pg, lr, first_order=True, policy=s.policy, adapted=s.adapted))
    episodes = collect(phase_batch(batch, steps).make(s.rollouts), GaussianPolicy(fast, policy=s.policy))
    returns.append(trial_returns(episodes))
    outer = advantages(episodes, gamma=s.gamma, horizon=s.horizon)
    mean, log_std = s.policy(fast, outer.observations)
    return AdaptationRollouts(tuple(inner), outer, gaussian_log_prob(mean, log_std, outer.actions), mean, log_std,
                              torch.stack(returns, dim=1))


def _adapted_policy(shared: Params, batch: AdaptationRollouts, lr: float | Tensor, first_order: bool,
                    s: RLSettings) -> tuple[Tensor, Tensor]:
    """(mean, log_std) of every task's adapted policy at the outer rollouts' observations, as a function of the
    shared parameters (the inner steps on the fixed inner rollouts; second order unless `first_order`)."""
    fast = per_task(shared, batch.num_tasks)
    for pg in batch.inner:
        fast = adapt(fast, pg, lr, first_order=first_order, policy=s.policy, adapted=s.adapted)
    return s.policy(fast, batch.outer.observations)


def _masked_task_mean(values: Tensor, valid: Tensor) -> Tensor:
    """[T]: the mean of values [T, N, L] over each task's valid steps."""
    return (values * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1.0)


def surrogate_and_kl(shared: Params, batch: AdaptationRollouts, lr: float | Tensor, first_order: bool,
                     s: RLSettings) -> tuple[Tensor, Tensor]:
    """Per task [T]: the surrogate -E[ratio x advantage] and KL(old adapted || adapted) over valid steps."""
    mean, log_std = _adapted_policy(shared, batch, lr, first_order, s)
    outer = batch.outer
    ratio = torch.exp(gaussian_log_prob(mean, log_std, outer.actions) - batch.old_log_prob)
    surrogate = -_masked_task_mean(ratio * outer.advantages, outer.valid)
    kl = _masked_task_mean(gaussian_kl(batch.old_mean, batch.old_log_std, mean, log_std), outer.valid)
    return surrogate, kl


def training_metrics(losses: Tensor, kl: Tensor, batch: AdaptationRollouts) -> dict[str, Tensor]:
    """Scalars of a training step: the surrogate, the KL from the collecting policy, and the return of the
    meta-batch's rollouts before adaptation (`return@0`) and after it (`return`)."""
    returns = batch.returns.detach()
    return {"loss": losses.detach().mean(), "kl": kl.detach().mean(), "return@0": returns[:, 0].mean(),
            "return": returns[:, -1].mean()}


def evaluate_adaptation(shared: Params, batch: EnvBatch, steps: int, lr: float | Tensor,
                        s: RLSettings) -> dict[str, Tensor]:
    """Per task [T]: `return@k` after k = 0..steps policy-gradient steps on the task's own rollouts (first order,
    no graph kept), `return` after the last, and `regret` against the optimum where the benchmark knows it."""
    rollouts = collect_adaptation(shared, batch, steps, lr, s)
    out = {f"return@{k}": rollouts.returns[:, k] for k in range(steps + 1)}
    out["return"] = rollouts.returns[:, -1]
    optimal = batch.make(1).optimal_return().to(out["return"])
    if not torch.isnan(optimal).any():
        out["regret"] = optimal - out["return"]
    return out


@torch.no_grad()
def adaptation_paths(shared: Params, batch: EnvBatch, steps: int, lr: float | Tensor, s: RLSettings,
                     trials: int = 1) -> list[Tensor]:
    """The observations [T, trials, L, O] of `trials` rollouts per task before and after each of `steps`
    inner steps (for the trajectory picture): the rollouts evaluation adapts on, their first `trials`."""
    fast = per_task(_detached(shared), batch.num_tasks)
    paths = []
    for phase in range(steps + 1):
        episodes = collect(phase_batch(batch, phase).make(s.rollouts), GaussianPolicy(fast, policy=s.policy))
        valid = episodes.valid[:, :trials, :, None]
        # the padding after the goal repeats the last position, so a path ends where its episode ended
        paths.append(torch.where(valid, episodes.observations[:, :trials], torch.nan))
        if phase < steps:
            with torch.enable_grad():
                pg = advantages(episodes, gamma=s.gamma, horizon=s.horizon)
                fast = _detached(adapt(fast, pg, lr, first_order=True, policy=s.policy, adapted=s.adapted))
    return paths


def fisher_vector_product(shared: Params, batch: AdaptationRollouts, lr: float, first_order: bool,
                          s: RLSettings) -> Callable[[Params], Params]:
    """v -> H v, H the Hessian w.r.t. the shared parameters of the mean KL(old adapted || adapted) at the
    parameters that collected `batch` (TRPO's Fisher matrix), by the chain rule instead of a third-order backward.

    With theta_{k+1} = theta_k - lr M grad L_k(theta_k) per task (M: the adapted parameters), the adapted policy's
    KL has a zero gradient at the collecting parameters, so its Hessian there is exactly J^T F' J, F' the Fisher
    matrix of the adapted policy in its own parameters and J = prod_k (I - lr M H_k) the Jacobian of the inner
    steps (H_k the Hessian of task loss L_k at theta_k; J = I in first order, where the inner gradient is a
    constant). Each product is 2 x steps Hessian-vector products of an inner loss and one of the KL, each a double
    backward through one forward of the policy, all tasks at once; Pearlmutter's product on the KL of the
    second-order graph (trpo.fisher_vector_product, which this equals: tests/test_maml_rl_training.py) costs a
    backward through that whole graph's backward for every product."""
    T = batch.num_tasks
    fast = {k: v.detach().expand(T, *v.shape).clone().requires_grad_() for k, v in shared.items()}
    names = list(fast)
    adapted = [k for k in names if s.adapted is None or k in s.adapted]
    inner_hvps: list[Callable[[Params], Params]] = []

    def hvp_of(loss: Tensor, at: Params) -> Callable[[Params], Params]:
        grads = torch.autograd.grad(loss, [at[k] for k in names], create_graph=True)

        def product(v: Params) -> Params:
            dot = sum((g * v[k]).sum() for k, g in zip(names, grads))
            return dict(zip(names, torch.autograd.grad(dot, [at[k] for k in names], retain_graph=True)))

        return product

    with torch.enable_grad():
        for pg in batch.inner:
            loss = reinforce_losses(fast, pg, policy=s.policy).sum()
            if not first_order:
                inner_hvps.append(hvp_of(loss, fast))
            grads = dict(zip(adapted, torch.autograd.grad(loss, [fast[k] for k in adapted], retain_graph=True)))
            fast = {k: (v - lr * grads[k] if k in grads else v).detach().requires_grad_() for k, v in fast.items()}
        mean, log_std = s.policy(fast, batch.outer.observations)
        kl = _masked_task_mean(gaussian_kl(batch.old_mean, batch.old_log_std, mean, log_std), batch.outer.valid)
        outer_hvp = hvp_of(kl.sum() / T, fast)  # the mean over tasks

    def masked(v: Params) -> Params:
        return {k: (x if k in adapted else torch.zeros_like(x)) for k, x in v.items()}

    def product(v: Params) -> Params:
        with torch.enable_grad():
            u = {k: x.expand(T, *x.shape) for k, x in v.items()}
            for hvp in inner_hvps:  # J v, first step first
                hu = masked(hvp(u))
                u = {k: u[k] - lr * hu[k] for k in names}
            w = outer_hvp(u)
            for hvp in reversed(inner_hvps):  # J^T w, last step first (H_k is symmetric)
                hw = hvp(masked(w))
                w = {k: w[k] - lr * hw[k] for k in names}
        return {k: w[k].sum(0).detach() for k in names}  # the shared parameters feed every task's copy

    return product
