"""Reptile: Nichol, Achiam and Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018.

Each task trains its own copy of the weights for `inner_steps` steps of SGD, or of Adam with
beta1 = 0 (the paper's choice), on mini-batches of its data; the meta-update moves the weights
towards the mean of the adapted ones: theta <- theta + epsilon * mean_t(theta'_t - theta).

The shared trainer owns the outer update, so `meta_loss` returns the surrogate
0.5 * ||theta - stopgrad(mean_t theta'_t)||^2, whose gradient is exactly theta - mean_t theta'_t:
the trainer's `SGD(lr=epsilon)` step is then Reptile's, and a linear schedule of its learning rate
to 0 is the paper's annealing (configs/algo/reptile.yaml sets both). Logged `loss`/metric are the
query set's after adaptation.

Details, and where they depart from the authors' code (openai/supervised-reptile):
- Batched over tasks with torch.func.vmap of a per-task inner loop (torch.func.grad of a
  functional_call), under no_grad: the meta-update needs no graph through the inner loop.
- Mini-batches (`inner_batch_size`, null = the whole set at every step) walk through the task's data
  in a fresh random order each epoch, carrying over epoch boundaries, as the authors' code does. The
  order comes from the run's algorithm generator (seeded by run.py, its state saved by the trainer in
  every checkpoint, so a resumed run draws the same batches); evaluation uses a fixed seed.
- `train_on: all` meta-trains on the whole training episode (support and query): Reptile does not
  split a training task, and the paper meta-trains on more examples per class ("train shots") than
  it tests with. `support` (the default) keeps the query set held out, so the logged loss is MAML's.
- Adam's second-moment estimate starts at zero for every task (the authors' code shares it across
  tasks and meta-iterations as a side effect of its TensorFlow variables).
- Evaluation fine-tunes on the support set for `eval_inner_steps` steps, then scores the query set.
  Whether the query set is normalised transductively (the paper's `--transductive`) is the backbone's
  BatchNorm mode (model.bn), as for every algorithm here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_loss
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.models.base import Backbone
from metarun.vmap import over_tasks

Params = dict[str, Tensor]

ADAM_BETA2 = 0.999  # Adam's defaults; beta1 = 0 as in the paper (no momentum across inner steps)
ADAM_EPS = 1e-8
EVAL_SHUFFLE_SEED = 0  # evaluation mini-batches (eval_inner_batch_size) are the same for every call


def mini_batch_indices(num_tasks: int, size: int, steps: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """[T, steps, batch_size] indices into each task's `size` examples: consecutive batches of a stream
    that visits the examples in a new random order every epoch (a batch may span two epochs)."""
    epochs = math.ceil(steps * batch_size / size)
    order = torch.rand(num_tasks, epochs, size, generator=generator).argsort(dim=-1)  # a permutation per epoch
    return order.flatten(1)[:, : steps * batch_size].reshape(num_tasks, steps, batch_size)


_DEFAULTS = option_defaults("algo", "reptile")


class Reptile(nn.Module, MetaAlgorithm):
    """Backbone plus a linear head (as MAML's), meta-trained by moving towards per-task fine-tuned weights."""

    draws_randomness = True  # the order of the inner mini-batches

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        inner_steps: int = _DEFAULTS["inner_steps"],
        inner_lr: float = _DEFAULTS["inner_lr"],
        inner_optimizer: Literal["sgd", "adam"] = _DEFAULTS["inner_optimizer"],
        inner_batch_size: int | None = _DEFAULTS["inner_batch_size"],
        train_on: Literal["support", "all"] = _DEFAULTS["train_on"],
        eval_inner_steps: int = _DEFAULTS["eval_inner_steps"],
        eval_inner_batch_size: int | None = _DEFAULTS["eval_inner_batch_size"],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ValueError("algo.inner_steps and algo.eval_inner_steps must be >= 0")
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"algo.inner_optimizer must be 'sgd' or 'adam' (got {inner_optimizer!r})")
        if train_on not in ("support", "all"):
            raise ValueError(f"algo.train_on must be 'support' or 'all' (got {train_on!r})")
        for name, size in (("inner_batch_size", inner_batch_size), ("eval_inner_batch_size", eval_inner_batch_size)):
            if size is not None and size < 1:
                raise ValueError(f"algo.{name} must be a positive integer, or null for the whole set (got {size})")
        self.spec = spec
        self.net = nn.Sequential(
            OrderedDict(backbone=backbone, head=nn.Linear(backbone.out_features, spec.output_size))
        )
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.inner_optimizer = inner_optimizer
        self.inner_batch_size = inner_batch_size
        self.train_on = train_on
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_batch_size = eval_inner_batch_size
        # Shuffles the training mini-batches: the run's algorithm generator (seeded by run.py, saved by the
        # trainer in every checkpoint), or a fixed seed for a Python caller that passes none.
        self.shuffle = generator if generator is not None else torch.Generator().manual_seed(0)

    @property
    def backbone(self) -> Backbone:
        return self.net.backbone

    # -- the per-task computation (no task dimension; vmapped over tasks) ---------------------------

    def _call(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.net, (params, dict(self.net.named_buffers())), (x,))

    def _adapt(self, params: Params, xs: Tensor, ys: Tensor) -> Params:
        """One task's fine-tuned weights after a step on each of the mini-batches xs [steps, B, ...], ys."""

        def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
            return task_loss(self.spec, self._call(p, x), y)[0]

        fast = params
        # Adam's second-moment estimate, per task and starting at zero
        second = {k: torch.zeros_like(p) for k, p in params.items()} if self.inner_optimizer == "adam" else {}
        for step in range(xs.shape[0]):
            g = grad(loss)(fast, xs[step], ys[step])
            if self.inner_optimizer == "sgd":
                fast = {k: p - self.inner_lr * g[k] for k, p in fast.items()}
                continue
            # Adam with beta1 = 0: the first moment is the gradient itself and needs no bias correction
            second = {k: ADAM_BETA2 * second[k] + (1 - ADAM_BETA2) * g[k] * g[k] for k in fast}
            correction = math.sqrt(1 - ADAM_BETA2 ** (step + 1))
            fast = {k: p - self.inner_lr * g[k] / (second[k].sqrt() / correction + ADAM_EPS) for k, p in fast.items()}
        return fast

    def _mini_batches(self, x: Tensor, y: Tensor, steps: int, batch_size: int | None,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The inner loop's data, [T, steps, B, ...]: the whole set at every step (a view) or shuffled batches."""
        t, n = x.shape[:2]
        if batch_size is None:
            return x.unsqueeze(1).expand(t, steps, *x.shape[1:]), y.unsqueeze(1).expand(t, steps, *y.shape[1:])
        index = mini_batch_indices(t, n, steps, batch_size, generator).to(x.device).flatten(1)  # [T, steps * B]
        rows = torch.arange(t, device=x.device).unsqueeze(1)
        return (x[rows, index].view(t, steps, batch_size, *x.shape[2:]),
                y[rows, index].view(t, steps, batch_size, *y.shape[2:]))

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch.support_x, batch.support_y
        if self.train_on == "all":
            x, y = torch.cat((x, batch.query_x), dim=1), torch.cat((y, batch.query_y), dim=1)
        xs, ys = self._mini_batches(x, y, self.inner_steps, self.inner_batch_size, self.shuffle)
        params = {k: v.detach() for k, v in self.net.named_parameters()}

        def one_task(xs: Tensor, ys: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, Tensor, Tensor]:
            fast = self._adapt(params, xs, ys)
            loss, metric = task_loss(self.spec, self._call(fast, qx), qy)
            return fast, loss, metric

        with torch.no_grad():  # the meta-update needs the adapted weights, not a graph through them
            adapted, losses, metric = over_tasks(one_task)(xs, ys, batch.query_x, batch.query_y)
        # gradient of 0.5 * ||theta - target||^2 is theta - target: SGD(lr=epsilon) then steps towards the target
        surrogate = torch.stack([0.5 * (p - adapted[k].mean(dim=0)).pow(2).sum()
                                 for k, p in self.net.named_parameters()]).sum()
        return surrogate, batch_metrics(self.spec, losses, metric)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metric before fine-tuning (`accuracy@0`), and after eval_inner_steps steps (`accuracy@K`, `accuracy`)
        on the support set."""
        params, xs, ys = self._evaluation_inputs(batch)

        def one_task(xs: Tensor, ys: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            before = task_loss(self.spec, self._call(params, qx), qy)[1]
            after = task_loss(self.spec, self._call(self._adapt(params, xs, ys), qx), qy)[1]
            return before, after

        before, after = over_tasks(one_task)(xs, ys, batch.query_x, batch.query_y)
        name = self.spec.metric
        return {f"{name}@0": before, f"{name}@{self.eval_inner_steps}": after, name: after}

    @torch.no_grad()
    def query_scores(self, batch: TaskBatch) -> Tensor:
        """The query outputs after the fine-tuning `evaluate` does (same mini-batches, same steps)."""
        params, xs, ys = self._evaluation_inputs(batch)
        return over_tasks(lambda xs, ys, qx: self._call(self._adapt(params, xs, ys), qx))(xs, ys, batch.query_x)

    def _evaluation_inputs(self, batch: TaskBatch) -> tuple[Params, Tensor, Tensor]:
        """The detached weights and the test-time fine-tuning's mini-batches (a fixed shuffle seed)."""
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        generator = torch.Generator().manual_seed(EVAL_SHUFFLE_SEED)
        xs, ys = self._mini_batches(batch.support_x, batch.support_y, self.eval_inner_steps,
                                    self.eval_inner_batch_size, generator)
        return params, xs, ys
