"""Prototypical Networks: Snell, Swersky and Zemel, "Prototypical Networks for Few-shot Learning",
NeurIPS 2017.

A class is represented by its prototype, the mean embedding of its support examples; a query is
scored by the negative squared Euclidean distance to each prototype (the paper's choice, section
2.7), or by cosine similarity divided by a temperature (`distance: cosine`). The backbone is the
whole model: there is no head and no inner loop, so the class works for any number of ways, and it
may meta-train on other episodes than it is tested on (the paper trains 60-way with 5 queries per
class on Omniglot): `train_ways` and `train_queries` are asked of the benchmark through `train_episode()`.

All tasks run at once: the backbone is vmapped over the task dimension (so each task's support and
query set is its own batch, which is what BatchNorm's batch statistics need), and the prototypes and
distances are batched matrix products.

`init_from` starts the backbone from another run's checkpoint under a fresh optimizer: the control that
FEAT, which starts that way, is compared with.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_loss
from metarun.algorithms.pretrained import load_backbone
from metarun.benchmarks.base import TaskSpec, episode_ways
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.base import Backbone
from metarun.vmap import over_tasks


_DEFAULTS = option_defaults("algo", "protonet")


class ProtoNet(nn.Module, MetaAlgorithm):
    """Nearest-prototype classification in the backbone's feature space."""

    supports = frozenset({"classification"})
    alternatives = "algo=maml, algo=metasgd or algo=reptile"

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        distance: Literal["euclidean", "cosine"] = _DEFAULTS["distance"],
        temperature: float = _DEFAULTS["temperature"],
        train_ways: int | None = _DEFAULTS["train_ways"],
        train_queries: int | None = _DEFAULTS["train_queries"],
        init_from: str | None = _DEFAULTS["init_from"],
    ) -> None:
        super().__init__()
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"algo.distance must be 'euclidean' or 'cosine' (got {distance!r})")
        if temperature <= 0:
            raise ValueError(f"algo.temperature must be positive (got {temperature})")
        if train_ways is not None and train_ways < 2:
            raise ValueError(f"algo.train_ways must be at least 2, or null for benchmark.ways (got {train_ways})")
        if train_queries is not None and train_queries < 1:
            raise ValueError(f"algo.train_queries must be positive, or null for benchmark.queries "
                             f"(got {train_queries})")
        self.spec = spec
        self.backbone = backbone
        self.distance = distance
        self.temperature = temperature
        self.train_ways = train_ways
        self.train_queries = train_queries
        if init_from is not None:
            load_backbone(backbone, init_from)

    def train_episode(self) -> dict[str, int]:
        """Overrides of the benchmark's episode shape for meta-training episodes (the trainer asks for them)."""
        shape = {"ways": self.train_ways, "queries": self.train_queries}
        return {k: v for k, v in shape.items() if v is not None}

    def logits(self, batch: TaskBatch) -> Tensor:
        """[T, Q, N] class scores of every query: -squared distance, or cosine / temperature."""
        ways = self._ways()
        support = over_tasks(self.backbone)(batch.support_x)  # [T, S, D]
        query = over_tasks(self.backbone)(batch.query_x)  # [T, Q, D]
        onehot = F.one_hot(batch.support_y, ways).to(support.dtype)  # [T, S, N]
        # prototypes: per-class mean of the support embeddings, as one batched product
        prototypes = onehot.transpose(1, 2) @ support / onehot.sum(dim=1).unsqueeze(-1)  # [T, N, D]
        if self.distance == "cosine":
            return F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2) / self.temperature
        # ||q - c||^2 = ||q||^2 - 2 q.c + ||c||^2 without materialising [T, Q, N, D] differences
        squared = (query.pow(2).sum(-1, keepdim=True) - 2 * query @ prototypes.transpose(1, 2)
                   + prototypes.pow(2).sum(-1).unsqueeze(1))
        return -squared

    def _per_task(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        logits = self.logits(batch)
        return vmap(lambda out, y: task_loss(self.spec, out, y))(logits, batch.query_y)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.training and self.train_episode():
            self._check_train_episode(batch)
        losses, accuracy = self._per_task(batch)
        return losses.mean(), batch_metrics(self.spec, losses, accuracy)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        return {self.spec.metric: self._per_task(batch)[1]}

    def query_scores(self, batch: TaskBatch) -> Tensor:
        return self.logits(batch)

    def _check_train_episode(self, batch: TaskBatch) -> None:
        """Training silently on benchmark-shaped episodes would ignore the config: say so instead."""
        ways, queries = self._ways(), self.train_episode().get("queries", self.spec.queries)
        support, query = batch.support_y.shape[1], batch.query_y.shape[1]
        if support == ways * self.spec.shots and query == ways * queries:
            return
        asked = ", ".join(f"algo.train_{k}={v}" for k, v in self.train_episode().items())
        fix = " and ".join(f"algo.train_{k}=null" for k in self.train_episode())
        raise UserInputError(f"{asked} but the training episodes have {support} support and {query} query examples "
                             f"per task: the trainer did not ask the benchmark for this episode shape; set {fix}")

    def _ways(self) -> int:
        """N of the episodes at hand: the meta-training shape when training, the benchmark's otherwise."""
        return episode_ways(self.spec, self.train_episode(), self.training)
