"""TRPO as an outer optimizer the trainer steps (Schulman et al. 2015; MAML for RL, Finn et al. 2017, 5.3).

How it fits the trainer's contract (the trainer owns stepping): the trainer computes the meta-loss's gradient by
its ordinary backward, clips and checks it like any other, then calls `step(closure)` instead of `step()` for a
`TrustRegionOptimizer`. The closure is the algorithm's `trust_region_terms` on the same batch:
closure(differentiable) -> (surrogate loss, mean KL from the policy that collected the batch), evaluated at the
parameters' current values. TRPO then
1. takes the gradient g the trainer left in `.grad`,
2. solves F s = -g by conjugate gradient, F v the Hessian-vector product of the KL (its Fisher matrix at the
   current parameters) plus `cg_damping` v: the algorithm's own product where it has one
   (MetaAlgorithm.fisher_vector_product), else Pearlmutter's on one differentiable KL evaluation,
3. scales s so that 0.5 s^T F s = max_kl (the quadratic model of the KL at the limit),
4. backtracks from lr x that step by `backtrack_ratio` until the surrogate is lower than before and the KL is
   within `max_kl` (closure(False): no graph kept), at most `max_backtracks` times; else the parameters stay.
The optimizer keeps no state between steps (its checkpoint entry is empty); the step's outcome is in `last_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from metarun.defaults import option_defaults

# closure(differentiable) -> (loss, kl): MetaAlgorithm.trust_region_terms bound to the step's batch
TrustRegionClosure = Callable[[bool], tuple[Tensor, Tensor]]
# fisher(params) -> v -> F v over the flattened params, or None: MetaAlgorithm.fisher_vector_product bound to it
FisherProduct = Callable[[list[Tensor]], Callable[[Tensor], Tensor] | None]

_DEFAULTS = option_defaults("trainer/optimizer", "trpo")


class TrustRegionOptimizer(torch.optim.Optimizer):
    """An optimizer whose step re-evaluates the objective: the trainer calls `step(closure)` with the algorithm's
    `trust_region_terms` bound to the step's batch (run.py refuses it for algorithms without them)."""

    def step(self, closure: TrustRegionClosure, fisher: FisherProduct | None = None) -> None:  # type: ignore
        raise NotImplementedError


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int,
                       residual_tol: float = 1e-10) -> Tensor:
    """x with matvec(x) ~= b for a symmetric positive definite operator, after `iterations` CG steps from 0
    (rllab's and pytorch-maml-rl's loop, stopping early once the squared residual is below `residual_tol`)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r.dot(r)
    for _ in range(iterations):
        ap = matvec(p)
        alpha = rr / p.dot(ap)
        x += alpha * p
        r -= alpha * ap
        new_rr = r.dot(r)
        if float(new_rr) < residual_tol:
            break
        p = r + (new_rr / rr) * p
        rr = new_rr
    return x


def _flat(tensors: Iterable[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def fisher_vector_product(kl: Tensor, params: list[Tensor], damping: float) -> Callable[[Tensor], Tensor]:
    """v -> (H + damping I) v, H the Hessian of `kl` (a differentiable scalar) w.r.t. `params` (flattened in
    order): Pearlmutter's double backward, the KL's gradient graph built once and kept for every product. At the
    parameters that collected the rollouts, H is the Fisher matrix of the (adapted) policy."""
    kl_grads = _flat(torch.autograd.grad(kl, params, create_graph=True))

    def product(v: Tensor) -> Tensor:
        return _flat(torch.autograd.grad(kl_grads.dot(v), params, retain_graph=True)) + damping * v

    return product


class TRPO(TrustRegionOptimizer):
    """The natural-gradient step within a KL trust region, with a backtracking line search (see the module)."""

    def __init__(self, params: Any, lr: float = _DEFAULTS["lr"], max_kl: float = _DEFAULTS["max_kl"],
                 cg_iters: int = _DEFAULTS["cg_iters"], cg_damping: float = _DEFAULTS["cg_damping"],
                 backtrack_ratio: float = _DEFAULTS["backtrack_ratio"],
                 max_backtracks: int = _DEFAULTS["max_backtracks"], foreach: bool = _DEFAULTS["foreach"]) -> None:
        if not (lr > 0 and max_kl > 0 and cg_iters >= 1 and cg_damping >= 0 and 0 < backtrack_ratio < 1
                and max_backtracks >= 1):
            raise ValueError("trainer.optimizer (TRPO) needs lr > 0, max_kl > 0, cg_iters >= 1, cg_damping >= 0, "
                             "0 < backtrack_ratio < 1 and max_backtracks >= 1")
        super().__init__(params, dict(lr=lr, max_kl=max_kl, cg_iters=cg_iters, cg_damping=cg_damping,
                                      backtrack_ratio=backtrack_ratio, max_backtracks=max_backtracks,
                                      foreach=foreach))
        self.last_step: dict[str, float] = {}

    def _write(self, params: list[Tensor], values: list[Tensor]) -> None:
        with torch.no_grad():
            if self.defaults["foreach"]:
                torch._foreach_copy_(params, values)
            else:
                for p, v in zip(params, values):
                    p.copy_(v)

    def step(self, closure: TrustRegionClosure, fisher: FisherProduct | None = None) -> None:  # type: ignore
        """One trust-region step from the gradient in `.grad`. `fisher`, where the algorithm has one, gives the
        Fisher-vector product directly (MAML for RL: by the chain rule through its inner steps, the same matrix
        at a fraction of the cost); else it is Pearlmutter's product on the closure's differentiable KL."""
        o = self.defaults  # one trust region over every group: per-group settings would not mean anything
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        g = _flat(p.grad for p in params)
        product = fisher(params) if fisher is not None else None
        with torch.enable_grad():
            if product is None:
                loss, kl = closure(True)
                fisher_vector = fisher_vector_product(kl, params, o["cg_damping"])
            else:
                loss, _ = closure(False)
                fisher_vector = lambda v: product(v) + o["cg_damping"] * v  # noqa: E731
            direction = conjugate_gradient(fisher_vector, -g, o["cg_iters"])
            curvature = direction.dot(fisher_vector(direction))
        loss_before = float(loss.detach())
        if not (math.isfinite(float(curvature)) and float(curvature) > 0):
            self.last_step = {"accepted": 0.0, "backtracks": 0.0, "kl": 0.0, "improvement": 0.0}
            return
        full_step = direction * torch.sqrt(2 * o["max_kl"] / curvature)
        old = [p.detach().clone() for p in params]
        sizes = [p.numel() for p in params]
        fraction = o["lr"]
        for backtrack in range(o["max_backtracks"]):
            pieces = (fraction * full_step).split(sizes)
            self._write(params, [w + d.view_as(w) for w, d in zip(old, pieces)])
            new_loss, new_kl = closure(False)
            if float(new_kl) <= o["max_kl"] and float(new_loss) < loss_before:
                self.last_step = {"accepted": 1.0, "backtracks": float(backtrack), "kl": float(new_kl),
                                  "improvement": loss_before - float(new_loss)}
                return
            fraction *= o["backtrack_ratio"]
        self._write(params, old)
        self.last_step = {"accepted": 0.0, "backtracks": float(o["max_backtracks"]), "kl": 0.0, "improvement": 0.0}
