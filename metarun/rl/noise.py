"""Counter-based random numbers for rollouts: uniform = hash(task seed, trial, step, stream).

Why not torch.Generator: a generator's numbers depend on the shape of every draw before them, so a task's
rollout would change with the tasks beside it, with the evaluation chunking and with the device. A hash of
counters depends on nothing else; it is a handful of integer ops per number, vectorised over [T, E, ...].
Integer arithmetic is done on values below 2^32 held in int64 (products wrap, the low 32 bits stay exact), so
CPU and CUDA give the same bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
ENV_STREAMS = 16  # streams 0..15 belong to the environment
POLICY_STREAM = 16  # the policy's action draws use streams >= this


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (the `lowbias32` hash): every input bit affects every output bit."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _mix_(x: Tensor) -> Tensor:
    """`_mix` in place, on a tensor of the caller's own whose values are already below 2^32 (so the first mask is
    a no-op): the same bits, five fewer allocations per call (rollouts call it every step)."""
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_MASK)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_MASK)
    x ^= x >> 16
    return x


def _mix_int(x: int) -> int:
    """`_mix` of one Python integer: the same 32-bit arithmetic (the product masked after each multiply, as the
    int64 tensor's wrapped product keeps its low 32 bits), without a tensor op per step for a scalar."""
    x &= _MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


class TaskNoise:
    """The random stream of T tasks x E trials. `uniform(stream, step, *shape)` -> [T, E, *shape] in [0, 1)."""

    def __init__(self, seeds: Tensor, trials_per_task: int) -> None:
        self.seeds = seeds.to(torch.int64)
        self.trials_per_task = trials_per_task
        # per (task, trial) key, mixed once: the seed's two halves and the trial index
        trial = torch.arange(trials_per_task, device=seeds.device, dtype=torch.int64)
        low, high = self.seeds & _MASK, (self.seeds >> 32) & _MASK
        self._key = _mix(_mix(low)[:, None] ^ high[:, None] ^ _mix(trial + 0x9E3779B9)[None, :])  # [T, E]
        self._index_keys: dict[tuple[int, ...], Tensor] = {}  # shape -> mixed element indices (step-independent)

    def _index_key(self, shape: tuple[int, ...]) -> Tensor:
        """The mixed index of every element of `shape`, built once per shape: it depends on nothing else."""
        key = self._index_keys.get(shape)
        if key is None:
            index = torch.arange(math.prod(shape), device=self._key.device, dtype=torch.int64).view(shape)
            key = self._index_keys[shape] = _mix(index + 0x85EBCA6B)
        return key

    def uniform(self, stream: int, step: int, *shape: int) -> Tensor:
        """Uniform float32 numbers (24 random bits) for time `step` of stream `stream`, one per [T, E, *shape].

        The (step, stream) counter is hashed in Python integers (a scalar: a tensor for it cost a dozen op
        dispatches a call), then combined with the [T, E] key; every value stays below 2^32, so the tensor hashes
        run in place without their first mask."""
        counter = _mix_int(step * 1_000_003 + stream * 7919 + 0x632BE5AB)
        key = _mix_(self._key ^ counter)
        if shape:
            key = _mix_(key.view(*key.shape, *([1] * len(shape))) ^ self._index_key(tuple(shape)))
        key >>= 8
        return key.to(torch.float32).mul_(1.0 / (1 << 24))

    def normal(self, stream: int, step: int, *shape: int) -> Tensor:
        """Standard normal numbers (Box-Muller on two uniform streams: `stream` and `stream + 1`)."""
        u1 = self.uniform(stream, step, *shape).clamp_min(1.0 / (1 << 25))
        u2 = self.uniform(stream + 1, step, *shape)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)

    def categorical(self, stream: int, step: int, probs: Tensor) -> Tensor:
        """One draw per [T, E] from `probs` [T, E, K] (inverse CDF on one uniform)."""
        u = self.uniform(stream, step).unsqueeze(-1)
        index = (probs.cumsum(-1) <= u).sum(-1)
        return index.clamp_max(probs.shape[-1] - 1)
