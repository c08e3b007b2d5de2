"""PPO's pieces as pure functions: generalised advantage estimation and the clipped surrogate loss.

Schulman et al. 2016 ("High-Dimensional Continuous Control Using Generalized Advantage Estimation") for GAE;
Schulman et al. 2017 ("Proximal Policy Optimization Algorithms") for the clipped objective, with a value loss
and an entropy bonus as in their equation (9). Written for any leading shape: RL^2 passes [trials, L].

In RL^2 the trial is the RL episode (Duan et al. 2016, section 2.2: the policy maximises the expected total
discounted reward of a whole trial, its memory carried across the trial's episodes). So advantages are
discounted across episode boundaries inside a trial and the `done` flags do not cut the recursion; the
trial's last step is terminal (the next trial is another task and starts from an empty memory), so nothing
is bootstrapped past it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns), each shaped like `rewards` [..., L].

    delta_t = r_t + gamma V_{t+1} - V_t with V_L = 0 (the trial ends), A_t = delta_t + gamma lam A_{t+1}, and
    the value target is the lambda-return A_t + V_t."""
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ in shape")
    advantages = torch.empty_like(values)
    next_value = torch.zeros_like(values[..., 0])
    running = torch.zeros_like(values[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = delta + gamma * lam * running
        advantages[..., t] = running
        next_value = values[..., t]
    return advantages, advantages + values


def ppo_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, values: Tensor, returns: Tensor,
             entropy: Tensor, *, clip: float, value_coef: float, entropy_coef: float
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to minimise and its detached parts; every input has the same shape (one entry per step).

    policy_loss = -mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)), rho = exp(log_probs - old_log_probs);
    value_loss = mean((V - R)^2) / 2; loss = policy_loss + value_coef value_loss - entropy_coef entropy.
    approx_kl is the k3 estimator mean((rho - 1) - log rho) of KL(old || new) (Schulman, "Approximating KL
    divergence", 2020): non-negative and unbiased; clip_fraction the share of steps with |rho - 1| > eps."""
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    policy_loss = -torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages).mean()
    value_loss = 0.5 * (values - returns).square().mean()
    mean_entropy = entropy.mean()
    loss = policy_loss + value_coef * value_loss - entropy_coef * mean_entropy
    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "entropy": mean_entropy.detach(),
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1.0).abs() > clip).to(ratio.dtype).mean(),
        }
    return loss, metrics
