"""Transformer backbone for every input kind: image patches (ViT), vector features (FT-Transformer), and
sequences (a causal Transformer over a trial's steps, metarun/models/sequence_transformer.py).

Images follow Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021: non-overlapping patches, a linear patch embedding, learned position embeddings,
pre-LayerNorm blocks and a class token (or mean pooling). Vectors follow the feature tokenizer of
Gorishniy et al., "Revisiting Deep Learning Models for Tabular Data", NeurIPS 2021: feature i becomes
the token x_i * w_i + b_i, so the bias b_i also tells the blocks which feature a token is.

Everything here must survive what MAML does to it: torch.func.vmap over tasks of torch.func.grad of
a functional_call, differentiated once more for the second-order meta-gradient. Three consequences,
each checked against the per-task float64 reference in tests/test_transformer.py:

* LayerNorm applies its affine weight and bias outside the fused kernel (`LayerNorm` below).
  Measured on torch 2.13 (CPU, float64): with the weight inside `F.layer_norm`, the vmapped
  second-order meta-gradient of every parameter *before* the norm is wrong when the weight is a
  per-task (adapted) tensor: 2e-3 to 2e-1 relative error in this model (worst parameter, 1 or 2
  inner steps), 1.7e-1 in a one-layer probe. First order, the same code without vmap, and the
  norm without the weight are exact (~1e-15), as is this model with the split LayerNorm (<5e-15);
  compare pytorch/functorch#534 (layer_norm backward batching rule wrong for grad_input).
* Attention is written out as softmax(Q K^T / sqrt(d)) V instead of calling
  torch.nn.functional.scaled_dot_product_attention. Measured on torch 2.13 (CPU, float32 and
  float64): SDPA dispatches to `_scaled_dot_product_flash_attention_for_cpu` even with create_graph,
  and that kernel's backward has no derivative, so second-order MAML raises "derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" (with or without
  vmap); under vmap the kernel also has no batching rule and falls back to a per-task loop. SDPA's
  math backend and the explicit path both match the per-task float64 reference to ~2e-15; the
  explicit path needs no global backend switch (tests/test_transformer.py checks it).
* The patch embedding is a reshape plus a Linear rather than a strided Conv2d: the same function
  when the patch size divides the image, but a plain matmul under vmap and double backward.

Sequence inputs (L, F) get another model with another contract (SequenceBackbone: per-step outputs and a
`step` for rollouts), so `Transformer(input_shape=(L, F), ...)` returns a `SequenceTransformer`
(`_BuildsSequenceModel` below); one `model=transformer` option serves all three kinds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from metarun.defaults import option_defaults
from metarun.models.base import Backbone, InputKind

Pool = Literal["cls", "mean"]


_DEFAULTS = option_defaults("model", "transformer")


class SelfAttention(nn.Module):
    """Multi-head self-attention over the token axis (second to last); any leading dimensions."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        *lead, tokens, width = x.shape
        head_dim = width // self.heads
        # [..., L, 3, H, d] -> three [..., H, L, d]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, head_dim)).movedim(-3, 0).transpose(-2, -3)
        # Explicit softmax(Q K^T / sqrt(d)) V: twice differentiable and batchable (module docstring).
        weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-1, -2), dim=-1)
        out = (weights @ v).transpose(-2, -3).reshape(*lead, tokens, width)
        return self.proj(out)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with the affine part as separate ops: correct under vmap
    with double backward, where the fused affine LayerNorm is not (module docstring)."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, attention: type[nn.Module] | None = None) -> None:
        super().__init__()
        hidden = max(1, round(width * mlp_ratio))
        self.norm1 = LayerNorm(width)
        self.attn = (attention or SelfAttention)(width, heads)
        self.norm2 = LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchTokenizer(nn.Module):
    """[N, C, H, W] -> [N, (H/p)(W/p), width]: flattened p x p patches, a Linear, and learned positions."""

    def __init__(self, input_shape: Sequence[int], patch: int, width: int) -> None:
        super().__init__()
        channels, height, width_px = (int(s) for s in input_shape)
        if patch < 1 or height % patch or width_px % patch:
            divisors = [d for d in range(1, math.gcd(height, width_px) + 1) if math.gcd(height, width_px) % d == 0]
            raise ValueError(f"model.patch={patch} must divide the image size {height}x{width_px}; "
                             f"choose one of {divisors}")
        self.patch = patch
        self.grid = (height // patch, width_px // patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(channels * patch * patch, width)
        self.position = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        p, (gh, gw) = self.patch, self.grid
        *lead, c, _, _ = x.shape
        n = len(lead)
        # [..., C, gh, p, gw, p] -> [..., gh, gw, C, p, p]: patches in row-major order, each flattened
        # channel-major like a Conv2d(kernel=stride=p) weight, so the two embeddings are interchangeable.
        patches = x.reshape(*lead, c, gh, p, gw, p).permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)
        return self.embed(patches.flatten(-3).flatten(-3, -2)) + self.position


class FeatureTokenizer(nn.Module):
    """[N, D] -> [N, D, width]: token i = x_i * w_i + b_i (Gorishniy et al. 2021), plus optional
    Fourier features [sin(f_j x_i), cos(f_j x_i)] mapped to the width by a per-feature linear map.

    The frequencies are fixed octaves f_j = 2^(j - 2) (periods 8*pi, 4*pi, ...), not random: no
    global RNG draw, identical in every run, and a buffer so .to(), .double() and functional_call
    (which receives the module's buffers) all see them.
    """

    def __init__(self, features: int, width: int, fourier_features: int) -> None:
        super().__init__()
        bound = width**-0.5
        self.weight = nn.Parameter(torch.empty(features, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(features, width).uniform_(-bound, bound))
        if fourier_features > 0:
            self.register_buffer("frequencies", 2.0 ** (torch.arange(fourier_features, dtype=torch.float32) - 2))
            fan_in = 2 * fourier_features
            self.fourier = nn.Parameter(torch.empty(features, fan_in, width).uniform_(-fan_in**-0.5, fan_in**-0.5))
        else:
            self.fourier = None

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(-1)  # [..., D, 1]
        tokens = x * self.weight + self.bias
        if self.fourier is not None:
            angles = x * self.frequencies  # [..., D, F]
            periodic = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [..., D, 2F]
            # Per-feature map [..., D, 2F] x [D, 2F, width]: einsum batches it as D matmuls over all
            # rows, where `periodic.unsqueeze(-2) @ self.fourier` would be N*D products of one row each.
            tokens = tokens + torch.einsum("...df,dfw->...dw", periodic, self.fourier)
        return tokens


class _BuildsSequenceModel:
    """`Transformer(input_shape=(L, F), ...)` is a SequenceTransformer (width, depth, heads and mlp_ratio; the
    patch, pool and Fourier options are the other kinds'). Python runs no `__init__` on an object `__new__`
    returns that is not an instance of the class called, so the sequence model is built once, by its own class.
    `__new__` lives in this base rather than in Transformer so that inspect.signature(Transformer), which the
    config's key check and tests/test_defaults.py read, stays Transformer.__init__'s."""

    def __new__(cls, input_shape: Sequence[int] | None = None, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if input_shape is not None and len(tuple(input_shape)) == 2:
            from metarun.models.sequence_transformer import SequenceTransformer

            names = ("width", "depth", "heads", "mlp_ratio", "patch", "pool", "fourier_features")
            options = {**dict(zip(names, args)), **kwargs}
            return SequenceTransformer(input_shape, **{k: v for k, v in options.items() if k in names[:4]})
        return super().__new__(cls)


class Transformer(_BuildsSequenceModel, nn.Module, Backbone):
    """Tokens (image patches or vector features), `depth` pre-LN blocks, final LayerNorm, pooled to `width`.

    `pool="cls"` prepends a learned class token and returns its output (ViT); `pool="mean"` averages
    the token outputs and has no class token. Sequence inputs build a SequenceTransformer (see above).
    """

    accepts: ClassVar[frozenset[InputKind]] = frozenset({"vector", "image", "sequence"})

    def __init__(
        self,
        input_shape: Sequence[int],
        width: int = _DEFAULTS["width"],
        depth: int = _DEFAULTS["depth"],
        heads: int = _DEFAULTS["heads"],
        mlp_ratio: float = _DEFAULTS["mlp_ratio"],
        patch: int = _DEFAULTS["patch"],
        pool: Pool = _DEFAULTS["pool"],
        fourier_features: int = _DEFAULTS["fourier_features"],
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if width < 1 or heads < 1 or width % heads:
            raise ValueError(f"model.width ({width}) must be a positive multiple of model.heads ({heads})")
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1 (got {depth})")
        if mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be > 0 (got {mlp_ratio})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"model.pool must be 'cls' or 'mean' (got {pool!r})")
        if fourier_features < 0:
            raise ValueError(f"model.fourier_features must be >= 0, 0 = off (got {fourier_features})")
        self.tokenizer: nn.Module
        if len(shape) == 3:
            self.tokenizer = PatchTokenizer(shape, patch, width)
        elif len(shape) == 1:
            self.tokenizer = FeatureTokenizer(shape[0], width, fourier_features)
        else:
            raise ValueError(f"model=transformer takes vector (D,), sequence (L,F) or image (C,H,W) inputs "
                             f"(got shape {shape})")
        self.pool = pool
        # The class token's position is its own parameter, so image position embeddings cover patches only.
        self.cls = nn.Parameter(torch.randn(width) * 0.02) if pool == "cls" else None
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = LayerNorm(width)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.tokenizer(x)  # [..., L, width]
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(*tokens.shape[:-2], 1, -1), tokens], dim=-2)
        tokens = self.norm(self.blocks(tokens))
        return tokens[..., 0, :] if self.cls is not None else tokens.mean(dim=-2)
