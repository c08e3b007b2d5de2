"""Meta-SGD: Li, Zhou, Chen and Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
arXiv:1707.09835, 2017.

MAML's inner step theta' = theta - alpha * grad with a learned learning rate per weight: alpha is a
tensor of theta's shape for every parameter, initialised to `inner_lr` and meta-learned with theta by
the trainer's outer optimizer (the paper: one inner step, second order, both by Adam). The update
direction as well as the step size is learned, since alpha's entries may change sign.

Everything else is MAML's batched computation (metarun/algorithms/maml.py): this class only supplies
the per-weight rates. First order detaches the inner gradient; alpha still gets a gradient then,
through the product alpha * grad. Evaluation adapts with the learned rates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from typing import ClassVar

from metarun.algorithms.maml import MAML
from metarun.benchmarks.base import Kind, TaskSpec
from metarun.defaults import option_defaults
from metarun.models.base import Backbone

Params = dict[str, Tensor]


def lr_key(name: str) -> str:
    """The learning-rate parameter's name for parameter `name` (module names cannot contain dots)."""
    return name.replace(".", "-")


_DEFAULTS = option_defaults("algo", "metasgd")


class MetaSGD(MAML):
    """Backbone plus a linear head, adapted per task by `inner_steps` steps with learned per-weight rates."""

    supports: ClassVar[frozenset[Kind]] = frozenset({"classification", "regression"})  # MAML for RL: algo=maml
    continuous_actions: ClassVar[bool] = False
    trust_region: ClassVar[bool] = False

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        inner_steps: int = _DEFAULTS["inner_steps"],
        inner_lr: float = _DEFAULTS["inner_lr"],
        eval_inner_steps: int = _DEFAULTS["eval_inner_steps"],
        first_order: bool = _DEFAULTS["first_order"],
    ) -> None:
        super().__init__(backbone, spec, inner_steps=inner_steps, inner_lr=inner_lr,
                         eval_inner_steps=eval_inner_steps, first_order=first_order)
        # alpha: one learned rate per weight, the same tensor shape as the weight
        self.inner_lrs = nn.ParameterDict(
            {lr_key(name): nn.Parameter(torch.full_like(p, inner_lr)) for name, p in self.net.named_parameters()}
        )

    def _inner_rate(self, evaluation: bool) -> Params:
        """The learned rates, keyed like the weights they scale (the same in training and evaluation)."""
        return {name: self.inner_lrs[lr_key(name)] for name, _ in self.net.named_parameters()}
