"""Meta-SGD: Li, Zhou, Chen and Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
arXiv:1707.09835, 2017.

MAML's inner step theta' = theta - alpha * grad with a learned learning rate per weight: alpha is a
tensor of theta's shape for every parameter, initialised to `inner_lr` and meta-learned with theta by
the trainer's outer optimizer (the paper: one inner step, second order, both by Adam). The update
direction as well as the step size is learned, since alpha's entries may change sign.

All tasks of a batch adapt at once (torch.func.vmap over torch.func.grad of a functional_call); the
outer backward differentiates through the inner gradient unless `first_order` detaches it (alpha
still gets a gradient then, through the product alpha * grad).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metarun.algorithms.base import batch_metrics, task_loss, update_running_statistics
from metarun.benchmarks.base import TaskSpec
from metarun.episodes import TaskBatch

Params = dict[str, Tensor]


def lr_key(name: str) -> str:
    """The learning-rate parameter's name for parameter `name` (module names cannot contain dots)."""
    return name.replace(".", "-")


class MetaSGD(nn.Module):
    """Backbone plus a linear head, adapted per task by `inner_steps` steps with learned per-weight rates."""

    supports = frozenset({"classification", "regression"})

    def __init__(
        self,
        backbone: nn.Module,
        spec: TaskSpec,
        inner_steps: int = 1,
        inner_lr: float = 0.01,
        eval_inner_steps: int = 1,
        first_order: bool = False,
    ) -> None:
        super().__init__()
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ValueError("algo.inner_steps and algo.eval_inner_steps must be >= 0")
        self.spec = spec
        self.net = nn.Sequential(
            OrderedDict(backbone=backbone, head=nn.Linear(backbone.out_features, spec.output_size))
        )
        # alpha: one learned rate per weight, the same tensor shape as the weight
        self.inner_lrs = nn.ParameterDict(
            {lr_key(name): nn.Parameter(torch.full_like(p, inner_lr)) for name, p in self.net.named_parameters()}
        )
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order

    # -- the per-task computation (no task dimension; vmapped over tasks) ---------------------------

    def _call(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.net, (params, dict(self.net.named_buffers())), (x,))

    def _adapt_and_score(
        self, params: Params, lrs: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
        steps: int, first_order: bool, every_step: bool,
    ) -> tuple[Tensor, Tensor]:
        """`steps` steps theta <- theta - alpha * grad on (sx, sy); query (loss, metric), per step if `every_step`."""

        def support_loss(p: Params) -> Tensor:
            return task_loss(self.spec, self._call(p, sx), sy)[0]

        def score(p: Params) -> tuple[Tensor, Tensor]:
            return task_loss(self.spec, self._call(p, qx), qy)

        fast = params
        scores = [score(fast)] if every_step else []
        for _ in range(steps):
            grads = grad(support_loss)(fast)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast = {k: p - lrs[lr_key(k)] * grads[k] for k, p in fast.items()}
            if every_step:
                scores.append(score(fast))
        if not every_step:
            return score(fast)
        losses, metrics = zip(*scores)
        return torch.stack(losses), torch.stack(metrics)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        params = dict(self.net.named_parameters())
        lrs = dict(self.inner_lrs.items())

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self._adapt_and_score(params, lrs, sx, sy, qx, qy, self.inner_steps, self.first_order,
                                         every_step=False)

        losses, metric = vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        update_running_statistics(self.net.backbone, self.training, batch.support_x, batch.query_x)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metric after 0..eval_inner_steps steps with the learned rates (`accuracy@k`), and after all."""
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        lrs = {k: v.detach() for k, v in self.inner_lrs.items()}

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self._adapt_and_score(params, lrs, sx, sy, qx, qy, self.eval_inner_steps, True, every_step=True)

        _, metric = vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        name = self.spec.metric
        out = {f"{name}@{k}": metric[:, k] for k in range(metric.shape[1])}
        out[name] = metric[:, -1]
        return out
