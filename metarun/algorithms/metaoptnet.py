"""MetaOptNet: Lee, Maji, Ravichandran and Soatto, "Meta-Learning with Differentiable Convex Optimization",
CVPR 2019 (arXiv:1904.03758; code: kjunelee/MetaOptNet).

The backbone embeds a task's support and query images; a linear classifier is fitted to the support
embeddings by a convex base learner, and the query embeddings are scored with it; the meta-gradient flows
through the learner's solution. Two base learners (`head`):

* `svm` (MetaOptNet-SVM, the paper's main one): the multi-class SVM of Crammer and Singer, solved in its dual
  (n_support x ways variables, through the kernel K = X X^T of the support features, never features x
  features) by a batched interior-point method and differentiated implicitly through its KKT conditions
  (algorithms/convex.py). `C` = 0.1; at most `train_iterations` = 15 solver iterations when training and
  `eval_iterations` = 3 when testing, as the paper's code (QPFunction maxIter 15 in training, 3 in test.py);
  `dual_ridge` = 1.0 is the identity its code adds to the block kernel.
* `ridge` (MetaOptNet-RR): ridge regression to one-hot targets with lambda `ridge_lambda` = 50 (fixed), in its
  dual form through the Woodbury identity: scores = Q X^T 2 (K + lambda I)^-1 Y, the solution of the code's
  QP (min 1/2 z^T (K + lambda I) z - 2 Y^T z).

Both scale their scores by a learnable scalar (`init_scale` 1.0, the code's ClassificationHead). The paper
trains with 15 shots (`train_shots`, a `train_episode()` override, as ProtoNet's train_ways) and 6 queries per
class on miniImageNet, tests with 15 queries, and smooths the training labels (`label_smoothing` 0.1 on
miniImageNet with ResNet-12; the code's form: 1 - eps on the true class, eps / (N - 1) on each other one).

All tasks run at once: the backbone is vmapped over tasks (metarun/vmap.py; each task's support and query sets
are their own batch), and the base learners solve the T tasks as one batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_losses
from metarun.algorithms.convex import ridge_dual, svm_dual
from metarun.algorithms.pretrained import load_backbone
from metarun.benchmarks.base import TaskSpec, episode_ways
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.base import Backbone
from metarun.vmap import over_tasks

_DEFAULTS = option_defaults("algo", "metaoptnet")
HEADS: tuple[str, ...] = ("svm", "ridge")


class ConvexHeadLearner(nn.Module, MetaAlgorithm):
    """What MetaOptNet and R2-D2 share: the backbone vmapped over tasks, a linear base learner fitted to each
    task's support embeddings (`head_logits`, the subclass's), the meta-training episode shape, label smoothing."""

    supports = frozenset({"classification"})
    alternatives = "algo=maml, algo=metasgd or algo=reptile"

    def __init__(self, backbone: Backbone, spec: TaskSpec, train_ways: int | None, train_shots: int | None,
                 train_queries: int | None, label_smoothing: float, init_from: str | None) -> None:
        super().__init__()
        for name, value, least in (("train_ways", train_ways, 2), ("train_shots", train_shots, 1),
                                   ("train_queries", train_queries, 1)):
            if value is not None and value < least:
                raise ValueError(f"algo.{name} must be at least {least}, or null for the benchmark's (got {value})")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"algo.label_smoothing must be in [0, 1) (got {label_smoothing})")
        self.spec = spec
        self.backbone = backbone
        self.train_ways, self.train_shots, self.train_queries = train_ways, train_shots, train_queries
        self.label_smoothing = label_smoothing
        if init_from is not None:
            load_backbone(backbone, init_from)

    def head_logits(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """[T, Q, N] scores of the query embeddings [T, Q, D] by the learner fitted to support [T, S, D]."""
        raise NotImplementedError

    def logits(self, batch: TaskBatch) -> Tensor:
        support = over_tasks(self.backbone)(batch.support_x)  # [T, S, D]
        query = over_tasks(self.backbone)(batch.query_x)  # [T, Q, D]
        return self.head_logits(support, batch.support_y, query, self._ways())

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def train_episode(self) -> dict[str, int]:
        shape = {"ways": self.train_ways, "shots": self.train_shots, "queries": self.train_queries}
        return {k: v for k, v in shape.items() if v is not None}

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.training and self.train_episode():
            self._check_train_episode(batch)
        logits = self.logits(batch)
        losses, accuracy = task_losses(self.spec, logits, batch.query_y)
        if self.training and self.label_smoothing > 0:
            losses = smoothed_cross_entropy(logits, batch.query_y, self.label_smoothing)
        return losses.mean(), batch_metrics(self.spec, losses, accuracy)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        return {self.spec.metric: task_losses(self.spec, self.logits(batch), batch.query_y)[1]}

    def query_scores(self, batch: TaskBatch) -> Tensor:
        return self.logits(batch)

    def _check_train_episode(self, batch: TaskBatch) -> None:
        """Training silently on benchmark-shaped episodes would ignore the config: say so instead."""
        shape = self.train_episode()
        ways = self._ways()
        shots, queries = shape.get("shots", self.spec.shots), shape.get("queries", self.spec.queries)
        support, query = batch.support_y.shape[1], batch.query_y.shape[1]
        if support == ways * shots and query == ways * queries:
            return
        asked = ", ".join(f"algo.train_{k}={v}" for k, v in shape.items())
        fix = " and ".join(f"algo.train_{k}=null" for k in shape)
        raise UserInputError(f"{asked} but the training episodes have {support} support and {query} query examples "
                             f"per task: the trainer did not ask the benchmark for this episode shape; set {fix}")

    def _ways(self) -> int:
        """N of the episodes at hand: the meta-training shape when training, the benchmark's otherwise."""
        return episode_ways(self.spec, self.train_episode(), self.training)


class MetaOptNet(ConvexHeadLearner):
    """A linear SVM (or ridge regression) fitted to each task's support embeddings, differentiated through."""

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        head: Literal["svm", "ridge"] = _DEFAULTS["head"],
        C: float = _DEFAULTS["C"],
        dual_ridge: float = _DEFAULTS["dual_ridge"],
        train_iterations: int = _DEFAULTS["train_iterations"],
        eval_iterations: int = _DEFAULTS["eval_iterations"],
        ridge_lambda: float = _DEFAULTS["ridge_lambda"],
        init_scale: float = _DEFAULTS["init_scale"],
        label_smoothing: float = _DEFAULTS["label_smoothing"],
        train_ways: int | None = _DEFAULTS["train_ways"],
        train_shots: int | None = _DEFAULTS["train_shots"],
        train_queries: int | None = _DEFAULTS["train_queries"],
        init_from: str | None = _DEFAULTS["init_from"],
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"algo.head must be one of {', '.join(HEADS)} (got {head!r})")
        for name, value in (("C", C), ("dual_ridge", dual_ridge), ("ridge_lambda", ridge_lambda)):
            if value <= 0:
                raise ValueError(f"algo.{name} must be positive (got {value})")
        for name, count in (("train_iterations", train_iterations), ("eval_iterations", eval_iterations)):
            if count < 1:
                raise ValueError(f"algo.{name} must be at least 1 (got {count})")
        super().__init__(backbone, spec, train_ways, train_shots, train_queries, label_smoothing, init_from)
        self.head = head
        self.C, self.dual_ridge, self.ridge_lambda = C, dual_ridge, ridge_lambda
        self.train_iterations, self.eval_iterations = train_iterations, eval_iterations
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))

    def head_logits(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        onehot = F.one_hot(support_y, ways).to(support.dtype)  # [T, S, N]
        kernel = support @ support.transpose(1, 2)  # [T, S, S]
        if self.head == "svm":
            iterations = self.train_iterations if self.training else self.eval_iterations
            dual = svm_dual(kernel, onehot, self.C, self.dual_ridge, iterations)
        else:
            dual = 2.0 * ridge_dual(kernel, onehot, self.ridge_lambda)
        return self.scale * ((query @ support.transpose(1, 2)) @ dual)


def smoothed_cross_entropy(logits: Tensor, targets: Tensor, eps: float) -> Tensor:
    """[T] mean cross-entropy over each task's queries against labels smoothed as MetaOptNet's train.py does:
    1 - eps on the true class and eps / (N - 1) on each of the N - 1 others (torch's label_smoothing spreads
    eps / N over all N classes instead)."""
    ways = logits.shape[-1]
    onehot = F.one_hot(targets, ways).to(logits.dtype)
    smoothed = onehot * (1 - eps) + (1 - onehot) * (eps / (ways - 1))
    return -(smoothed * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean(dim=-1)
