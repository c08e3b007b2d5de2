"""Posterior draws for the Bayesian baselines (Thompson sampling, PSRL) from a policy's TaskNoise streams.

Gamma(alpha >= 1) by Marsaglia and Tsang's squeeze method (ACM TOMS 26(3), 2000) with a fixed number of
vectorised rounds instead of a rejection loop: a round is accepted with probability >= 0.95 for alpha >= 1, so all
`ROUNDS` fail with probability < 0.05^6 ~ 2e-8, and then the draw is the mode-like d = alpha - 1/3 (a bias far
below anything an evaluation pool can see). Beta and Dirichlet are normalised Gammas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarun.rl.noise import TaskNoise

ROUNDS = 6
STREAMS = 3  # a Gamma draw uses streams s (normal: s, s + 1) and s + 2 (acceptance uniform)


def gamma(noise: TaskNoise, stream: int, step: int, alpha: Tensor) -> Tensor:
    """Gamma(alpha, 1) draws, alpha [T, E, *shape] >= 1, from streams stream .. stream + 2 at `step`."""
    shape = alpha.shape[2:]
    x = noise.normal(stream, step, *shape, ROUNDS).to(alpha.dtype)
    u = noise.uniform(stream + 2, step, *shape, ROUNDS).to(alpha.dtype)
    d = (alpha - 1.0 / 3.0).unsqueeze(-1)
    c = 1.0 / torch.sqrt(9.0 * d)
    v = (1.0 + c * x) ** 3
    positive = v > 0
    log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
    accept = positive & (torch.log(u) < 0.5 * x**2 + d - d * v + d * log_v)
    first = accept.to(torch.uint8).argmax(-1, keepdim=True)  # the first accepted round
    draw = (d * v).gather(-1, first).squeeze(-1)
    return torch.where(accept.any(-1), draw, d.squeeze(-1))


def beta(noise: TaskNoise, stream: int, step: int, a: Tensor, b: Tensor) -> Tensor:
    """Beta(a, b) draws (a, b >= 1, [T, E, *shape]) as Ga / (Ga + Gb), from streams stream .. stream + 2."""
    both = gamma(noise, stream, step, torch.stack([a, b], dim=-1))
    return both[..., 0] / both.sum(-1)


def dirichlet(noise: TaskNoise, stream: int, step: int, concentration: Tensor) -> Tensor:
    """Dirichlet draws over the last dimension of `concentration` (entries >= 1), from streams stream .. + 2."""
    draws = gamma(noise, stream, step, concentration)
    return draws / draws.sum(-1, keepdim=True)
