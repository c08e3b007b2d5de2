"""MMAML: Vuorio, Sun, Hu and Lim, "Multimodal Model-Agnostic Meta-Learning via Task-Aware Modulation",
NeurIPS 2019.

A task encoder reads the support set's (x, y) pairs and produces one embedding per task; a modulation network
maps it to a FiLM scale and shift (Perez et al. 2018) of every hidden layer of the task network; MAML's inner
steps then adapt the task network's weights with the modulation held fixed. The encoder and the modulation
network learn in the outer loop only, through the query loss of the adapted, modulated network (second order
by default: the meta-gradient runs through the inner gradients, which depend on the modulation).

Batched like metarun's MAML (metarun/algorithms/maml.py): the shared weights are expanded to one copy per task,
the forward passes are batched matrix products over the task dimension (the encoder is a batched attention or
recurrent pass over [T, S, features]), and the inner gradients are one autograd.grad of the summed support
losses. tests/test_mmaml.py checks the meta-gradient against a per-task loop in float64.

Task network: FiLM after every Linear of model=mlp (before its ReLU), as the authors' code, and after every
BatchNorm of model=cnn (per channel, before the ReLU: the paper's convolutional task network; Conv-4's forward
takes the modulation, under vmap per task); other backbones (ResNet-12, Transformer) expose only input ->
features (models/base.py), so they are modulated on those features, before the head (one FiLM layer). The encoder reads raw inputs (flattened) and targets, or
one-hot labels for classification.

`oracle: true` is the paper's Multi-MAML baseline: one MAML network per mode, each task adapting the network
of its true mode (the batch's `mode`, benchmark=multimodal): the weights of all modes are one stacked tensor
per parameter, indexed by each task's mode, so all tasks still adapt at once.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_losses
from metarun.algorithms.maml import submodule_params
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.multimodal import FAMILIES, ModalTaskBatch, per_mode
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models import per_task
from metarun.models.base import Backbone
from metarun.models.mlp import MLP
from metarun.vmap import over_tasks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Params = dict[str, Tensor]
Modulation = list[tuple[Tensor, Tensor | None]]  # per modulated layer: scale [T, width], shift [T, width] or None

# task embeddings kept from the evaluations since the last picture (the validation pool), at most this many
PLOT_TASKS = 1000


class SetAttention(nn.Module):
    """One multi-head attention block of the Set Transformer (Lee et al. 2019): queries attend to the set,
    residual and LayerNorm, then a feed-forward layer, residual and LayerNorm. Queries = the set itself is a
    self-attention block (SAB); one learned query is attention pooling (PMA)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.feedforward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, elements: Tensor) -> Tensor:
        attended, _ = self.attention(queries, elements, elements, need_weights=False)
        h = self.norm1(queries + attended)
        return self.norm2(h + self.feedforward(h))


class SupportEncoder(nn.Module):
    """[T, S, pair features] -> [T, embedding_dim]: one embedding per task from its support pairs.

    attention: pairs embedded by a 2-layer MLP, `layers` self-attention blocks, then attention pooling by a
    learned seed (permutation invariant). lstm / gru: the paper's encoder, a bidirectional recurrent net over
    the pairs in their order; the embedding is the forward direction's last output and the backward
    direction's first (embedding_dim / 2 units each)."""

    def __init__(self, pair_features: int, kind: str, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.pairs = nn.Sequential(nn.Linear(pair_features, dim), nn.ReLU(), nn.Linear(dim, dim))
            self.blocks = nn.ModuleList(SetAttention(dim, heads) for _ in range(layers))
            self.pool = SetAttention(dim, heads)
            self.seed = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        else:
            rnn = nn.LSTM if kind == "lstm" else nn.GRU
            self.rnn = rnn(pair_features, dim // 2, num_layers=layers, batch_first=True, bidirectional=True)

    def forward(self, pairs: Tensor) -> Tensor:
        if self.kind == "attention":
            h = self.pairs(pairs)
            for block in self.blocks:
                h = block(h, h)
            return self.pool(self.seed.expand(h.shape[0], 1, -1), h).squeeze(1)
        out, _ = self.rnn(pairs)  # [T, S, 2 * hidden]: forward outputs, then backward outputs
        half = out.shape[-1] // 2
        return torch.cat([out[:, -1, :half], out[:, 0, half:]], dim=-1)


def modulate(h: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """FiLM of T tasks' activations h [T, N, width] with scale, shift [T, width] (one per task)."""
    h = h * scale.unsqueeze(1)
    return h if shift is None else h + shift.unsqueeze(1)


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (module names cannot contain dots)."""
    return name.replace(".", "-")


_DEFAULTS = option_defaults("algo", "mmaml")


class MMAML(nn.Module, MetaAlgorithm):
    """Task encoder + FiLM modulation network + a MAML-adapted task network (backbone plus linear head)."""

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        inner_steps: int = _DEFAULTS["inner_steps"],
        inner_lr: float = _DEFAULTS["inner_lr"],
        eval_inner_steps: int = _DEFAULTS["eval_inner_steps"],
        eval_inner_lr: float | None = _DEFAULTS["eval_inner_lr"],
        first_order: bool = _DEFAULTS["first_order"],
        inner_grad_clip: float | None = _DEFAULTS["inner_grad_clip"],
        encoder: Literal["attention", "lstm", "gru"] = _DEFAULTS["encoder"],
        embedding_dim: int = _DEFAULTS["embedding_dim"],
        encoder_layers: int = _DEFAULTS["encoder_layers"],
        encoder_heads: int = _DEFAULTS["encoder_heads"],
        modulation: Literal["film", "sigmoid", "softmax"] = _DEFAULTS["modulation"],
        oracle: bool = _DEFAULTS["oracle"],
    ) -> None:
        super().__init__()
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ValueError("algo.inner_steps and algo.eval_inner_steps must be >= 0")
        if inner_grad_clip is not None and inner_grad_clip <= 0:
            raise ValueError(f"algo.inner_grad_clip must be positive or null (got {inner_grad_clip})")
        if encoder not in ("attention", "lstm", "gru"):
            raise ValueError(f"algo.encoder must be attention, lstm or gru (got {encoder!r})")
        if modulation not in ("film", "sigmoid", "softmax"):
            raise ValueError(f"algo.modulation must be film, sigmoid or softmax (got {modulation!r})")
        if embedding_dim < 1 or encoder_layers < 1 or encoder_heads < 1:
            raise ValueError("algo.embedding_dim, algo.encoder_layers and algo.encoder_heads must be positive")
        if encoder == "attention" and embedding_dim % encoder_heads:
            raise ValueError(f"algo.embedding_dim ({embedding_dim}) must divide by algo.encoder_heads "
                             f"({encoder_heads})")
        if encoder != "attention" and embedding_dim % 2:
            raise ValueError(f"algo.embedding_dim must be even for the bidirectional {encoder} (got {embedding_dim})")
        if oracle and spec.name != "multimodal":
            raise UserInputError(f"algo.oracle=true (Multi-MAML) picks each task's network by its true mode, which "
                                 f"only benchmark=multimodal gives (got benchmark {spec.name}); use algo.oracle=false")
        self.spec = spec
        self.net = nn.Sequential(
            OrderedDict(backbone=backbone, head=nn.Linear(backbone.out_features, spec.output_size))
        )
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
        self.first_order = first_order
        self.inner_grad_clip = inner_grad_clip
        self.modulation_kind = modulation
        self.oracle = oracle
        # FiLM after every Linear of an MLP and every block of Conv-4 (after its BatchNorm, before the ReLU, as the
        # paper's convolutional task network); on the output features of any other backbone
        self.per_layer = isinstance(backbone, MLP)  # the MLP's batched matrix products (models/per_task.py)
        inner = None if self.per_layer else backbone.modulated_widths()  # Conv-4: after every block (Backbone hook)
        self.per_block = inner is not None
        if self.per_layer:
            self.widths = [layer.out_features for layer in backbone.layers if isinstance(layer, nn.Linear)]
        else:
            self.widths = inner if inner is not None else [backbone.out_features]
        self.encoder: SupportEncoder | None = None
        self.modulation: nn.ModuleList | None = None
        self.mode_params: nn.ParameterDict | None = None
        if oracle:
            # one network per family, freshly initialised; the template `net` only lends its structure
            copies = [self._fresh_copy() for _ in FAMILIES]
            self.mode_params = nn.ParameterDict({
                _key(name): nn.Parameter(torch.stack([c[name] for c in copies]))
                for name, _ in self.net.named_parameters()})
            self.net.requires_grad_(False)
        else:
            label_features = spec.ways if spec.kind == "classification" else spec.output_size
            pair_features = math.prod(spec.input_shape) + label_features
            self.encoder = SupportEncoder(pair_features, encoder, embedding_dim, encoder_layers, encoder_heads)
            per_unit = 2 if modulation == "film" else 1
            self.modulation = nn.ModuleList(nn.Linear(embedding_dim, per_unit * w) for w in self.widths)
        self._embeddings: list[tuple[Tensor, Tensor | None]] = []  # for the picture (not state: not saved)

    @property
    def backbone(self) -> Backbone:
        return self.net.backbone

    def _fresh_copy(self) -> Params:
        """The template network's parameters, re-initialised (Multi-MAML's per-mode networks start apart)."""
        clone = copy.deepcopy(self.net)
        for module in clone.modules():
            if module is not clone and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return {name: p.detach() for name, p in clone.named_parameters()}

    # -- task encoder and modulation ------------------------------------------------------------------

    def support_pairs(self, batch: TaskBatch) -> Tensor:
        """[T, S, input features + target features]: each support example's (flattened) input beside its
        target, or its one-hot label for classification."""
        x = batch.support_x.flatten(start_dim=2)
        if self.spec.kind == "classification":
            y = F.one_hot(batch.support_y, self.spec.ways).to(x.dtype)
        else:
            y = batch.support_y.flatten(start_dim=2).to(x.dtype)
        return torch.cat([x, y], dim=-1)

    def film(self, embedding: Tensor) -> Modulation:
        """Task embeddings [T, E] -> per modulated layer (scale, shift), each [T, width]. FiLM is the authors'
        form: scale = 1 + gamma, so a zero output leaves the layer unmodulated."""
        assert self.modulation is not None
        out: Modulation = []
        for layer, width in zip(self.modulation, self.widths):
            raw = layer(embedding)
            if self.modulation_kind == "film":
                out.append((1.0 + raw[:, :width], raw[:, width:]))
            elif self.modulation_kind == "sigmoid":
                out.append((torch.sigmoid(raw[:, :width]), None))
            else:
                out.append((torch.softmax(raw[:, :width], dim=-1), None))
        return out

    def task_embedding(self, batch: TaskBatch) -> Tensor:
        """[T, embedding_dim]: what the encoder makes of each task's support set."""
        assert self.encoder is not None
        return self.encoder(self.support_pairs(batch))

    # -- the batched task network ---------------------------------------------------------------------

    def task_outputs(self, params: Params, x: Tensor, modulation: Modulation | None) -> Tensor:
        """The modulated network on x [T, N, *input] with task t's weights params[k][t] -> [T, N, outputs]."""
        if self.per_layer:
            h, layer_index = x, 0
            for index, layer in enumerate(self.backbone.layers):  # type: ignore[attr-defined]
                if isinstance(layer, nn.Linear):
                    h = per_task.linear(h, params[f"backbone.layers.{index}.weight"],
                                        params.get(f"backbone.layers.{index}.bias"))
                    if modulation is not None:
                        h = modulate(h, *modulation[layer_index])
                    layer_index += 1
                elif isinstance(layer, nn.ReLU):
                    h = torch.relu(h)
                else:  # the Flatten of image inputs, shifted by the task dimension
                    h = h.flatten(start_dim=2)
        elif self.per_block and modulation is not None:
            backbone, buffers = self.backbone, dict(self.backbone.named_buffers())  # type: ignore[attr-defined]
            h = over_tasks(lambda p, xt, film: functional_call(backbone, (p, buffers), (xt,), {"modulation": film}))(
                submodule_params(params, "backbone."), x, modulation)
        else:
            h = self.backbone.forward_per_task(submodule_params(params, "backbone."), x)
            if modulation is not None:
                h = modulate(h, *modulation[0])
        return per_task.linear(h, params["head.weight"], params["head.bias"])

    def initial_params(self, batch: TaskBatch) -> Params:
        """Each task's starting weights [T, ...]: the shared ones expanded (views), or for the oracle the
        weights of the task's own mode."""
        if self.mode_params is None:
            tasks = batch.num_tasks
            return {k: p.expand(tasks, *p.shape) for k, p in self.net.named_parameters()}
        if not isinstance(batch, ModalTaskBatch):
            raise UserInputError("algo.oracle=true needs each task's mode: use benchmark=multimodal")
        return {name: self.mode_params[_key(name)][batch.mode] for name, _ in self.net.named_parameters()}

    def _adapt_and_score(self, batch: TaskBatch, steps: int, lr: float, first_order: bool,
                         evaluation: bool = False, outputs: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Modulate, adapt every task for `steps` SGD steps on its support set, score on its query set:
        (loss [T], metric [T], embedding [T, E] or None), or in `evaluation` the loss and metric [T, steps + 1]
        after each step, with no graph kept between steps (as MAML's evaluation). `outputs` (with `evaluation`):
        the adapted network's query outputs [T, Q, ...] first instead."""
        embedding = None if self.encoder is None else self.task_embedding(batch)
        modulation = None if embedding is None else self.film(embedding)
        fast = self.initial_params(batch)
        if evaluation:  # leaves of their own; the modulation is a constant of the inner loop
            fast = {k: p.detach().requires_grad_() for k, p in fast.items()}
            modulation = None if modulation is None else [(s.detach(), None if b is None else b.detach())
                                                          for s, b in modulation]
        sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
        scores = []
        for step in range(steps + 1):
            if evaluation and not outputs:
                with torch.no_grad():
                    scores.append(task_losses(self.spec, self.task_outputs(fast, qx, modulation), qy))
            if step == steps:
                break
            support_loss = task_losses(self.spec, self.task_outputs(fast, sx, modulation), sy)[0].sum()
            grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not first_order)
            if self.inner_grad_clip is not None:
                grads = tuple(g.clamp(-self.inner_grad_clip, self.inner_grad_clip) for g in grads)
            fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads)}
            if evaluation:
                fast = {k: p.detach().requires_grad_() for k, p in fast.items()}
        if outputs:
            with torch.no_grad():
                return self.task_outputs(fast, qx, modulation), qy, embedding
        if not evaluation:
            loss, metric = task_losses(self.spec, self.task_outputs(fast, qx, modulation), qy)
            return loss, metric, embedding
        losses, metrics = zip(*scores)
        return torch.stack(losses, dim=1), torch.stack(metrics, dim=1), embedding

    # -- the MetaAlgorithm protocol --------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        losses, metric, _ = self._adapt_and_score(batch, self.inner_steps, self.inner_lr, self.first_order)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metric after 0..eval_inner_steps steps (`mse@0` is the paper's "post modulation", `mse` its
        "post adaptation"), and the final metric per mode (`mse/<mode>`) when the tasks know their mode.
        Adaptation is first order with detached copies, as MAML's evaluation. The task embeddings are kept
        for the next `visualize` (the trainer validates, then draws)."""
        with torch.enable_grad():
            _, metric, embedding = self._adapt_and_score(batch, self.eval_inner_steps, self.eval_inner_lr,
                                                         first_order=True, evaluation=True)
        name = self.spec.metric
        out = {f"{name}@{k}": metric[:, k].detach() for k in range(metric.shape[1])}
        out[name] = metric[:, -1].detach()
        out.update(per_mode(batch, {name: out[name]}))
        self._keep_embeddings(batch, embedding)
        return out

    def query_scores(self, batch: TaskBatch) -> Tensor:
        """The modulated, adapted network's query outputs, as `evaluate` adapts it."""
        with torch.enable_grad():
            logits, _, _ = self._adapt_and_score(batch, self.eval_inner_steps, self.eval_inner_lr, first_order=True,
                                                 evaluation=True, outputs=True)
        return logits

    def _keep_embeddings(self, batch: TaskBatch, embedding: Tensor | None) -> None:
        """The task embeddings of the latest validation tasks, for the next `visualize` (PCA picture)."""
        if embedding is not None:
            mode = batch.mode.detach().cpu() if isinstance(batch, ModalTaskBatch) else None
            self._embeddings.append((embedding.detach().cpu(), mode))
            while sum(e.shape[0] for e, _ in self._embeddings) > PLOT_TASKS:
                self._embeddings.pop(0)

    @torch.no_grad()
    def visualize(self, batch: TaskBatch) -> dict[str, Tensor]:
        """The task embeddings of the tasks evaluated since the last picture (the validation pool), projected
        to 2-D by PCA and coloured by mode: the paper's Figure 3, whether the encoder tells the modes apart.
        Without a pool evaluated first, the embeddings of `batch`. The oracle has no encoder: nothing to draw."""
        if self.encoder is None:
            return {}
        kept, self._embeddings = self._embeddings, []
        if not kept:
            kept = [(self.task_embedding(batch).cpu(), batch.mode.cpu() if isinstance(batch, ModalTaskBatch) else None)]
        embeddings = torch.cat([e for e, _ in kept])
        modes = torch.cat([m for _, m in kept]) if all(m is not None for _, m in kept) else None
        return {"task_embeddings": embedding_picture(embeddings, modes)}


# a colour per family (FAMILIES order), and one for tasks without a mode
_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
_NO_MODE = (90, 90, 90)


def pca_2d(embeddings: Tensor) -> Tensor:
    """[N, E] -> [N, 2]: the embeddings centred and projected on their two leading principal directions
    (zeros where there are fewer than two)."""
    centred = embeddings.double() - embeddings.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ vh[:2].T
    if coords.shape[1] < 2:
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 2 - coords.shape[1])], dim=1)
    return coords


def embedding_picture(embeddings: Tensor, modes: Tensor | None) -> Tensor:
    """uint8 [3, H, W]: a scatter of the PCA projection coloured by mode, with a legend (matplotlib), or a
    plain Pillow raster without it."""
    from metarun.plotting import render

    coords = pca_2d(embeddings).numpy()
    groups: list[tuple[str, object, tuple[int, int, int]]] = []
    if modes is None:
        groups.append(("tasks", slice(None), _NO_MODE))
    else:
        for index in sorted(set(modes.tolist())):
            groups.append((FAMILIES[index], (modes == index).numpy(), _COLOURS[index % len(_COLOURS)]))

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        for label, chosen, colour in groups:
            ax.scatter(coords[chosen, 0], coords[chosen, 1], s=14, color=tuple(c / 255 for c in colour),
                       label=label, alpha=0.8, linewidths=0)
        ax.set_xlabel("principal component 1")
        ax.set_ylabel("principal component 2")
        ax.set_title(f"MMAML task embeddings, {len(coords)} validation tasks (PCA)")
        ax.grid(True, color="0.92")
        figure.legend(loc="outside right upper", frameon=False)

    picture = render(draw)
    if picture is not None:
        return picture
    # the fallback without matplotlib: dots and a coloured legend, no axes
    width, height, margin = 360, 240, 12
    low, high = coords.min(axis=0), coords.max(axis=0)
    span = [max(float(h - l), 1e-9) for l, h in zip(low, high)]
    image = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    for row, (label, chosen, colour) in enumerate(groups):
        for u, v in coords[chosen]:
            px = margin + (u - low[0]) / span[0] * (width - 2 * margin)
            py = height - margin - (v - low[1]) / span[1] * (height - 2 * margin)
            pen.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        pen.text((margin, margin + 12 * row), label, fill=colour)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
