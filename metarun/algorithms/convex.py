"""Differentiable convex base learners, batched over tasks: the Crammer-Singer SVM dual and ridge regression.

Shared by MetaOptNet (algorithms/metaoptnet.py: `head: svm` and `head: ridge`) and R2-D2 (algorithms/r2d2.py).
Every function takes T tasks at once (a leading task dimension) and has no Python loop over tasks.

**The SVM dual** (Crammer and Singer, JMLR 2001, in the form MetaOptNet solves; Lee et al. 2019, eq. 9-10):
for one task with support features X [n, d], kernel K = X X^T and one-hot labels Y [n, N],

    minimise over alpha [n, N]   1/2 sum_ij K_ij <alpha_i, alpha_j> + ridge/2 ||alpha||^2 - <Y, alpha>
    subject to                   sum_k alpha_ik = 0 for every i,   alpha_ik <= C Y_ik for every i, k

and the classifier is w_k = sum_i alpha_ik x_i, so a query q scores <q, w_k> = sum_i alpha_ik <q, x_i>.
`ridge` is the `1.0 * I` that kjunelee/MetaOptNet (models/classification_heads.py, MetaOptNetHead_SVM_CS) adds
to the block kernel "to avoid PSD errors" of its QP solver: part of the problem its published figures solved
(and what makes the solution unique, hence differentiable, when K is singular, e.g. more support examples
than features).

**The solver** is a primal-dual interior-point method (Mehrotra predictor-corrector, as qpth's, the solver the
paper used) written for this problem's structure. qpth forms the (nN x nN) block kernel K (x) I_N and factors
the dense KKT matrix: O((nN)^3) per iteration. Here the Newton system is (K + diag(ridge + D_k)) dalpha_k +
dnu = R_k for every class k, with sum_k dalpha_k given, so one iteration costs N Cholesky factorisations of
n x n matrices (batched over tasks and classes) plus one n x n Schur complement S = sum_k (K + diag(...))^-1:
O(N n^3). For 20-way 5-shot (n = 100) that is 2e7 instead of 8e9 flops per task per iteration.
scripts/bench_convex.py measures it against qpth (README, "The SVM solver, chosen by measurement").

**Gradients** are implicit (the KKT conditions differentiated at the returned iterate, as qpth and OptNet do):
the backward solves the same structured system, (K + diag(ridge + lambda/s)) w + w_nu 1^T = dL/dalpha with
sum_k w_k = 0, and dL/dK = -sym(w alpha^T). With lambda/s -> infinity on active constraints and -> 0 on
inactive ones this is the exact derivative of the solution map; at an interior-point iterate it is its
smoothed version. tests/test_convex_heads.py checks it against finite differences in float64.

**Ridge regression** (R2-D2, Bertinetto et al. 2019; MetaOptNet-RR) is closed form through the Woodbury
identity: W = X^T (X X^T + lambda I)^-1 Y needs one n x n Cholesky solve, never a d x d one; `ridge_dual`
returns (K + lambda I)^-1 Y and the heads score queries with Q X^T times it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Mehrotra's step: the fraction of the way to the boundary of the positive orthant taken (as qpth: 0.999)
STEP_FRACTION = 0.999


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative KKT tolerance at which the solver stops early (every constraint's complementarity gap, and the
    stationarity and feasibility residuals, these no lower than rounding allows): near the dtype's precision."""
    return 1e-14 if dtype == torch.float64 else 1e-9


@dataclass
class SVMSolution:
    """A primal-dual iterate of the SVM dual: alpha [T, n, N]; nu [T, n] the multipliers of the equality
    constraints; lam [T, n, N] >= 0 those of alpha <= C Y; slack [T, n, N] = C Y - alpha (> 0 in the interior);
    `iterations` taken by the batch: each task stops moving once it has converged, the batch when all have."""

    alpha: Tensor
    nu: Tensor
    lam: Tensor
    slack: Tensor
    iterations: int


class _Factorised:
    """Cholesky factors of M_k = K + diag(ridge + d_k) for every class k, and of the Schur complement
    S = sum_k M_k^-1: what one Newton system (and the backward) needs, reused by predictor and corrector."""

    def __init__(self, kernel: Tensor, diagonal: Tensor) -> None:
        # kernel [T, n, n]; diagonal [T, n, N] = ridge + d -> blocks [T, N, n, n]
        blocks = kernel.unsqueeze(1) + torch.diag_embed(diagonal.transpose(1, 2))
        self.chol = torch.linalg.cholesky(blocks)
        inverse_sum = torch.cholesky_inverse(self.chol).sum(dim=1)  # [T, n, n]
        self.schur = torch.linalg.cholesky(0.5 * (inverse_sum + inverse_sum.transpose(1, 2)))

    def solve(self, rhs: Tensor, row_sums: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, n, N] and nu [T, n] with (K + diag(ridge + d_k)) x_k + nu = rhs_k for every k, sum_k x_k = row_sums."""
        per_class = torch.cholesky_solve(rhs.transpose(1, 2).unsqueeze(-1), self.chol).squeeze(-1)  # [T, N, n]
        nu = torch.cholesky_solve((per_class.sum(dim=1) - row_sums).unsqueeze(-1), self.schur).squeeze(-1)
        x = torch.cholesky_solve((rhs.transpose(1, 2) - nu.unsqueeze(1)).unsqueeze(-1), self.chol).squeeze(-1)
        return x.transpose(1, 2), nu


def kkt_residuals(kernel: Tensor, onehot: Tensor, C: float, ridge: float, alpha: Tensor, nu: Tensor,
                  lam: Tensor) -> dict[str, Tensor]:
    """Per-task max-norm residuals [T] of the KKT conditions at (alpha, nu, lam): stationarity, the equality
    constraints, the inequality constraints' violation, the multipliers' negativity, complementary slackness."""
    slack = C * onehot - alpha
    stationarity = kernel @ alpha + ridge * alpha - onehot + nu.unsqueeze(-1) + lam
    return {
        "stationarity": stationarity.abs().amax(dim=(1, 2)),
        "equality": alpha.sum(dim=-1).abs().amax(dim=1),
        "feasibility": (-slack).clamp_min(0).amax(dim=(1, 2)),
        "dual_feasibility": (-lam).clamp_min(0).amax(dim=(1, 2)),
        "complementarity": (lam * slack).abs().amax(dim=(1, 2)),
    }


def _barrier_weights(lam: Tensor, slack: Tensor, scale: Tensor) -> Tensor:
    """lam / slack, the Newton system's diagonal: capped at 1 / eps^2 times the problem's scale, beyond which an
    entry is infinite at the dtype's precision anyway (the slack of an active constraint may underflow)."""
    cap = scale.view(-1, 1, 1) / torch.finfo(lam.dtype).eps ** 2
    return torch.minimum(lam / slack.clamp_min(torch.finfo(slack.dtype).tiny), cap)


def _max_step(value: Tensor, step: Tensor) -> Tensor:
    """Per task, the largest a <= 1 keeping value + a * step >= 0 (value > 0)."""
    ratios = torch.where(step < 0, -value / step, torch.ones_like(value))
    return ratios.amin(dim=(1, 2)).clamp(max=1.0)


@torch.no_grad()
def solve_svm_dual(kernel: Tensor, onehot: Tensor, C: float, ridge: float = 1.0, max_iter: int = 15,
                   tol: float | None = None) -> SVMSolution:
    """The batched interior-point solve of the SVM dual (module docstring): kernel [T, n, n], onehot [T, n, N].

    At most `max_iter` predictor-corrector iterations (MetaOptNet: 15 when training, 3 at test time); fewer
    when every task's relative KKT residual is below `tol` (default: near the dtype's precision).
    """
    if C <= 0:
        raise ValueError(f"the SVM's C must be positive (got {C})")
    if ridge <= 0:
        raise ValueError(f"the SVM dual's ridge must be positive (got {ridge})")
    tol = default_tolerance(kernel.dtype) if tol is None else tol
    rounding = 100 * torch.finfo(kernel.dtype).eps
    kernel = 0.5 * (kernel + kernel.transpose(1, 2))
    tasks, n, ways = onehot.shape
    bound = C * onehot
    # residuals are compared with the problem's own scale: its gradient is of order 1 + C (max K_ii + ridge)
    scale = 1.0 + C * (torch.diagonal(kernel, dim1=1, dim2=2).amax(dim=1) + ridge)  # [T]
    inequalities = n * ways

    # Start (as cvxopt and qpth): the equality-constrained solve with d = 1, then slack and multipliers shifted
    # into the positive orthant (to at least 1 when a component is not positive).
    factors = _Factorised(kernel, torch.full_like(onehot, ridge + 1.0))
    alpha, nu = factors.solve(onehot + bound, onehot.new_zeros(tasks, n))
    slack, lam = bound - alpha, alpha - bound

    def shifted(v: Tensor) -> Tensor:
        low = v.amin(dim=(1, 2), keepdim=True)
        return torch.where(low <= 0, v - low + 1.0, v)

    slack, lam = shifted(slack), shifted(lam)
    converged = torch.zeros(tasks, dtype=torch.bool, device=kernel.device)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        r_dual = kernel @ alpha + ridge * alpha - onehot + nu.unsqueeze(-1) + lam
        r_eq = alpha.sum(dim=-1)
        r_ineq = alpha + slack - bound
        mu = (slack * lam).sum(dim=(1, 2)) / inequalities
        factors = _Factorised(kernel, ridge + lam / slack)

        def direction(r_comp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            rhs = -r_dual - (r_comp + lam * r_ineq) / slack
            d_alpha, d_nu = factors.solve(rhs, -r_eq)
            d_slack = -r_ineq - d_alpha
            d_lam = (r_comp - lam * d_slack) / slack
            return d_alpha, d_nu, d_slack, d_lam

        # predictor (affine scaling), then the corrector centred by Mehrotra's sigma = (mu_aff / mu)^3
        a_alpha, a_nu, a_slack, a_lam = direction(-slack * lam)
        a_step = torch.minimum(_max_step(slack, a_slack), _max_step(lam, a_lam)).view(-1, 1, 1)
        mu_aff = ((slack + a_step * a_slack) * (lam + a_step * a_lam)).sum(dim=(1, 2)) / inequalities
        sigma = (mu_aff / mu).clamp(0.0, 1.0).pow(3)
        d_alpha, d_nu, d_slack, d_lam = direction((sigma * mu).view(-1, 1, 1) - slack * lam - a_slack * a_lam)
        step = (STEP_FRACTION * torch.minimum(_max_step(slack, d_slack), _max_step(lam, d_lam))).clamp(max=1.0)
        step, moving = step.view(-1, 1, 1), ~converged.view(-1, 1, 1)  # a converged task stays where it is
        alpha = torch.where(moving, alpha + step * d_alpha, alpha)
        nu = torch.where(moving.view(-1, 1), nu + step.view(-1, 1) * d_nu, nu)
        slack = torch.where(moving, slack + step * d_slack, slack)
        lam = torch.where(moving, lam + step * d_lam, lam)

        # relative measures: stationarity against the gradient's scale, the constraints against C, and each
        # constraint's complementarity gap against their product (lam is of the gradient's order, slack of C's);
        # the residuals cannot go below rounding, the gaps can (they set alpha's error on active constraints)
        residual = torch.stack([
            (kernel @ alpha + ridge * alpha - onehot + nu.unsqueeze(-1) + lam).abs().amax(dim=(1, 2)) / scale,
            alpha.sum(dim=-1).abs().amax(dim=1) / C,
            (alpha + slack - bound).abs().amax(dim=(1, 2)) / C,
        ]).amax(dim=0)
        gap = (slack * lam).amax(dim=(1, 2)) / (C * scale)
        converged = converged | ((residual < max(tol, rounding)) & (gap < tol))
        if bool(converged.all()):
            break
    return SVMSolution(alpha, nu, lam, slack, iterations)


class _SVMDual(torch.autograd.Function):
    """alpha(K): the batched solve forward, implicit differentiation of its KKT conditions backward."""

    @staticmethod
    def forward(ctx: Any, kernel: Tensor, onehot: Tensor, C: float, ridge: float, max_iter: int,
                tol: float | None) -> Tensor:
        solution = solve_svm_dual(kernel.detach(), onehot.detach(), C, ridge, max_iter, tol)
        ctx.save_for_backward(kernel.detach(), solution.alpha, solution.lam, solution.slack)
        ctx.ridge, ctx.C = ridge, C
        return solution.alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_alpha: Tensor) -> tuple[Tensor | None, ...]:
        kernel, alpha, lam, slack = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        kernel = 0.5 * (kernel + kernel.transpose(1, 2))
        scale = 1.0 + ctx.C * (torch.diagonal(kernel, dim1=1, dim2=2).amax(dim=1) + ctx.ridge)
        factors = _Factorised(kernel, ctx.ridge + _barrier_weights(lam, slack, scale))
        w, _ = factors.solve(grad_alpha, grad_alpha.new_zeros(grad_alpha.shape[:2]))
        product = w @ alpha.transpose(1, 2)
        return -0.5 * (product + product.transpose(1, 2)), None, None, None, None, None


def svm_dual(kernel: Tensor, onehot: Tensor, C: float, ridge: float = 1.0, max_iter: int = 15,
             tol: float | None = None) -> Tensor:
    """alpha [T, n, N] of the Crammer-Singer SVM dual of T tasks (kernel [T, n, n], onehot [T, n, N] float),
    differentiable with respect to the kernel by implicit differentiation (module docstring)."""
    return _SVMDual.apply(kernel, onehot, C, ridge, max_iter, tol)


def ridge_dual(kernel: Tensor, targets: Tensor, lam: Tensor | float) -> Tensor:
    """(K + lam I)^-1 targets for T tasks at once (kernel [T, n, n], targets [T, n, N], lam a scalar or [T]
    tensor): the dual of ridge regression, W = X^T (K + lam I)^-1 Y by the Woodbury identity (an n x n solve,
    never d x d). Differentiable in kernel and lam through autograd (Cholesky factorisation and solves)."""
    n = kernel.shape[-1]
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    lam = torch.as_tensor(lam, dtype=kernel.dtype, device=kernel.device).reshape(-1, 1, 1)
    factor = torch.linalg.cholesky(kernel + lam * eye)
    return torch.cholesky_solve(targets, factor)
