"""Matching Networks: Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, "Matching Networks for
One Shot Learning", NeurIPS 2016.

A query's prediction is an attention-weighted sum of the one-hot support labels (eq. 1), the
attention a softmax over the cosine similarities between the query's and each support example's
embedding (eq. 2; `temperature` divides the similarities: 1 in the paper, 0.1 in configs/algo/matching.yaml,
which says why). The loss is the negative log of the predicted probability of the true class, computed
stably as a log-sum-exp over each class's support examples.

`fce: true` adds the full context embeddings of the paper's appendix: the support embeddings are
re-read by a bidirectional LSTM over the support set, g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i), and
each query embedding is refined by an attention LSTM over them for `fce_steps` processing steps:
h_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}) + f'(x), r_{k-1} the softmax(h_{k-1} . g)-weighted sum
of the support embeddings. An LSTM whose hidden state is the concatenation [h, r] is an nn.LSTMCell
whose input is [f'(x), r] and whose hidden state is h (the gates are linear in all three), so that is
how it is written. The paper leaves h_0 and K open: h_0 = f'(x), c_0 = 0, K = `fce_steps`.

Batched over tasks: the backbone is vmapped over the task dimension (each task's support and query
set is its own batch, as BatchNorm's batch statistics need); the LSTMs fold the tasks into their
batch dimension (the support sequences of T tasks are T sequences; the queries of T tasks are T * Q
rows of the attention LSTM, each reading its own task's support set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_loss
from metarun.algorithms.pretrained import load_backbone
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.models.base import Backbone
from metarun.vmap import over_tasks


_DEFAULTS = option_defaults("algo", "matching")


class MatchingNet(nn.Module, MetaAlgorithm):
    """Cosine attention over the support set, with optional full context embeddings (`fce`)."""

    supports = frozenset({"classification"})
    alternatives = "algo=maml, algo=metasgd or algo=reptile"

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        fce: bool = _DEFAULTS["fce"],
        fce_steps: int = _DEFAULTS["fce_steps"],
        temperature: float = _DEFAULTS["temperature"],
        init_from: str | None = _DEFAULTS["init_from"],
    ) -> None:
        super().__init__()
        if fce_steps < 1:
            raise ValueError(f"algo.fce_steps must be a positive integer (got {fce_steps})")
        if temperature <= 0:
            raise ValueError(f"algo.temperature must be positive (got {temperature})")
        self.spec = spec
        self.backbone = backbone
        self.fce = fce
        self.fce_steps = fce_steps
        self.temperature = temperature
        if fce:
            width = int(backbone.out_features)
            self.support_lstm = nn.LSTM(width, width, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * width, width)
        if init_from is not None:  # e.g. a ProtoNet run's best.pt; fresh optimizer
            load_backbone(backbone, init_from)

    # -- full context embeddings (appendix A.2) ---------------------------------------------------------

    def _context_support(self, support: Tensor) -> Tensor:
        """g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i) for [T, S, D] embeddings; each task is one sequence."""
        hidden, _ = self.support_lstm(support)  # [T, S, 2D]
        forward, backward = hidden.chunk(2, dim=-1)
        return forward + backward + support

    def _context_query(self, query: Tensor, support: Tensor) -> Tensor:
        """f(x, S) after `fce_steps` steps of the attention LSTM; query [T, Q, D], support g(S) [T, S, D]."""
        t, q, d = query.shape
        flat = query.reshape(t * q, d)
        h, c = flat, torch.zeros_like(flat)
        for _ in range(self.fce_steps):
            attention = torch.softmax(h.view(t, q, d) @ support.transpose(1, 2), dim=-1)  # [T, Q, S]
            readout = (attention @ support).reshape(t * q, d)
            h, c = self.query_lstm(torch.cat((flat, readout), dim=-1), (h, c))
            h = h + flat
        return h.view(t, q, d)

    # -- the prediction ------------------------------------------------------------------------------------

    def log_probs(self, batch: TaskBatch) -> Tensor:
        """[T, Q, N] log of each query's attention-weighted label distribution (eq. 1)."""
        ways = self.spec.ways
        support = over_tasks(self.backbone)(batch.support_x)  # [T, S, D]
        query = over_tasks(self.backbone)(batch.query_x)  # [T, Q, D]
        if self.fce:
            support = self._context_support(support)
            query = self._context_query(query, support)
        similarity = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)  # [T, Q, S]
        scores = (similarity / self.temperature).unsqueeze(-1)  # [T, Q, S, 1]
        member = F.one_hot(batch.support_y, ways).bool().unsqueeze(1)  # [T, 1, S, N]
        # log sum_{i in class n} softmax_i(scores): a log-sum-exp over each class's support examples,
        # less the log-sum-exp over all of them
        per_class = torch.where(member, scores, scores.new_tensor(float("-inf"))).logsumexp(dim=2)  # [T, Q, N]
        return per_class - scores.squeeze(-1).logsumexp(dim=-1, keepdim=True)

    def _per_task(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        # cross-entropy of log-probabilities that already sum to one is their negative log-likelihood
        return vmap(lambda out, y: task_loss(self.spec, out, y))(self.log_probs(batch), batch.query_y)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        losses, accuracy = self._per_task(batch)
        return losses.mean(), batch_metrics(self.spec, losses, accuracy)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        return {self.spec.metric: self._per_task(batch)[1]}

    def query_scores(self, batch: TaskBatch) -> Tensor:
        return self.log_probs(batch)
