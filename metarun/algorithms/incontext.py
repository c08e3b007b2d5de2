"""A black-box in-context meta-learner: a Transformer reads the labelled support set and predicts the
query labels in one forward pass, with no gradient step at test time.

The idea goes back to SNAIL (Mishra, Rohaninejad, Chen and Abbeel, "A Simple Neural Attentive
Meta-Learner", ICLR 2018), which feeds (x, y) pairs and the unlabelled query to temporal convolutions
and causal attention; the set form used here is that of Transformer Neural Processes (Nguyen and
Grover, "Transformer Neural Processes: Uncertainty-Aware Meta Learning Via Sequence Modeling", ICML
2022): context tokens attend to the context, target tokens attend to the context only. Garg, Tsipras,
Liang and Valiant ("What Can Transformers Learn In-Context?", NeurIPS 2022) and Kirsch, Harrison,
Sohl-Dickstein and Metz ("General-Purpose In-Context Learning by Meta-Learning Transformers", 2022)
study such learners on regression and on images with permuted labels.

Tokens. x is embedded by the configured backbone (model=mlp, transformer or cnn) and a linear map to
`width`; a support token adds an embedding of its label (classification: a learned vector per label
id among the ways) or of its target (regression: a linear map of y); a query token adds a learned
"unknown" vector instead. Adding two linear embeddings is the same function class as concatenating
and projecting, at a smaller width.

Attention. In every block each token (support or query) attends to the support tokens only: the keys
and values are the support tokens', so a query never sees another query (its prediction does not
depend on the rest of the query set) and no attention mask is needed. No position embeddings: the
support set is a set, so the predictions do not depend on its order. Pre-LayerNorm blocks with the
explicit softmax attention and split LayerNorm of models/transformer.py (reused from there).

Label permutation. Classification episodes come with labels 0..N-1 in the sampler's order; during
meta-training every task's labels are additionally permuted at random (Kirsch et al. 2022), so the
learner cannot tie label ids to anything but the support set it is given. The permutation is drawn
from torch's global RNG on the CPU, which the trainer seeds and checkpoints, so a resumed run draws the
same permutations. Evaluation does not permute.

Batched over tasks: the backbone is vmapped over the task dimension (per-task BatchNorm statistics);
the Transformer takes [T, S+Q, width]. With model=cnn bn=transductive the query set shares its
normalisation statistics, which is the only way queries can influence each other; bn=inductive removes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vmap

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_loss
from metarun.algorithms.heatmap import attention_map, group_breaks
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.base import Backbone
from metarun.models.transformer import LayerNorm
from metarun.vmap import over_tasks


_DEFAULTS = option_defaults("algo", "incontext")


class SupportAttention(nn.Module):
    """Multi-head attention whose keys and values are the first `support` tokens: every token reads the
    support set. Returns the output and the weights [..., heads, L, support]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, support: int) -> tuple[Tensor, Tensor]:
        *lead, tokens, width = x.shape
        head_dim = width // self.heads
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, head_dim)).movedim(-3, 0).transpose(-2, -3)
        k, v = k[..., :support, :], v[..., :support, :]
        weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-1, -2), dim=-1)
        out = (weights @ v).transpose(-2, -3).reshape(*lead, tokens, width)
        return self.proj(out), weights


class SupportBlock(nn.Module):
    """Pre-LayerNorm block: x + SupportAttention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(width * mlp_ratio))
        self.norm1 = LayerNorm(width)
        self.attn = SupportAttention(width, heads)
        self.norm2 = LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, support: int) -> tuple[Tensor, Tensor]:
        mixed, weights = self.attn(self.norm1(x), support)
        x = x + mixed
        return x + self.mlp(self.norm2(x)), weights


class InContextLearner(nn.Module, MetaAlgorithm):
    """Support (x, y) tokens and query (x, ?) tokens through a Transformer; a head reads the query tokens."""

    draws_randomness = True  # the label permutation of every training task

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        width: int = _DEFAULTS["width"],
        depth: int = _DEFAULTS["depth"],
        heads: int = _DEFAULTS["heads"],
        mlp_ratio: float = _DEFAULTS["mlp_ratio"],
        permute_labels: bool = _DEFAULTS["permute_labels"],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if width < 1 or heads < 1 or width % heads:
            raise ValueError(f"algo.width ({width}) must be a positive multiple of algo.heads ({heads})")
        if depth < 1:
            raise ValueError(f"algo.depth must be >= 1 (got {depth})")
        if mlp_ratio <= 0:
            raise ValueError(f"algo.mlp_ratio must be > 0 (got {mlp_ratio})")
        self.spec = spec
        self.backbone = backbone
        self.permute_labels = permute_labels
        # the run's algorithm generator (seeded by run.py, saved by the trainer), or a fixed seed for a Python caller
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.embed_x = nn.Linear(int(backbone.out_features), width)
        # classification: one vector per label id; regression: a linear map of the target
        self.embed_y: nn.Module = (nn.Embedding(spec.output_size, width) if spec.kind == "classification"
                                   else nn.Linear(spec.output_size, width))
        self.unknown = nn.Parameter(torch.randn(width) * 0.02)  # the query's "label not given" embedding
        self.blocks = nn.ModuleList(SupportBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(width)
        self.head = nn.Linear(width, spec.output_size)

    # -- the model ---------------------------------------------------------------------------------

    def forward_with_attention(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Query predictions [T, Q, output_size] (logits or targets) and the last block's attention
        [T, heads, Q, S] of the queries over the support set."""
        self._check_labels(batch)
        features = over_tasks(self.backbone)
        support = self.embed_x(features(batch.support_x)) + self.embed_y(self._label_input(batch.support_y))
        query = self.embed_x(features(batch.query_x)) + self.unknown
        shots = support.shape[1]
        tokens = torch.cat([support, query], dim=1)  # [T, S+Q, width]
        weights = tokens.new_empty(0)
        for block in self.blocks:
            tokens, weights = block(tokens, shots)
        return self.head(self.norm(tokens[:, shots:])), weights[:, :, shots:]

    def predict(self, batch: TaskBatch) -> Tensor:
        return self.forward_with_attention(batch)[0]

    def query_scores(self, batch: TaskBatch) -> Tensor:
        return self.predict(batch)

    def _label_input(self, y: Tensor) -> Tensor:
        return y if self.spec.kind == "classification" else y.to(self.embed_y.weight.dtype)

    def _check_labels(self, batch: TaskBatch) -> None:
        if self.spec.kind == "classification" and int(batch.support_y.max()) >= self.spec.output_size:
            raise UserInputError(f"algo=incontext was built for {self.spec.output_size}-way episodes and got "
                                 f"{int(batch.support_y.max()) + 1}-way ones; its label embedding has one row per way")

    def permuted(self, batch: TaskBatch) -> TaskBatch:
        """The batch with each task's labels relabelled by a random permutation of the ways (training only).

        Drawn on the CPU from the algorithm's generator, then moved to the batch's device.
        """
        perm = torch.rand(batch.num_tasks, self.spec.output_size, generator=self.generator).argsort(dim=1)
        perm = perm.to(batch.support_y.device)
        return TaskBatch(batch.support_x, perm.gather(1, batch.support_y), batch.query_x, perm.gather(1, batch.query_y))

    def _per_task(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        outputs = self.predict(batch)
        return vmap(lambda out, y: task_loss(self.spec, out, y))(outputs, batch.query_y)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.training and self.permute_labels and self.spec.kind == "classification":
            batch = self.permuted(batch)
        losses, metric = self._per_task(batch)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        losses, metric = self._per_task(batch)
        out = {self.spec.metric: metric}
        if self.spec.kind == "classification":
            out["loss"] = losses
        return out

    @torch.no_grad()
    def visualize(self, batch: TaskBatch) -> dict[str, Tensor]:
        """The first task's query-to-support attention in the last block, averaged over heads.

        Rows are queries and columns support examples, both sorted by label (classification, white
        lines between classes) or by the first input feature (vector regression, e.g. x of a sine), so
        that attending to the right class or to nearby x shows as blocks or a diagonal band.
        """
        first = batch.slice(0, 1)
        _, weights = self.forward_with_attention(first)
        matrix = weights[0].mean(dim=0)  # [Q, S]
        rows, cols = torch.arange(matrix.shape[0]), torch.arange(matrix.shape[1])
        names: dict[str, list[str]] = {}
        breaks: dict[str, list[int]] = {}
        order = "position"
        if self.spec.kind == "classification":
            sy, qy = first.support_y[0].cpu(), first.query_y[0].cpu()
            rows, cols = qy.argsort(stable=True), sy.argsort(stable=True)
            breaks = {"row_breaks": group_breaks(qy[rows]), "col_breaks": group_breaks(sy[cols])}
            names = {"row_names": [f"class {y}" for y in qy[rows].tolist()],
                     "col_names": [f"class {y}" for y in sy[cols].tolist()]}
            order = "label"
        elif first.support_x.dim() == 3:  # [1, S, D] vector inputs
            qx, sx = first.query_x[0, :, 0].cpu(), first.support_x[0, :, 0].cpu()
            rows, cols = qx.argsort(), sx.argsort()
            names = {"row_names": [f"{x:.1f}" for x in qx[rows].tolist()],
                     "col_names": [f"{x:.1f}" for x in sx[cols].tolist()]}
            order = "x"
        matrix = matrix[rows.to(matrix.device)][:, cols.to(matrix.device)]
        title = "query-to-support attention, validation task 0\n(last block, heads averaged)"
        picture = attention_map(matrix, title=title, row_label=f"query (sorted by {order})",
                                col_label=f"support example (sorted by {order})", **names, **breaks)
        return {"query_support_attention": picture}
