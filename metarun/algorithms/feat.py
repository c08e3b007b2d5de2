"""FEAT: Ye, Hu, Zhan and Sha, "Few-Shot Learning via Embedding Adaptation with Set-to-Set Functions",
CVPR 2020 (arXiv:1812.03664).

Prototypical Networks (Snell et al. 2017) whose prototypes are first adapted to the task by a
set-to-set function: a Transformer layer over the task's N prototypes, so each class's prototype
moves in view of the other classes of the episode. As in the paper's code, the layer is one
multi-head attention (`heads: 1` there, bias-free query/key/value maps, attention dropout 0.1),
an output projection with dropout (0.5), a residual connection and LayerNorm; no feed-forward
sublayer and no position embeddings (a set has no order, so the function is permutation
equivariant). Query embeddings are not adapted; logits = -||query - adapted prototype||^2 / `temperature`.

The paper's contrastive regulariser: the support AND query instances of each class form a set, adapted
by the same function; the class centres are the means of the adapted sets, and every instance (its
embedding before adaptation, as in the authors' code) is classified against the centres with
`temperature2`. The training loss is CE + `balance` * regulariser.
Here the per-class sets are one masked attention over all of a task's instances (an instance attends
only to instances of its class), which is the same function for any class sizes and needs no reshaping
by class; tests/test_feat.py checks it against the per-class loop.

The paper initialises the backbone from a pre-trained classifier, trains with `temperature` 32-64 and a
10x learning rate on the set function (`set_function_lr_scale`, an optimizer parameter group);
`init_from` takes any metarun checkpoint (e.g. a ProtoNet run's best.pt) and copies its backbone.
With the paper's Xavier-initialised output projection, the untrained attention branch perturbs the
prototypes of a pre-trained backbone: from a ProtoNet backbone at 95.45% (100 Omniglot validation
episodes), FEAT started at 89.65%. `zero_init_output: true` (not in the paper; the zero-initialised
residual branch of e.g. Goyal et al. 2017) starts the set function as LayerNorm(x), and FEAT at 95.33%.
Tasks are batched: the backbone is vmapped over tasks (per-task BatchNorm statistics, as ProtoNet),
attention and distances are batched products.

Why explicit attention and metarun's split LayerNorm (models/transformer.py): FEAT never differentiates
through an inner loop, so SDPA and nn.LayerNorm would be correct here too; the explicit softmax follows the
project's convention (twice differentiable under vmap, should FEAT ever be combined with an inner loop) and
exposes the weights that `visualize` draws. The attention is its own small module rather than
transformer.SelfAttention because FEAT's maps have no bias and the regulariser needs a mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_loss
from metarun.algorithms.heatmap import attention_map
from metarun.algorithms.pretrained import load_backbone
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.models.base import Backbone
from metarun.models.transformer import LayerNorm
from metarun.vmap import over_tasks


_DEFAULTS = option_defaults("algo", "feat")


class SetAttention(nn.Module):
    """FEAT's set-to-set function: LayerNorm(x + Dropout(W_o MultiHeadAttention(x, x, x))).

    `mask` [..., L, L] (True = may attend) restricts which set members a member sees; the
    returned weights [..., heads, L, L] are taken before attention dropout.
    """

    def __init__(self, width: int, heads: int, dropout: float, attention_dropout: float,
                 zero_init_output: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width)
        # The authors' initialisation: N(0, 2 / (fan_in + fan_out)) for the maps, Xavier for the output.
        for linear in (self.query, self.key, self.value):
            nn.init.normal_(linear.weight, std=math.sqrt(1.0 / width))
        nn.init.xavier_normal_(self.out.weight)
        if zero_init_output:  # the attention branch starts silent: the function starts as LayerNorm(x)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = LayerNorm(width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        *lead, length, width = x.shape
        head_dim = width // self.heads

        def split(t: Tensor) -> Tensor:  # [..., L, width] -> [..., heads, L, head_dim]
            return t.unflatten(-1, (self.heads, head_dim)).transpose(-2, -3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        mixed = (self.attention_dropout(weights) @ v).transpose(-2, -3).reshape(*lead, length, width)
        return self.norm(x + self.dropout(self.out(mixed))), weights


class FEAT(nn.Module, MetaAlgorithm):
    """ProtoNet with prototypes adapted by a Transformer set-to-set function, plus its contrastive regulariser."""

    supports = frozenset({"classification"})
    alternatives = "algo=maml, algo=metasgd, algo=reptile or algo=incontext"

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        temperature: float = _DEFAULTS["temperature"],
        temperature2: float = _DEFAULTS["temperature2"],
        balance: float = _DEFAULTS["balance"],
        heads: int = _DEFAULTS["heads"],
        dropout: float = _DEFAULTS["dropout"],
        attention_dropout: float = _DEFAULTS["attention_dropout"],
        init_from: str | None = _DEFAULTS["init_from"],
        set_function_lr_scale: float = _DEFAULTS["set_function_lr_scale"],
        zero_init_output: bool = _DEFAULTS["zero_init_output"],
    ) -> None:
        super().__init__()
        width = int(backbone.out_features)
        if temperature <= 0 or temperature2 <= 0:
            raise ValueError(f"algo.temperature and algo.temperature2 must be positive "
                             f"(got {temperature} and {temperature2})")
        if set_function_lr_scale <= 0:
            raise ValueError(f"algo.set_function_lr_scale must be positive (got {set_function_lr_scale})")
        if balance < 0:
            raise ValueError(f"algo.balance must be >= 0, 0 = no regulariser (got {balance})")
        if heads < 1 or width % heads:
            raise ValueError(f"algo.heads ({heads}) must divide the backbone's feature size ({width})")
        for name, p in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"algo.{name} must be in [0, 1) (got {p})")
        self.spec = spec
        self.backbone = backbone
        self.set_function = SetAttention(width, heads, dropout, attention_dropout, zero_init_output)
        self.temperature = temperature
        self.temperature2 = temperature2
        self.balance = balance
        self.set_function_lr_scale = set_function_lr_scale
        if init_from is not None:
            load_backbone(backbone, init_from)

    def parameter_groups(self) -> list[dict]:
        """The backbone at the configured learning rate, the set function at `set_function_lr_scale` times it
        (the paper's `lr_mul`: 10 when the backbone starts pre-trained)."""
        return [{"params": list(self.backbone.parameters())},
                {"params": list(self.set_function.parameters()), "lr_scale": self.set_function_lr_scale}]

    # -- the model ---------------------------------------------------------------------------------

    def embed(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """[T, S, D] support and [T, Q, D] query embeddings; each task's sets are their own backbone batch."""
        return over_tasks(self.backbone)(batch.support_x), over_tasks(self.backbone)(batch.query_x)

    def adapted_prototypes(self, support: Tensor, support_y: Tensor, ways: int) -> tuple[Tensor, Tensor]:
        """Class means [T, N, D] passed through the set function; also its attention [T, heads, N, N]."""
        return self.set_function(class_means(support, support_y, ways))

    def logits(self, batch: TaskBatch) -> Tensor:
        """[T, Q, N] scores: -squared distance of each query to each adapted prototype / temperature."""
        support, query = self.embed(batch)
        prototypes, _ = self.adapted_prototypes(support, batch.support_y, self.spec.ways)
        return -squared_distances(query, prototypes) / self.temperature

    def regulariser(self, support: Tensor, query: Tensor, batch: TaskBatch) -> Tensor:
        """[T] contrastive loss: instances vs the centres of their class's adapted support+query set."""
        ways = self.spec.ways
        instances = torch.cat([support, query], dim=1)  # [T, S+Q, D]
        labels = torch.cat([batch.support_y, batch.query_y], dim=1)  # [T, S+Q]
        same_class = labels.unsqueeze(-1) == labels.unsqueeze(-2)  # [T, M, M]: the per-class sets
        adapted, _ = self.set_function(instances, same_class)
        centres = class_means(adapted, labels, ways)
        logits = -squared_distances(instances, centres) / self.temperature2
        return vmap(F.cross_entropy)(logits, labels)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        support, query = self.embed(batch)
        prototypes, _ = self.adapted_prototypes(support, batch.support_y, self.spec.ways)
        logits = -squared_distances(query, prototypes) / self.temperature
        losses, accuracy = vmap(lambda out, y: task_loss(self.spec, out, y))(logits, batch.query_y)
        metrics: dict[str, Tensor] = {}
        if self.balance > 0:
            regulariser = self.regulariser(support, query, batch)
            metrics["regulariser"] = regulariser.detach().mean()
            losses = losses + self.balance * regulariser
        return losses.mean(), {**batch_metrics(self.spec, losses, accuracy), **metrics}

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        losses, accuracy = vmap(lambda out, y: task_loss(self.spec, out, y))(self.logits(batch), batch.query_y)
        return {self.spec.metric: accuracy, "loss": losses}

    def query_scores(self, batch: TaskBatch) -> Tensor:
        return self.logits(batch)

    @torch.no_grad()
    def visualize(self, batch: TaskBatch) -> dict[str, Tensor]:
        """The first task's prototype-to-prototype attention (heads averaged): row i = how class i's
        adapted prototype mixes the prototypes of the episode's classes."""
        first = batch.slice(0, 1)
        support, _ = self.embed(first)
        _, weights = self.adapted_prototypes(support, first.support_y, self.spec.ways)
        title = "FEAT prototype attention, validation task 0\n(heads averaged)"
        picture = attention_map(weights[0].mean(dim=0), title=title, row_label="adapted prototype of class",
                                col_label="attends to prototype of class", annotate=self.spec.ways <= 10)
        return {"prototype_attention": picture}


def class_means(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """[T, M, D] embeddings, [T, M] labels -> [T, N, D] per-class means, as one batched product."""
    onehot = F.one_hot(labels, ways).to(embeddings.dtype)  # [T, M, N]
    return onehot.transpose(1, 2) @ embeddings / onehot.sum(dim=1).unsqueeze(-1)


def squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """[T, M, D] x [T, N, D] -> [T, M, N]; ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 without [T, M, N, D]."""
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ centres.transpose(1, 2)
            + centres.pow(2).sum(-1).unsqueeze(1))

