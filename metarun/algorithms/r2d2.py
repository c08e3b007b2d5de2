"""R2-D2: Bertinetto, Henriques, Torr and Vedaldi, "Meta-learning with differentiable closed-form solvers",
ICLR 2019 (arXiv:1805.08136; code: bertinetto/r2d2).

Ridge regression as the base learner, in closed form: each task's support embeddings X [n, d], with a column
of ones for the bias, are regressed onto one-hot targets Y, and the solution W = X^T (X X^T + lambda I)^-1 Y
is computed through the Woodbury identity, one n x n solve per task (algorithms/convex.py, `ridge_dual`) where
the d x d form would invert a matrix of the feature size (3584 on Omniglot, 72576 on miniImageNet with the
paper's network). As the authors' code (fewshots/models/r2d2.py), X and Y are divided by sqrt(n) first, and
the query scores X_q W + b pass through the "adjust" layer alpha * scores + beta (`init_scale`: 1e-4 on
miniImageNet, 10 on Omniglot; `init_bias` 0), both meta-learned. lambda is meta-learned too (`learn_lambda`),
as log(lambda) so it stays positive, from `init_lambda` = 50; the authors' released configuration keeps it
fixed (learn_lambda: False in scripts/train/conf/fewshots.yaml): `algo.learn_lambda=false` reproduces that.
beta adds the same number to every class's score, so it changes neither the loss nor the prediction; it is
kept as the paper's layer has it.

The paper's network is models/r2d2net.py (model=r2d2net: 96-192-384-512 channels). Training episodes are
wider than test ones (`train_ways`: 60 on Omniglot, 16 on miniImageNet; the trainer asks the benchmark through
`train_episode()`, as for ProtoNet), with a fixed total of images per class (10 on Omniglot, 15 on miniImageNet)
split between support and query; the authors draw each episode's shot count uniformly from 1-9, while
metarun's trainer draws one episode shape, so the presets set `train_shots` (5) and `train_queries`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.convex import ridge_dual
from metarun.algorithms.metaoptnet import ConvexHeadLearner
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.models.base import Backbone

_DEFAULTS = option_defaults("algo", "r2d2")


class R2D2(ConvexHeadLearner):
    """Closed-form ridge regression on each task's support embeddings, with a learned lambda and output scale."""

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        init_lambda: float = _DEFAULTS["init_lambda"],
        learn_lambda: bool = _DEFAULTS["learn_lambda"],
        init_scale: float = _DEFAULTS["init_scale"],
        init_bias: float = _DEFAULTS["init_bias"],
        label_smoothing: float = _DEFAULTS["label_smoothing"],
        train_ways: int | None = _DEFAULTS["train_ways"],
        train_shots: int | None = _DEFAULTS["train_shots"],
        train_queries: int | None = _DEFAULTS["train_queries"],
        init_from: str | None = _DEFAULTS["init_from"],
    ) -> None:
        if init_lambda <= 0:
            raise ValueError(f"algo.init_lambda must be positive (got {init_lambda})")
        super().__init__(backbone, spec, train_ways, train_shots, train_queries, label_smoothing, init_from)
        log_lambda = torch.tensor(math.log(init_lambda))
        if learn_lambda:
            self.log_lambda = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_lambda", log_lambda)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def head_logits(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        n = support.shape[1]
        ones = support.new_ones(*support.shape[:2], 1)
        inputs = torch.cat([support, ones], dim=-1) / math.sqrt(n)  # [T, n, d + 1]: features and the bias input
        targets = F.one_hot(support_y, ways).to(support.dtype) / math.sqrt(n)
        dual = ridge_dual(inputs @ inputs.transpose(1, 2), targets, self.log_lambda.exp())  # [T, n, N]
        queries = torch.cat([query, query.new_ones(*query.shape[:2], 1)], dim=-1)
        scores = (queries @ inputs.transpose(1, 2)) @ dual  # X_q W + b with W, b = X^T dual
        return self.scale * scores + self.bias
