"""LEO: Rusu, Rao, Sygnowski, Vinyals, Pascanu, Osindero and Hadsell, "Meta-Learning with Latent Embedding
Optimization", ICLR 2019 (arXiv:1807.05960; code: deepmind/leo).

The support set sets the learner's starting point. The task's support features pass through an encoder (dropout
and a bias-free linear map to `num_latents` dimensions) and a relation network: a 3-layer bias-free MLP of width
2L with ReLUs, applied to every ordered pair of the task's support codes and averaged over the partners. The
result is averaged over each class's examples, giving the mean and the raw scale of a Gaussian latent code per
class. A sample of that code (its mean outside meta-training) is decoded by a bias-free linear map into the
mean and raw scale of a Gaussian over per-example classifier weights; a class's weights are the mean over its
examples' weights. Scales are exp(raw) - 1 + offset, clamped at 1e-10: offset 0 for the latents, sqrt(2 / (N +
D)) for the weights (Glorot's scale, as the paper's code has it).

Adaptation runs in latent space. `inner_steps` steps z <- z - inner_lr * d/dz (sum of the support
cross-entropies), with a learned step size per latent dimension (initially `inner_lr_init`), decoding (and, in
meta-training, re-sampling) the weights after each step. Then `finetuning_steps` steps fine-tune the decoded
weights directly, with a learned step size per feature (initially `finetuning_lr_init`): the paper's last stage.
Every step is differentiated through (second order) unless `first_order`.

The meta-loss per task is the query cross-entropy after adaptation, plus `kl_weight` times the KL term (log q(z)
- log N(z; 0, I) at the sample, averaged over the code's entries), plus `encoder_penalty_weight` times the mean
squared distance between the encoder's code and the adapted code (the adapted code held fixed). Two terms do
not depend on the task: `l2_penalty_weight` * sum ||W||^2 / 2 over the encoder, relation-network and decoder
weights, and `orthogonality_penalty_weight` * mean((C - I)^2), where C is the correlation matrix of the
decoder's rows (one row per latent dimension). Dropout (`dropout`, the probability of dropping an entry) is
applied to the features before the encoder and before every prediction, in meta-training only.

The paper reads pre-computed features of a pre-trained WRN-28-10, each scaled to unit L2 norm by its data
pipeline (deepmind/leo data.py: tf.nn.l2_normalize); `normalize_features` does the same. It matters: on the
unnormalised features of a ProtoNet Conv-4 (mean norm 8.7), the first latent step at the paper's inner_lr 1.0
took the codes from |z| <= 13 to 60 and the decoded weights' scale exp(raw) to 4e17, and every meta-training
batch gave a NaN loss. Here the features come from the run's backbone:
`init_from` copies the backbone of any metarun checkpoint (e.g. a ProtoNet run's best.pt). `freeze_backbone`
null freezes it exactly when `init_from` is given: no gradient, eval mode, no running-statistics updates (the
trainer skips those for a backbone whose parameters are all frozen). Otherwise it trains jointly with LEO.
The paper's outer-loop settings are trainer settings. Gradients are clipped element-wise at 0.1
(trainer.grad_clip_value) and then per tensor to norm 0.1 (trainer.grad_clip with trainer.grad_clip_per_tensor).
Adam runs at lr 1e-4 with 12 tasks per step. The pair files (algo_benchmark/leo_*.yaml) set these, and
trainer.on_nan=fallback: as the paper's code, a NaN loss or gradient is replaced by the gradient of the L2 penalty
alone (`nan_fallback_loss`), which shrinks the weights back to where the loss is defined.

The support set need not be laid out by class, and classes may have different numbers of shots: per-class means
are one-hot products. With K shots per class this is the paper's layout exactly, including one latent sample per
support example. All tasks run at once: the model is batched over the leading task dimension, and the inner
gradients come from torch.autograd.grad of the loss summed over tasks. Each task's loss depends on its own codes
only, so that sum's gradient holds every task's own gradient. Random draws (Gaussian samples, dropout masks) come
from the run's algorithm generator, which every checkpoint saves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_losses
from metarun.algorithms.pretrained import load_backbone
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.models.base import Backbone
from metarun.vmap import over_tasks

_DEFAULTS = option_defaults("algo", "leo")
MIN_SCALE = 1e-10  # the paper's code clamps every Gaussian scale here


class Adaptation:
    """One batch of tasks adapted: the encoder's codes, the adapted codes, the final per-example weights, and
    the values the loss and the metrics read."""

    def __init__(self, start: Tensor, latents: Tensor, weights: Tensor, kl: Tensor, latent_weights: Tensor) -> None:
        self.start = start  # [T, S, L] the encoder's codes (sampled in meta-training)
        self.latents = latents  # [T, S, L] after the latent-space steps
        self.weights = weights  # [T, S, D] per-example classifier weights after fine-tuning
        self.kl = kl  # [T]
        self.latent_weights = latent_weights  # [T, S, D] the weights decoded from `latents`, before fine-tuning


class LEO(nn.Module, MetaAlgorithm):
    """Latent Embedding Optimization: the support set is encoded into a latent code per class, which is decoded
    into the classifier's weights and adapted in latent space, then the weights are fine-tuned."""

    supports = frozenset({"classification"})
    alternatives = "algo=maml, algo=mmaml or algo=metasgd"
    draws_randomness = True

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        num_latents: int = _DEFAULTS["num_latents"],
        inner_steps: int = _DEFAULTS["inner_steps"],
        finetuning_steps: int = _DEFAULTS["finetuning_steps"],
        inner_lr_init: float = _DEFAULTS["inner_lr_init"],
        finetuning_lr_init: float = _DEFAULTS["finetuning_lr_init"],
        dropout: float = _DEFAULTS["dropout"],
        kl_weight: float = _DEFAULTS["kl_weight"],
        encoder_penalty_weight: float = _DEFAULTS["encoder_penalty_weight"],
        l2_penalty_weight: float = _DEFAULTS["l2_penalty_weight"],
        orthogonality_penalty_weight: float = _DEFAULTS["orthogonality_penalty_weight"],
        first_order: bool = _DEFAULTS["first_order"],
        normalize_features: bool = _DEFAULTS["normalize_features"],
        init_from: str | None = _DEFAULTS["init_from"],
        freeze_backbone: bool | None = _DEFAULTS["freeze_backbone"],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_latents < 1:
            raise ValueError(f"algo.num_latents must be at least 1 (got {num_latents})")
        for name, count in (("inner_steps", inner_steps), ("finetuning_steps", finetuning_steps)):
            if count < 0:
                raise ValueError(f"algo.{name} must be >= 0 (got {count})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"algo.dropout must be in [0, 1), the probability of dropping a feature (got {dropout})")
        for name, weight in (("kl_weight", kl_weight), ("encoder_penalty_weight", encoder_penalty_weight),
                             ("l2_penalty_weight", l2_penalty_weight),
                             ("orthogonality_penalty_weight", orthogonality_penalty_weight)):
            if weight < 0:
                raise ValueError(f"algo.{name} must be >= 0, 0 = off (got {weight})")
        self.spec = spec
        self.backbone = backbone
        features, latents = int(backbone.out_features), num_latents
        self.encoder = nn.Linear(features, latents, bias=False)
        self.relation = nn.Sequential(nn.Linear(2 * latents, 2 * latents, bias=False), nn.ReLU(),
                                      nn.Linear(2 * latents, 2 * latents, bias=False), nn.ReLU(),
                                      nn.Linear(2 * latents, 2 * latents, bias=False))
        self.decoder = nn.Linear(latents, 2 * features, bias=False)
        for linear in self.penalised_weights():  # the paper's Glorot-uniform initialisation
            nn.init.xavier_uniform_(linear)
        self.inner_lr = nn.Parameter(torch.full((latents,), float(inner_lr_init)))
        self.finetuning_lr = nn.Parameter(torch.full((features,), float(finetuning_lr_init)))
        self.inner_steps, self.finetuning_steps = inner_steps, finetuning_steps
        self.dropout = dropout
        self.kl_weight, self.encoder_penalty_weight = kl_weight, encoder_penalty_weight
        self.l2_penalty_weight, self.orthogonality_penalty_weight = l2_penalty_weight, orthogonality_penalty_weight
        self.first_order = first_order
        self.normalize_features = normalize_features
        # the run's algorithm generator (seeded by run.py, saved by the trainer), or a fixed seed for a Python caller
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if init_from is not None:
            load_backbone(backbone, init_from)
        self.frozen = init_from is not None if freeze_backbone is None else bool(freeze_backbone)
        if self.frozen:
            backbone.requires_grad_(False)  # type: ignore[attr-defined]
            backbone.eval()  # type: ignore[attr-defined]

    def train(self, mode: bool = True) -> "LEO":
        """A frozen backbone stays in eval mode (no dropout or DropBlock: fixed features, as the paper's)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # type: ignore[attr-defined]
        return self

    def parameter_groups(self) -> list[dict]:
        """The trainable parameters only: a frozen backbone is not handed to the optimizer."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def penalised_weights(self) -> list[Tensor]:
        """The weights of the encoder, the relation network and the decoder: what the L2 penalty covers."""
        return [self.encoder.weight, *(m.weight for m in self.relation if isinstance(m, nn.Linear)),
                self.decoder.weight]

    # -- the model ---------------------------------------------------------------------------------

    def features(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """[T, S, D] support and [T, Q, D] query features; each task's sets are their own backbone batch. Each
        feature vector is scaled to unit length when `normalize_features` (the paper's data pipeline does it)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            support, query = over_tasks(self.backbone)(batch.support_x), over_tasks(self.backbone)(batch.query_x)
        if self.normalize_features:
            return F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        return support, query

    def drop(self, x: Tensor) -> Tensor:
        """Inverted dropout in meta-training, masks from the algorithm's generator."""
        if not self.training or self.dropout == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, dtype=x.dtype).to(x.device) >= self.dropout
        return x * keep / (1.0 - self.dropout)

    def sample(self, params: Tensor, offset: float) -> tuple[Tensor, Tensor]:
        """(value, KL term [T]) of the Gaussian whose mean and raw scale `params` [T, S, 2E] holds: a
        reparameterised sample and mean(log q - log N(0, 1)) at it in meta-training, the mean and 0 otherwise."""
        mean, raw = params.chunk(2, dim=-1)
        if not self.training:
            return mean, mean.new_zeros(mean.shape[0])
        scale = (raw.exp() - (1.0 - offset)).clamp_min(MIN_SCALE)
        noise = torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype).to(mean.device)
        value = mean + scale * noise
        # log q(value) - log N(value; 0, 1), with (value - mean) / scale = noise (the 2 pi terms cancel)
        kl = 0.5 * value.square() - 0.5 * noise.square() - scale.log()
        return value, kl.flatten(start_dim=1).mean(dim=1)

    def encode(self, support: Tensor, labels: Tensor) -> Tensor:
        """[T, S, 2L] latent distribution parameters: the class mean of the relation network's pair averages,
        given to every example of the class."""
        codes = self.encoder(self.drop(support))  # [T, S, L]
        size = codes.shape[1]
        pairs = torch.cat([codes.unsqueeze(2).expand(-1, -1, size, -1), codes.unsqueeze(1).expand(-1, size, -1, -1)],
                          dim=-1)  # [T, S, S, 2L]: (code i, code j)
        relations = self.relation(pairs).mean(dim=2)  # [T, S, 2L]
        onehot = F.one_hot(labels, self.spec.ways).to(relations.dtype)  # [T, S, N]
        return onehot @ class_means(relations, onehot)

    def decode(self, latents: Tensor) -> Tensor:
        """[T, S, D] per-example classifier weights decoded from the codes [T, S, L] (sampled in meta-training)."""
        features = self.decoder.out_features // 2
        offset = math.sqrt(2.0 / (self.spec.ways + features))
        return self.sample(self.decoder(latents), offset)[0]

    def logits(self, x: Tensor, weights: Tensor, labels: Tensor) -> Tensor:
        """[T, M, N]: each example's dot product with each class's weights (the mean of its examples' weights)."""
        onehot = F.one_hot(labels, self.spec.ways).to(weights.dtype)
        return self.drop(x) @ class_means(weights, onehot).transpose(1, 2)

    def support_loss(self, support: Tensor, weights: Tensor, labels: Tensor) -> Tensor:
        """The inner loops' objective: the support cross-entropies summed over examples and tasks."""
        logits = self.logits(support, weights, labels)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

    def adapt(self, support: Tensor, labels: Tensor, differentiable: bool) -> Adaptation:
        """Encode, take the latent-space steps, then fine-tune the weights. `differentiable`: keep the graph of
        every step for the outer gradient (second order unless first_order); otherwise each step's result is
        detached, which is what evaluation needs."""
        start, kl = self.sample(self.encode(support, labels), 0.0)
        create_graph = differentiable and not self.first_order

        def step(value: Tensor, rate: Tensor, loss: Tensor) -> Tensor:
            (gradient,) = torch.autograd.grad(loss, value, create_graph=create_graph, retain_graph=differentiable)
            updated = value - rate * gradient
            return updated if differentiable else updated.detach().requires_grad_()

        latents = start if differentiable else start.detach().requires_grad_()
        weights = self.decode(latents)
        for _ in range(self.inner_steps):
            latents = step(latents, self.inner_lr, self.support_loss(support, weights, labels))
            weights = self.decode(latents)
        latent_weights = weights
        if not differentiable:
            weights = weights.detach().requires_grad_()
        for _ in range(self.finetuning_steps):
            weights = step(weights, self.finetuning_lr, self.support_loss(support, weights, labels))
        return Adaptation(start, latents, weights, kl, latent_weights)

    def orthogonality(self) -> Tensor:
        """mean((C - I)^2), C the correlation matrix of the decoder's L rows ([L, 2D] in the paper's layout)."""
        rows = self.decoder.weight.t()
        norms = rows.norm(dim=1, keepdim=True) + 1e-32
        correlation = (rows @ rows.t()) / (norms @ norms.t())
        return (correlation - torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)).square().mean()

    def l2_penalty(self) -> Tensor:
        """sum ||W||^2 / 2 over the penalised weights (TensorFlow's l2_regularizer, which the paper's code uses)."""
        return sum(w.square().sum() for w in self.penalised_weights()) / 2  # type: ignore[return-value]

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        support, query = self.features(batch)
        adapted = self.adapt(support, batch.support_y, differentiable=True)
        losses, accuracy = task_losses(self.spec, self.logits(query, adapted.weights, batch.support_y), batch.query_y)
        per_task = losses + self.kl_weight * adapted.kl
        penalty = (adapted.latents.detach() - adapted.start).square().flatten(start_dim=1).mean(dim=1)
        if self.training:  # the paper's encoder penalty is a meta-training term
            per_task = per_task + self.encoder_penalty_weight * penalty
        orthogonality = self.orthogonality()
        loss = (per_task.mean() + self.l2_penalty_weight * self.l2_penalty()
                + self.orthogonality_penalty_weight * orthogonality)
        metrics = {**batch_metrics(self.spec, losses, accuracy), "loss": loss.detach(), "query_ce": losses.detach().mean(),
                   "kl": adapted.kl.detach().mean(), "encoder_penalty": penalty.detach().mean(),
                   "orthogonality": orthogonality.detach()}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Accuracy and cross-entropy after the latent steps and fine-tuning (`accuracy`, `loss`), and accuracy
        after the latent steps alone (`latent_accuracy`), from the means (no sampling, no dropout outside
        meta-training)."""
        support, query = self.features(batch)
        with torch.enable_grad():
            adapted = self.adapt(support, batch.support_y, differentiable=False)
        losses, accuracy = task_losses(self.spec, self.logits(query, adapted.weights.detach(), batch.support_y),
                                       batch.query_y)
        latent = task_losses(self.spec, self.logits(query, adapted.latent_weights.detach(), batch.support_y),
                             batch.query_y)[1]
        return {self.spec.metric: accuracy, "loss": losses, "latent_accuracy": latent}

    def nan_fallback_loss(self) -> Tensor:
        """The paper's code, on a NaN loss or gradient: the gradient of 1e-4 x sum ||W||^2 / 2 alone (its
        `1e-4 / l2_penalty_weight` times the weighted penalty), which shrinks the weights towards zero."""
        return 1e-4 * self.l2_penalty()

    def query_scores(self, batch: TaskBatch) -> Tensor:
        support, query = self.features(batch)
        with torch.enable_grad():
            adapted = self.adapt(support, batch.support_y, differentiable=False)
        return self.logits(query, adapted.weights.detach(), batch.support_y)


def class_means(values: Tensor, onehot: Tensor) -> Tensor:
    """[T, S, E] per-example values, [T, S, N] one-hot labels -> [T, N, E] per-class means."""
    return onehot.transpose(1, 2) @ values / onehot.sum(dim=1).unsqueeze(-1)
