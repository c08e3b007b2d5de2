"""The backbone contract: input -> features. Heads belong to algorithms, so one backbone serves every algorithm.

Backbones are nn.Modules that subclass `Backbone` explicitly, which gives them the default behaviour of
every optional hook below; run.py, the algorithms and the trainer call the hooks directly, never probing.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

from torch import Tensor, nn
from torch.func import functional_call

from metarun.vmap import over_tasks

InputKind = Literal["vector", "image", "sequence", "tokens"]


class TokenShape(tuple[int, ...]):
    """The input shape of tokenised text: (2, max_length), ids and attention mask stacked as int64 [N, 2, L].

    A tuple (so every shape-reading line works unchanged) that also names its kind and the tokenizer's id range:
    a shape's length alone cannot tell text from a (L, F) sequence, and a model must refuse ids it has no
    embedding for before its first forward pass, not with an index error inside it."""

    vocab_size: int

    def __new__(cls, max_length: int, vocab_size: int) -> "TokenShape":
        shape = super().__new__(cls, (2, max_length))
        shape.vocab_size = vocab_size
        return shape

    def __getnewargs__(self) -> tuple[int, int]:  # copy/pickle rebuild it from (max_length, vocab_size)
        return self[1], self.vocab_size


def input_kind(input_shape: tuple[int, ...]) -> InputKind:
    """vector [F], sequence [L, F] (a trial's history, causal), image [C, H, W], tokens (TokenShape: text)."""
    if isinstance(input_shape, TokenShape):
        return "tokens"
    return {1: "vector", 2: "sequence", 3: "image"}[len(input_shape)]


class Backbone(Protocol):
    """`forward(x [N, *input_shape]) -> [N, out_features]`, built with the benchmark's `input_shape`."""

    # what run.py checks the benchmark's inputs against before building (one-line refusal otherwise)
    accepts: ClassVar[frozenset[InputKind]] = frozenset({"vector", "image"})
    out_features: int  # the feature size an algorithm's head or metric reads

    def forward_per_task(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The forward pass of T tasks at once, task t with its own weights: x [T, N, *input_shape],
        params[name] [T, *shape] -> [T, N, out_features]. MAML adapts one copy of the weights per task.

        Default: torch.func.vmap over a functional_call (metarun.vmap.over_tasks: each task draws its own
        dropout masks). A model simple enough to write it as batched matrix products overrides it (MLP:
        models/per_task.py), which skips vmap's per-call Python."""
        assert isinstance(self, nn.Module)
        buffers = dict(self.named_buffers())
        return over_tasks(lambda p, xt: functional_call(self, (p, buffers), (xt,)))(params, x)

    def modulated_widths(self) -> list[int] | None:
        """The widths of the layers whose units a task-aware modulation scales and shifts inside the network
        (MMAML's FiLM), when `forward(x, modulation=[(scale, shift) per layer])` accepts one. Default None: the
        network is modulated on its output features only."""
        return None

    def set_progress(self, step: int) -> None:
        """Told by the trainer before each training step how many steps are done (0 at the first), for
        regularisers on a schedule (ResNet-12's DropBlock rate rises linearly over its first steps, as the
        original's). A function of the step alone, so a resumed run continues the schedule exactly.
        Default: nothing follows the progress."""

    def update_running_stats(self, *image_sets: Tensor) -> None:
        """Move running normalisation statistics towards those of `image_sets` (each [T, N_i, *input_shape]).

        Called by the trainer once per training step, outside any vmapped pass (a buffer cannot be written
        under vmap), with the support and query inputs of the step's tasks; not called when every parameter of
        the backbone is frozen (requires_grad False: LEO on a pre-trained backbone). Default: nothing to update."""


class SequenceBackbone(Backbone, Protocol):
    """A causal model of sequences (input_shape (L, F)): `forward(x [B, L, F]) -> [B, L, out_features]`, where
    output t reads inputs 0..t only, and the same computation one step at a time for rollouts:
    `step(x [B, F], memory) -> ([B, out_features], memory)` from `initial_memory(B)`. A trial's forward over
    the collected history equals its step-by-step rollout (tests/test_sequence_models.py)."""

    accepts: ClassVar[frozenset[InputKind]] = frozenset({"sequence"})

    def initial_memory(self, batch_size: int) -> object:
        ...

    def step(self, x: Tensor, memory: object) -> tuple[Tensor, object]:
        ...
