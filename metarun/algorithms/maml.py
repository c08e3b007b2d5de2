"""MAML: Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017. First-order MAML is the same class with `first_order: true`; ANIL (Raghu
et al., "Rapid Learning or Feature Reuse?", ICLR 2020) is `adapt: head`.

All tasks of a batch adapt at once: torch.func.vmap over a per-task function whose inner loop
takes torch.func.grad of a functional_call. The outer backward differentiates through those
inner gradients (second order) unless they are detached (first order).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metarun.algorithms.base import batch_metrics, task_loss, update_running_statistics
from metarun.benchmarks.base import TaskSpec
from metarun.episodes import TaskBatch

Params = dict[str, Tensor]


class MAML(nn.Module):
    """Backbone plus a linear head, adapted per task by `inner_steps` SGD steps on the support set."""

    supports = frozenset({"classification", "regression"})

    def __init__(
        self,
        backbone: nn.Module,
        spec: TaskSpec,
        inner_steps: int = 1,
        inner_lr: float = 0.01,
        eval_inner_steps: int = 10,
        eval_inner_lr: float | None = None,
        first_order: bool = False,
        adapt: Literal["all", "head"] = "all",
    ) -> None:
        super().__init__()
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ValueError("algo.inner_steps and algo.eval_inner_steps must be >= 0")
        if adapt not in ("all", "head"):
            raise ValueError(f"algo.adapt must be 'all' or 'head' (got {adapt!r})")
        self.spec = spec
        self.net = nn.Sequential(
            OrderedDict(backbone=backbone, head=nn.Linear(backbone.out_features, spec.output_size))
        )
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
        self.first_order = first_order
        self.adapt = adapt

    # -- the per-task computation (no task dimension; vmapped over tasks) ---------------------------

    def _call(self, module: nn.Module, params: Params, x: Tensor) -> Tensor:
        """functional_call with the module's own buffers, so normalisation layers see their state."""
        return functional_call(module, (params, dict(module.named_buffers())), (x,))

    def _adapt_and_score(
        self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
        steps: int, lr: float, first_order: bool, every_step: bool,
    ) -> tuple[Tensor, Tensor]:
        """Adapt on (sx, sy) for `steps` SGD steps; return query (loss, metric), per step if `every_step`."""
        module: nn.Module = self.net
        fast = params
        if self.adapt == "head":
            # ANIL: the body is not adapted, so its features are computed once per task.
            body = {k[len("backbone."):]: v for k, v in params.items() if k.startswith("backbone.")}
            sx, qx = self._call(self.net.backbone, body, sx), self._call(self.net.backbone, body, qx)
            module = self.net.head
            fast = {k[len("head."):]: v for k, v in params.items() if k.startswith("head.")}

        def support_loss(p: Params) -> Tensor:
            return task_loss(self.spec, self._call(module, p, sx), sy)[0]

        def score(p: Params) -> tuple[Tensor, Tensor]:
            return task_loss(self.spec, self._call(module, p, qx), qy)

        scores = [score(fast)] if every_step else []
        for _ in range(steps):
            grads = grad(support_loss)(fast)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast = {k: p - lr * grads[k] for k, p in fast.items()}
            if every_step:
                scores.append(score(fast))
        if not every_step:
            return score(fast)
        losses, metrics = zip(*scores)
        return torch.stack(losses), torch.stack(metrics)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        params = dict(self.net.named_parameters())

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self._adapt_and_score(params, sx, sy, qx, qy, self.inner_steps, self.inner_lr,
                                         self.first_order, every_step=False)

        losses, metric = vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        update_running_statistics(self.net.backbone, self.training, batch.support_x)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metric after 0..eval_inner_steps steps (keys `mse@k`), and after all of them (`mse`).

        torch.func.grad still computes inner gradients under no_grad, but no outer graph is kept,
        so evaluation is first-order in cost whatever the training order.
        """
        params = {k: v.detach() for k, v in self.net.named_parameters()}

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self._adapt_and_score(params, sx, sy, qx, qy, self.eval_inner_steps, self.eval_inner_lr,
                                         True, every_step=True)

        _, metric = vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        name = self.spec.metric
        out = {f"{name}@{k}": metric[:, k] for k in range(metric.shape[1])}
        out[name] = metric[:, -1]
        return out

    @torch.no_grad()
    def visualize(self, batch: TaskBatch) -> dict[str, Tensor]:
        """For 1-D regression (sine): the model's curve before and after adaptation on the first task,
        against its support and query points. Other benchmarks: nothing to draw."""
        if self.spec.kind != "regression" or self.spec.input_shape != (1,):
            return {}
        from metarun.plotting import curve_plot

        params = {k: v.detach() for k, v in self.net.named_parameters()}
        sx, sy, qx, qy = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
        grid = torch.linspace(-5.0, 5.0, 200, dtype=sx.dtype, device=sx.device).unsqueeze(-1)
        curves = {"before adaptation": (self._call(self.net, params, grid), (90, 90, 230))}
        fast = params
        for step in range(1, self.eval_inner_steps + 1):
            grads = grad(lambda p: task_loss(self.spec, self._call(self.net, p, sx), sy)[0])(fast)
            fast = {k: p - self.eval_inner_lr * grads[k] for k, p in fast.items()}
            if step in (1, self.eval_inner_steps):
                shade = (40, 170, 40) if step == self.eval_inner_steps else (150, 210, 150)
                curves[f"after {step} step{'s' if step > 1 else ''}"] = (self._call(self.net, fast, grid), shade)
        numpy_curves = {k: (v.squeeze(-1).cpu().numpy(), c) for k, (v, c) in curves.items()}
        points = {"query (true)": (qx.squeeze(-1).cpu().numpy(), qy.squeeze(-1).cpu().numpy(), (0, 0, 0)),
                  "support": (sx.squeeze(-1).cpu().numpy(), sy.squeeze(-1).cpu().numpy(), (220, 40, 40))}
        return {"val/adaptation": curve_plot(grid.squeeze(-1).cpu().numpy(), numpy_curves, points)}
