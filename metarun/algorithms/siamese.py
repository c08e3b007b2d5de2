"""Siamese networks: Koch, Zemel and Salakhutdinov, "Siamese Neural Networks for One-shot Image Recognition",
ICML 2015 deep-learning workshop.

Twin embeddings (one backbone, shared weights); the pair score is a learned weighting of the componentwise L1
distance between the two embeddings, p = sigmoid(sum_j alpha_j |f(x1)_j - f(x2)_j| + b) (their eq. 1), trained by
binary cross-entropy on same/different pairs. One-shot classification at test: each query takes the class of
the support example it scores highest against; with K > 1 shots, a class's score is the mean of the pair
probabilities against its K support examples (the README says so too).

Pairs come from the benchmark's seeded sampler, never the global RNG: a meta-training episode of
`train_ways` classes, one shot each and `train_queries` queries per class (the `train_episode()` hook), pairs
every query with every support example, so with the default 2 ways half the pairs are "same" and half
"different", the balance Koch et al. train with. Distortions of the training pairs (their section 4.3) are the
benchmark's (`benchmark.augment`), not this class's.

The weighted L1 distance of every query/support pair is computed without materialising the [T, Q, S, D]
differences: sum_j alpha_j |q_j - s_j| = L1(q w+, s w+) - L1(q w-, s w-), with w+ = relu(alpha), w- = relu(-alpha),
as two batched `torch.cdist(p=1)`. tests/test_siamese.py checks it against the materialised sum in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, batch_metrics
from metarun.algorithms.pretrained import load_backbone
from metarun.benchmarks.base import TaskSpec, episode_ways
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.models.base import Backbone
from metarun.vmap import over_tasks

_DEFAULTS = option_defaults("algo", "siamese")


def weighted_l1(query: Tensor, support: Tensor, weight: Tensor) -> Tensor:
    """sum_j weight_j |query_j - support_j| for every pair: [T, Q, D] x [T, S, D] -> [T, Q, S]."""
    positive, negative = F.relu(weight), F.relu(-weight)
    return (torch.cdist(query * positive, support * positive, p=1)
            - torch.cdist(query * negative, support * negative, p=1))


class Siamese(nn.Module, MetaAlgorithm):
    """Pair verification by a weighted L1 distance of twin embeddings; one-shot classification by the best pair."""

    supports = frozenset({"classification"})
    alternatives = "algo=maml, algo=metasgd or algo=reptile"

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        train_ways: int = _DEFAULTS["train_ways"],
        train_queries: int = _DEFAULTS["train_queries"],
        init_from: str | None = _DEFAULTS["init_from"],
    ) -> None:
        super().__init__()
        if train_ways < 2:
            raise ValueError(f"algo.train_ways must be at least 2: a pair needs a different class (got {train_ways})")
        if train_queries < 1:
            raise ValueError(f"algo.train_queries must be positive (got {train_queries})")
        self.spec = spec
        self.backbone = backbone
        self.train_ways = train_ways
        self.train_queries = train_queries
        # alpha_j and the bias of eq. 1: the learned weighting of the L1 distance
        self.distance = nn.Linear(int(backbone.out_features), 1)
        if init_from is not None:
            load_backbone(backbone, init_from)

    def train_episode(self) -> dict[str, int]:
        """Training pairs come from episodes of `train_ways` classes, one shot and `train_queries` queries each."""
        return {"ways": self.train_ways, "shots": 1, "queries": self.train_queries}

    def pair_logits(self, batch: TaskBatch) -> Tensor:
        """[T, Q, S] logit that query q and support example s show the same class."""
        support = over_tasks(self.backbone)(batch.support_x)  # [T, S, D]
        query = over_tasks(self.backbone)(batch.query_x)  # [T, Q, D]
        return weighted_l1(query, support, self.distance.weight[0]) + self.distance.bias[0]

    def class_scores(self, batch: TaskBatch, ways: int, logits: Tensor | None = None) -> Tensor:
        """[T, Q, N]: the mean pair probability of each query against each class's support examples
        (from `logits` [T, Q, S] when the caller has them)."""
        logits = self.pair_logits(batch) if logits is None else logits
        member = F.one_hot(batch.support_y, ways).to(logits.dtype)  # [T, S, N]
        return torch.sigmoid(logits) @ member / member.sum(dim=1, keepdim=True)

    def _ways(self) -> int:
        return episode_ways(self.spec, self.train_episode(), self.training)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.pair_logits(batch)  # [T, Q, S]
        same = (batch.query_y.unsqueeze(2) == batch.support_y.unsqueeze(1)).to(logits.dtype)
        losses = F.binary_cross_entropy_with_logits(logits, same, reduction="none").flatten(1).mean(dim=1)  # [T]
        scores = self.class_scores(batch, self._ways(), logits.detach())
        accuracy = (scores.argmax(dim=-1) == batch.query_y).to(logits.dtype).mean(dim=1)
        return losses.mean(), batch_metrics(self.spec, losses, accuracy)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        scores = self.class_scores(batch, self.spec.ways)
        return {self.spec.metric: (scores.argmax(dim=-1) == batch.query_y).to(scores.dtype).mean(dim=1)}

    def query_scores(self, batch: TaskBatch) -> Tensor:
        """The log of the mean pair probabilities normalised over the classes: softmax gives each class's share."""
        scores = self.class_scores(batch, self.spec.ways)
        return (scores / scores.sum(dim=-1, keepdim=True)).clamp_min(1e-30).log()
