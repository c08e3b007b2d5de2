"""MAML for RL's pieces as pure functions (Finn et al. 2017, section 3.2 and 5.3): a Gaussian MLP policy
evaluated from a parameter dict, REINFORCE with the linear feature baseline, and the batched meta-loss on fixed
rollouts. The learner that collects the rollouts (and TRPO, the paper's outer optimiser) build on these.

Why pure functions of (params, tensors): the meta-gradient differentiates the outer loss through an inner
policy-gradient step, so the policy must be a function of parameters that can carry a task dimension. Every
function here takes either shared parameters (each tensor its own shape) or per-task ones (a leading [T]); the
per-task forward is batched matrix products, and the single-task form runs unchanged under torch.func.vmap.

The estimator follows Finn's code (cbfinn/maml_rl: rllab's sampler and sandbox/rocky/tf/algos/maml_vpg.py), which
tristandeleu/pytorch-maml-rl reproduces:
- returns to go discounted by gamma (0.99) within each episode; advantages A_t = G_t - b(s_t) (GAE with lambda 1
  and a zero value past the episode's end telescopes to exactly this);
- the baseline b is the linear feature baseline of Duan et al. 2016 ("Benchmarking Deep RL for Continuous
  Control", supplementary 2; rllab's LinearFeatureBaseline): features [o, o^2, t, t^2, t^3, 1] with the
  observation clipped to [-10, 10] and t the step index / 100, fitted by ridge least squares (1e-5, raised
  x10 up to 5 times where the solve fails) on the same rollouts it is then used on, per task, without gradient;
- advantages centred and scaled per task over its steps (rllab's center_adv, (A - mean) / (std + 1e-8));
- the surrogate -mean over the task's steps of log pi(a_t | s_t) A_t; the inner step is plain gradient descent
  on it for every parameter (log_std included), the meta-loss the adapted policy's surrogate on new rollouts,
  averaged over tasks. Steps after an episode reached its goal (padding, `valid` False) count nowhere.

Second order here means differentiating through the inner gradient, as the paper and both codes do; the term
of the inner rollouts' own dependence on the parameters (DiCE, ProMP) is not part of this estimator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.rl.envs import TrialEnv
from metarun.rl.noise import POLICY_STREAM, TaskNoise
from metarun.rl.rollout import RolloutPolicy, StepInput
from metarun.rl.tabular_mdp import normal_quantile

Params = dict[str, Tensor]
# (parameters, observations [..., observation_size]) -> (mean, log_std), each [..., action_size]: the Gaussian
# policy's head. `gaussian_mlp` is the stand-alone one; MAML's is its backbone plus linear head (algorithms/maml.py)
PolicyFn = Callable[[Params, Tensor], tuple[Tensor, Tensor]]

MIN_LOG_STD = math.log(1e-6)  # Finn's MAMLGaussianMLPPolicy: min_std 1e-6 on the exp-parametrised std
BASELINE_REG = 1e-5  # rllab's LinearFeatureBaseline reg_coeff
BASELINE_TIME_SCALE = 100.0  # rllab: the time feature is the step index / 100
BASELINE_CLIP = 10.0  # rllab: observations clipped to [-10, 10] in the features
_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


# -- the policy --------------------------------------------------------------------------------------------------

def init_gaussian_mlp(observation_size: int, action_size: int, hidden: Sequence[int], generator: torch.Generator,
                      init_std: float = 1.0, dtype: torch.dtype = torch.float32) -> Params:
    """Shared parameters of a Gaussian MLP policy: Xavier-uniform weights, zero biases (both codes' init),
    a state-independent log std = log(init_std) (Finn et al.: learned, initial std 1)."""
    sizes = [observation_size, *hidden, action_size]
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        params[f"layer{i}.weight"] = (torch.rand(fan_out, fan_in, generator=generator, dtype=dtype) * 2 - 1) * bound
        params[f"layer{i}.bias"] = torch.zeros(fan_out, dtype=dtype)
    params["log_std"] = torch.full((action_size,), math.log(init_std), dtype=dtype)
    return params


def _layers(params: Params) -> int:
    return sum(1 for k in params if k.endswith(".weight"))


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [..., in] with weight [out, in]; or per task, x [T, ..., in] with weight [T, out, in] (batched products)."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)).view(*x.shape[:-1], weight.shape[1])


def gaussian_mlp(params: Params, observations: Tensor, activation: str = "relu") -> tuple[Tensor, Tensor]:
    """(mean, log_std), each [..., action_size], of the policy at `observations` [..., observation_size].

    Shared parameters take any leading shape; per-task parameters ([T, ...] each) take observations [T, ...].
    log_std is clamped below at log(1e-6) as in Finn's policy, and broadcast to the mean's shape."""
    act = _ACTIVATIONS[activation]
    x = observations
    n = _layers(params)
    for i in range(n):
        x = _linear(x, params[f"layer{i}.weight"], params[f"layer{i}.bias"])
        if i < n - 1:
            x = act(x)
    return x, per_task_log_std(params["log_std"], x)


def policy_fn(policy: PolicyFn | None, activation: str = "relu") -> PolicyFn:
    """`policy`, or the stand-alone Gaussian MLP with `activation` when None."""
    return policy if policy is not None else functools.partial(gaussian_mlp, activation=activation)


def per_task_log_std(log_std: Tensor, like: Tensor) -> Tensor:
    """A state-independent log std (shared [A] or per task [T, A]) clamped below at log(1e-6) and broadcast to
    the mean `like` [..., A] (per task: [T, 1, ..., 1, A] first)."""
    log_std = log_std.clamp_min(MIN_LOG_STD)
    if log_std.dim() == 2:
        log_std = log_std.view(log_std.shape[0], *([1] * (like.dim() - 2)), log_std.shape[1])
    return log_std.expand_as(like)


def gaussian_kl(old_mean: Tensor, old_log_std: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """KL(N(old_mean, old_std^2) || N(mean, std^2)) of diagonal Gaussians, summed over the action dimension:
    [...]. TRPO's constraint, old = the policy that collected the rollouts."""
    return (log_std - old_log_std + (torch.exp(2 * old_log_std) + (old_mean - mean) ** 2)
            / (2 * torch.exp(2 * log_std)) - 0.5).sum(-1)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(actions; mean, diag(exp(log_std))^2) summed over the action dimension: [...]. Of the policy's own
    (unclipped) action, as both reference codes store it; the environment's clip is part of the dynamics."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std).sum(-1) - 0.5 * math.log(2 * math.pi) * mean.shape[-1]


class GaussianPolicy(RolloutPolicy):
    """Acts in every trial at once: a = mean + std * eps, eps the inverse normal CDF of one TaskNoise uniform per
    action dimension (stream POLICY_STREAM), so a task's actions depend only on its seed and its parameters."""

    def __init__(self, params: Params, activation: str = "relu", policy: PolicyFn | None = None) -> None:
        self.params = params  # shared, or per task [T, ...]
        self.policy = policy_fn(policy, activation)

    def start(self, env: TrialEnv) -> None:
        return None

    def act(self, step: StepInput, memory: Any, t: int, noise: TaskNoise) -> tuple[Tensor, Any, dict[str, Tensor]]:
        mean, log_std = self.policy(self.params, step.observation)
        eps = normal_quantile(noise.uniform(POLICY_STREAM, t, mean.shape[-1])).to(mean.dtype)
        return mean + torch.exp(log_std) * eps, None, {}


# -- rollouts with their padding mask ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Episodes:
    """Rollouts [T, E, L, ...] of a continuous-action TrialEnv, with `valid` [T, E, L] bool: the step counted
    (False for the padding after an episode reached its goal)."""

    observations: Tensor  # [T, E, L, observation_size]
    actions: Tensor  # [T, E, L, action_size] float
    rewards: Tensor  # [T, E, L]
    valid: Tensor  # [T, E, L] bool

    def to(self, dtype: torch.dtype) -> "Episodes":
        return Episodes(self.observations.to(dtype), self.actions.to(dtype), self.rewards.to(dtype), self.valid)


@torch.no_grad()
def collect(env: TrialEnv, policy: RolloutPolicy) -> Episodes:
    """`rollout.rollout` plus `env.active()` before every step (where the environment has it; else all valid).
    Stands in until the rollout contract records the mask itself (see the proposal in the issue note)."""
    observation = env.reset()
    T, E = observation.shape[:2]
    zeros = torch.zeros((T, E), dtype=observation.dtype, device=observation.device)
    prev = StepInput(observation, zeros, zeros, torch.ones((T, E), dtype=torch.bool, device=observation.device))
    memory = policy.start(env)
    active = getattr(env, "active", None)
    observations, actions, rewards, valid = [], [], [], []
    for t in range(env.episodes * env.horizon):
        action, memory, _ = policy.act(prev, memory, t, env.noise)
        observations.append(observation)
        valid.append(active().clone() if active is not None else torch.ones_like(prev.prev_done))
        observation, reward, done = env.step(action)
        actions.append(action)
        rewards.append(reward)
        prev = StepInput(observation, action, reward, done)
    stack = lambda xs: torch.stack(xs, dim=2)  # noqa: E731
    return Episodes(stack(observations), stack(actions), stack(rewards), stack(valid))


# -- returns, the linear feature baseline, advantages ------------------------------------------------------------

def discounted_returns(rewards: Tensor, gamma: float, horizon: int) -> Tensor:
    """G_t = sum_{j >= t} gamma^(j - t) r_j within each episode (steps [..., L], L a multiple of `horizon`):
    one product with the [H, H] discount matrix. Padding has reward 0, so it adds nothing."""
    steps = torch.arange(horizon, device=rewards.device)
    lag = (steps[:, None] - steps[None, :]).to(rewards.dtype)  # [j, t] = j - t
    discount = torch.where(lag >= 0, torch.tensor(gamma, dtype=rewards.dtype, device=rewards.device) ** lag,
                           torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    per_episode = rewards.unflatten(-1, (-1, horizon))  # [..., episodes, H]
    return (per_episode @ discount).flatten(-2)


def baseline_features(observations: Tensor, horizon: int) -> Tensor:
    """Duan et al.'s features [o, o^2, t, t^2, t^3, 1] [..., L, 2 observation_size + 4] (o clipped to [-10, 10],
    t = the step index within its episode / 100, as rllab's LinearFeatureBaseline)."""
    o = observations.clamp(-BASELINE_CLIP, BASELINE_CLIP)
    L = observations.shape[-2]
    t = (torch.arange(L, device=o.device) % horizon).to(o.dtype) / BASELINE_TIME_SCALE
    t = t.view(L, 1).expand(*o.shape[:-1], 1)
    return torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)


def fit_linear_baseline(features: Tensor, targets: Tensor, weights: Tensor, reg: float = BASELINE_REG,
                        attempts: int = 5) -> Tensor:
    """Ridge least squares per task, batched: coefficients [T, F] minimising sum_n w_n (x_n c - y_n)^2 + reg |c|^2
    for features [T, N, F], targets [T, N], weights [T, N] (0 for padding). rllab solves the same normal
    equations (X^T X + reg I) c = X^T y, raising reg x10 (up to 5 times) where the solution is not finite."""
    xw = features * weights.unsqueeze(-1)
    gram = xw.transpose(1, 2) @ features  # [T, F, F]
    rhs = (xw.transpose(1, 2) @ targets.unsqueeze(-1)).squeeze(-1)  # [T, F]
    eye = torch.eye(features.shape[-1], dtype=features.dtype, device=features.device)
    coeffs = torch.zeros_like(rhs)
    pending = torch.ones(rhs.shape[0], dtype=torch.bool, device=rhs.device)
    for _ in range(attempts):
        solution, info = torch.linalg.solve_ex(gram + reg * eye, rhs)
        good = pending & (info == 0) & torch.isfinite(solution).all(-1)
        coeffs = torch.where(good.unsqueeze(-1), solution, coeffs)
        pending = pending & ~good
        if not pending.any():
            break
        reg *= 10
    return coeffs


@dataclass(frozen=True)
class PolicyGradientBatch:
    """What a REINFORCE loss needs from a task's rollouts, all fixed (no gradient): [T, N, L, ...] tensors."""

    observations: Tensor  # [T, N, L, observation_size]
    actions: Tensor  # [T, N, L, action_size]
    advantages: Tensor  # [T, N, L], 0 on padding
    valid: Tensor  # [T, N, L] float: 1 where the step counts

    @property
    def num_tasks(self) -> int:
        return self.observations.shape[0]

    def slice(self, start: int, stop: int) -> "PolicyGradientBatch":
        return PolicyGradientBatch(self.observations[start:stop], self.actions[start:stop],
                                   self.advantages[start:stop], self.valid[start:stop])


@torch.no_grad()
def advantages(episodes: Episodes, *, gamma: float, horizon: int, reg: float = BASELINE_REG,
               normalize: bool = True) -> PolicyGradientBatch:
    """Advantages of every task's rollouts against the linear baseline fitted on those same rollouts (per task,
    batched over tasks), centred and scaled per task over its valid steps when `normalize`."""
    valid = episodes.valid.to(episodes.rewards.dtype)
    returns = discounted_returns(episodes.rewards, gamma, horizon)
    features = baseline_features(episodes.observations, horizon)  # [T, N, L, F]
    T = features.shape[0]
    coeffs = fit_linear_baseline(features.reshape(T, -1, features.shape[-1]), returns.reshape(T, -1),
                                 valid.reshape(T, -1), reg)
    values = torch.einsum("tnlf,tf->tnl", features, coeffs)
    adv = (returns - values) * valid
    if normalize:
        count = valid.sum((1, 2), keepdim=True).clamp_min(1.0)
        mean = adv.sum((1, 2), keepdim=True) / count
        centred = (adv - mean) * valid
        std = torch.sqrt((centred * centred).sum((1, 2), keepdim=True) / count)
        adv = centred / (std + 1e-8)
    return PolicyGradientBatch(episodes.observations, episodes.actions, adv, valid)


# -- REINFORCE and the MAML meta-loss ----------------------------------------------------------------------------

def reinforce_loss(params: Params, observations: Tensor, actions: Tensor, advantages: Tensor, valid: Tensor,
                   activation: str = "relu", policy: PolicyFn | None = None) -> Tensor:
    """-mean over valid steps of log pi(a | s) A, reduced over the last two dimensions (trials, steps): [T] for
    [T, N, L] data (shared or per-task parameters), a scalar for one task's [N, L] (the form torch.func.vmap and
    grad take). Its gradient is the REINFORCE policy gradient (descent direction)."""
    mean, log_std = policy_fn(policy, activation)(params, observations)
    log_prob = gaussian_log_prob(mean, log_std, actions)
    return -(log_prob * advantages * valid).sum((-2, -1)) / valid.sum((-2, -1)).clamp_min(1.0)


def reinforce_losses(params: Params, batch: PolicyGradientBatch, activation: str = "relu",
                     policy: PolicyFn | None = None) -> Tensor:
    """[T]: each task's REINFORCE loss on its own rollouts."""
    return reinforce_loss(params, batch.observations, batch.actions, batch.advantages, batch.valid, activation,
                          policy)


def per_task(params: Params, num_tasks: int) -> Params:
    """One copy of the shared parameters per task: [T, ...] expanded views (no memory). The gradient of a sum of
    task losses w.r.t. copy t is task t's gradient, as in the supervised MAML (algorithms/maml.py)."""
    return {k: p.expand(num_tasks, *p.shape) for k, p in params.items()}


def adapt(fast: Params, batch: PolicyGradientBatch, lr: float, first_order: bool = False,
          activation: str = "relu", policy: PolicyFn | None = None, adapted: frozenset[str] | None = None) -> Params:
    """One policy-gradient step per task, all tasks at once: fast [T, ...] -> fast - lr grad(task loss).
    Second order (create_graph) unless `first_order`, where the inner gradient is a constant. Parameters that
    do not require a gradient (evaluation: detached copies) become leaves of their own, as in the supervised
    MAML's evaluation, so adapting a fixed policy needs no special case. `adapted` names the parameters that
    take the step (None: all; ANIL: the head's); the others stay as they are."""
    names = [k for k in fast if adapted is None or k in adapted]
    fast = {k: p if p.requires_grad or k not in names else p.detach().requires_grad_() for k, p in fast.items()}
    loss = reinforce_losses(fast, batch, activation, policy).sum()
    grads = dict(zip(names, torch.autograd.grad(loss, [fast[k] for k in names], create_graph=not first_order)))
    return {k: p - lr * grads[k] if k in grads else p for k, p in fast.items()}


def maml_rl_meta_loss(params: Params, inner: Sequence[PolicyGradientBatch], outer: PolicyGradientBatch, *,
                      lr: float, first_order: bool = False, activation: str = "relu") -> tuple[Tensor, Tensor]:
    """(meta-loss, per-task outer losses [T]) on fixed rollouts: adapt every task by one policy-gradient step per
    entry of `inner` (the rollouts of the policy before that step), then the adapted policies' REINFORCE loss on
    `outer` (the rollouts of the adapted policies), averaged over tasks. Its gradient w.r.t. `params` is the
    vanilla-policy-gradient MAML meta-gradient; TRPO uses the same graph for its objective."""
    fast = per_task(params, outer.num_tasks)
    for batch in inner:
        fast = adapt(fast, batch, lr, first_order, activation)
    losses = reinforce_losses(fast, outer, activation)
    return losses.mean(), losses
