"""Causal Transformer over a trial's history: `model=transformer` on sequence inputs (L, F).

What `model=transformer` builds when the input shape has rank 2 (metarun/models/transformer.py): one token
per time step (a Linear embedding of the step's F features plus a learned position embedding, as GPT-2's, for
L positions), `depth` pre-LayerNorm blocks with causal self-attention, a final LayerNorm; output t is the
feature vector of step t, read only from steps 0..t. It is the in-context policy of RL^2-style meta-RL with
attention instead of recurrence (Mishra et al. 2018's SNAIL and Melo 2022's TrMRL are attention policies).

Rollouts call `step` once per time step with a key/value cache preallocated for the L steps, so step t
costs one token's projections and one attention row over t + 1 cached keys (O(t)), not a forward over the
whole history (O(t^2) per step). The cache is written in place: `step` is for rollouts under no_grad; the
learner differentiates the full-sequence `forward`, which tests/test_sequence_models.py checks equals the
steps.

Attention runs through torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA; no
[B, H, L, L] weight tensor for long trials). The supervised Transformer writes it out instead because MAML
differentiates it twice under vmap (see transformer.py); no learner differentiates this one twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.defaults import option_defaults
from metarun.models.base import SequenceBackbone
from metarun.models.transformer import Block, LayerNorm, SelfAttention

_DEFAULTS = option_defaults("model", "transformer")  # one model=transformer option serves both classes


@dataclass
class KVCache:
    """The keys and values of the steps taken so far, for every block: [depth, B, heads, L, head_dim] each,
    filled up to `length`."""

    keys: Tensor
    values: Tensor
    length: int


class CausalSelfAttention(SelfAttention):
    """The supervised Transformer's multi-head self-attention (same projections), in which token t attends to
    tokens 0..t, through SDPA (nothing differentiates it twice), and one step at a time over a key/value cache."""

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, width] -> q, k, v [B, heads, L, head_dim]."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _merge(self, out: Tensor) -> Tensor:
        return self.proj(out.transpose(1, 2).flatten(-2))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: Tensor, keys: Tensor, values: Tensor, t: int) -> Tensor:
        """x [B, 1, width] at time t; keys/values [B, heads, L, head_dim] receive this step's at index t."""
        q, k, v = self._split(x)
        keys[:, :, t] = k[:, :, 0]
        values[:, :, t] = v[:, :, 0]
        # one query row over the t + 1 cached steps: no mask needed (SDPA's is_causal would align it top-left)
        return self._merge(F.scaled_dot_product_attention(q, keys[:, :, : t + 1], values[:, :, : t + 1]))


class CausalBlock(Block):
    """The supervised Transformer's pre-LayerNorm block (x + Attn(LN(x)), then x + MLP(LN(x)), GELU) with causal
    attention, and its one-step form over a key/value cache."""

    attn: CausalSelfAttention

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__(width, heads, mlp_ratio, attention=CausalSelfAttention)

    def step(self, x: Tensor, keys: Tensor, values: Tensor, t: int) -> Tensor:
        x = x + self.attn.step(self.norm1(x), keys, values, t)
        return x + self.mlp(self.norm2(x))


class SequenceTransformer(nn.Module, SequenceBackbone):
    """input_shape (L, F): x [B, L, F] -> [B, L, width], causal; `step` with a key/value cache of L steps."""

    def __init__(self, input_shape: Sequence[int], width: int = _DEFAULTS["width"], depth: int = _DEFAULTS["depth"],
                 heads: int = _DEFAULTS["heads"], mlp_ratio: float = _DEFAULTS["mlp_ratio"]) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"a sequence Transformer takes inputs (length, features), got shape {shape}")
        if width < 1 or heads < 1 or width % heads:
            raise ValueError(f"model.width ({width}) must be a positive multiple of model.heads ({heads})")
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1 (got {depth})")
        if mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be > 0 (got {mlp_ratio})")
        self.length, features = shape
        self.heads = heads
        self.embed = nn.Linear(features, width)
        self.position = nn.Parameter(torch.randn(self.length, width) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(width)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        steps = x.shape[-2]
        if steps > self.length:
            raise ValueError(f"a sequence of {steps} steps is longer than the {self.length} this model was built for")
        h = self.embed(x) + self.position[:steps]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def initial_memory(self, batch_size: int) -> KVCache:
        """An empty cache for `batch_size` sequences of up to L steps."""
        shape = (len(self.blocks), batch_size, self.heads, self.length, self.out_features // self.heads)
        weight = self.embed.weight
        keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        return KVCache(keys, torch.zeros_like(keys), 0)

    def step(self, x: Tensor, memory: KVCache) -> tuple[Tensor, KVCache]:
        """x [B, F]: the next step of every sequence -> its features [B, width]; the cache grows by one step."""
        t = memory.length
        if t >= self.length:
            raise ValueError(f"step {t + 1} is past the {self.length} steps this model was built for")
        h = (self.embed(x) + self.position[t]).unsqueeze(1)
        for index, block in enumerate(self.blocks):
            h = block.step(h, memory.keys[index], memory.values[index], t)
        return self.norm(h.squeeze(1)), KVCache(memory.keys, memory.values, t + 1)
