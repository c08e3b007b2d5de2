"""The finite-horizon Gittins index of a Bernoulli arm with a Beta(1, 1) prior, as a table over (pulls left, s, f).

Which index: a trial of the bandit benchmark is n pulls, undiscounted, so the index that fits is the
finite-horizon Gittins index (Gittins' "calibration" against a standard arm, restricted to the pulls that are
left; Nino-Mora 2011, "Computing a classic index for finite-horizon bandits", INFORMS J. Computing 23(2); its
use as the Bayesian bandit index policy: Kaufmann 2018, "On Bayesian index policies for sequential resource
allocation", Ann. Statist. 46(2)). For an arm whose posterior is Beta(1 + s, 1 + f) with k pulls left, the
index is the retirement reward lambda at which one is indifferent between retiring now (lambda per pull for the k
pulls) and pulling the arm with the option to retire later:

    W_k(s, f; l) = max(l S_k,  p (1 + g W_{k-1}(s+1, f; l)) + (1 - p) g W_{k-1}(s, f+1; l)),  W_0 = 0,
    p = (1 + s) / (2 + s + f),  S_k = 1 + g + ... + g^(k-1),

and nu_k(s, f) is the smallest l at which retiring is optimal (g = 1 for the bandit benchmark; g < 1 with a long
horizon gives the classic discounted index, which is how the tests check the DP against Gittins' published table).

How: the DP is one pass over k for every state at once, evaluated on a grid of G values of l (chunked), and each
state's index is the root of the difference D(l) = l S_k - continuation(l) (increasing: slope >= 1), linearly
interpolated between the two grid values that bracket it. D is concave and piecewise linear, so the
interpolation is exact unless a kink of D falls inside the bracket: the error is below the grid step 1/(G-1),
and measured at most 2.5e-5 against per-state bisection (n = 14; the tests check n = 9). Cost: ~(n+1)^3/3 x G cell updates: n = 10
in 10 ms, n = 100 in 3 to 4.6 s (this 2-core machine, busy with another job), n = 500 would take ~125x that, so
tables stop at MAX_PULLS; a table is kept in memory and, when its build took over a second, on disk (4 MB for
n = 100, in the metarun cache dir, keyed by n, g and G).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metarun.benchmarks.store import cache_root
from metarun.errors import UserInputError

GRID = 1025  # retirement rewards l = 0, 1/1024, ..., 1
MAX_PULLS = 200  # table size and build time grow as pulls^3
_CELLS = 2_000_000  # grid values x states per DP array of a pass (16 MB of float64)
_FORMAT = 2  # bump when the table's definition or layout changes


def _build(pulls: int, discount: float, grid: int) -> Tensor:
    """nu[k, s, f] for k = 1..pulls pulls left and s, f <= pulls - k (NaN elsewhere; row k = 0 unused)."""
    n = pulls
    table = np.full((n + 1, n + 1, n + 1), np.nan)
    levels = np.linspace(0.0, 1.0, grid)
    s = np.arange(n + 1)[:, None]
    f = np.arange(n + 1)[None, :]
    p = (1.0 + s) / (2.0 + s + f)  # [n+1, n+1] posterior mean of every (s, f)
    found = np.zeros((n + 1, n + 1, n + 1), dtype=bool)
    chunk = max(8, _CELLS // (n + 2) ** 2)
    last_d = np.zeros((n + 1, n + 1, n + 1))  # D at the previous chunk's last grid value, per (k, s, f)
    for start in range(0, grid, chunk):
        lam = levels[start:start + chunk][:, None, None]  # [C, 1, 1]
        w = np.zeros((lam.shape[0], n + 2, n + 2))  # W_{k-1} on (s, f), padded by one for the successors
        for k in range(1, n + 1):
            m = n - k + 1  # states with s + f <= n - k live in the first m x m corner
            horizon_sum = float(k) if discount == 1.0 else (1.0 - discount**k) / (1.0 - discount)
            pk = p[:m, :m]
            cont = pk * (1.0 + discount * w[:, 1:m + 1, :m]) + (1.0 - pk) * discount * w[:, :m, 1:m + 1]
            retire = lam * horizon_sum
            d = retire - cont  # [C, m, m], increasing along the grid axis
            w_new = np.zeros_like(w)
            w_new[:, :m, :m] = np.maximum(retire, cont)
            w = w_new
            below = (d < 0).sum(axis=0)  # grid values of this chunk before the root
            todo = ~found[k, :m, :m]
            inside = todo & (below < d.shape[0])
            if inside.any():
                i, j = np.nonzero(inside)
                g = below[i, j]
                d_hi = d[g, i, j]
                lam_hi = levels[start + g]
                first = g == 0  # the bracket's lower end is the previous chunk's last value
                d_lo = np.where(first, last_d[k, i, j], d[np.maximum(g - 1, 0), i, j])
                lam_lo = levels[np.maximum(start + g - 1, 0)]
                step = lam_hi - lam_lo
                frac = np.where(d_hi > d_lo, -d_lo / np.where(d_hi > d_lo, d_hi - d_lo, 1.0), 0.0)
                table[k, i, j] = np.where(step > 0, lam_lo + frac * step, lam_hi)
                found[k, i, j] = True
            last_d[k, :m, :m] = d[-1]
        if all(found[k, : n - k + 1, : n - k + 1].all() for k in range(1, n + 1)):
            break
    return torch.from_numpy(table).float()  # float32: 7 digits against an interpolation error of ~1e-5


def _cache_file(pulls: int, discount: float, grid: int) -> Path:
    return cache_root(None) / f"gittins-n{pulls}-g{discount!r}-G{grid}-v{_FORMAT}.pt"


@functools.cache
def gittins_table(pulls: int, discount: float = 1.0, grid: int = GRID) -> Tensor:
    """float32 [pulls + 1, pulls + 1, pulls + 1]: nu[k, s, f], the index with k pulls left (1..pulls) of an arm
    seen to succeed s and fail f times. Built once per process; kept on disk when it took over a second."""
    if not 1 <= pulls <= MAX_PULLS:
        raise UserInputError(f"the Gittins index table is built for 1 to {MAX_PULLS} pulls (got {pulls}): it "
                             f"grows as pulls^3 (n = 100: 4 MB, ~4 s once; n = 500 would be 0.5 GB and ~10 min)")
    path = _cache_file(pulls, discount, grid)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError):
            pass  # unreadable: rebuild it
    started = time.perf_counter()
    table = _build(pulls, discount, grid)
    if time.perf_counter() - started > 1.0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")
            torch.save(table, partial)
            partial.replace(path)
        except OSError:
            pass  # a read-only cache costs the next run the build again, nothing else
    return table


def calibrate(successes: int, failures: int, pulls_left: int, discount: float = 1.0, tol: float = 1e-10) -> float:
    """The index of one state by bisection on l, each probe a DP over the states it can reach (the
    conventional calibration method: slow, exact; the reference that the table is tested against)."""
    lo, hi = (1.0 + successes) / (2.0 + successes + failures), 1.0  # the index lies between the mean and 1
    while hi - lo > tol:
        lam = 0.5 * (lo + hi)
        if _continuation(successes, failures, pulls_left, discount, lam) <= lam * _horizon_sum(pulls_left, discount):
            hi = lam
        else:
            lo = lam
    return 0.5 * (lo + hi)


def _horizon_sum(k: int, discount: float) -> float:
    return float(k) if discount == 1.0 else (1.0 - discount**k) / (1.0 - discount)


def _continuation(s0: int, f0: int, k: int, discount: float, lam: float) -> float:
    """Value of pulling now (then acting optimally) with retirement reward `lam`, from (s0, f0) with k left."""
    # level j: states after j more pulls, indexed by the extra successes i = 0..j
    w = np.zeros(k + 1)  # W_0 at the deepest level (j = k)
    for j in range(k - 1, -1, -1):
        i = np.arange(j + 1)
        p = (1.0 + s0 + i) / (2.0 + s0 + f0 + j)
        cont = p * (1.0 + discount * w[i + 1]) + (1.0 - p) * discount * w[i]
        if j == 0:
            return float(cont[0])
        w = np.maximum(lam * _horizon_sum(k - j, discount), cont)
    raise AssertionError("unreachable")


def discounted_index(successes: int, failures: int, discount: float, tol: float = 1e-8) -> float:
    """The classic (infinite-horizon, discounted) Gittins index, truncated where discount^k < tol."""
    return calibrate(successes, failures, max(1, math.ceil(math.log(tol) / math.log(discount))), discount)
