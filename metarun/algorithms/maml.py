"""MAML: Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017. First-order MAML is the same class with `first_order: true`; ANIL (Raghu
et al., "Rapid Learning or Feature Reuse?", ICLR 2020) is `adapt: head`.

All tasks of a batch adapt at once: the parameters get a task dimension (expanded views), the
forward passes are torch.func.vmap over a functional_call, and the inner gradients come from
torch.autograd.grad of the summed task losses (see `_adapt_and_score`). The outer backward
differentiates through those inner gradients (second order) unless they are detached (first order).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_loss, task_losses
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.models import per_task
from metarun.models.base import Backbone
from metarun.vmap import over_tasks

Params = dict[str, Tensor]
Rate = float | Params  # one inner step size, or one per parameter (Meta-SGD)


def submodule_params(params: Params, prefix: str) -> Params:
    """The entries of `params` under `prefix` ("backbone.", "head."), keyed as the submodule names them."""
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def step_size(rate: Rate, name: str) -> float | Tensor:
    """Parameter `name`'s inner step size."""
    return rate[name] if isinstance(rate, dict) else rate


_DEFAULTS = option_defaults("algo", "maml")


class MAML(nn.Module, MetaAlgorithm):
    """Backbone plus a linear head, adapted per task by `inner_steps` SGD steps on the support set."""

    def __init__(
        self,
        backbone: Backbone,
        spec: TaskSpec,
        inner_steps: int = _DEFAULTS["inner_steps"],
        inner_lr: float = _DEFAULTS["inner_lr"],
        eval_inner_steps: int = _DEFAULTS["eval_inner_steps"],
        eval_inner_lr: float | None = _DEFAULTS["eval_inner_lr"],
        first_order: bool = _DEFAULTS["first_order"],
        adapt: Literal["all", "head"] = _DEFAULTS["adapt"],
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

    @property
    def backbone(self) -> Backbone:
        return self.net.backbone

    def _inner_rate(self, evaluation: bool) -> Rate:
        """The inner step size: one number here; Meta-SGD (a subclass) returns a learned tensor per parameter."""
        return self.eval_inner_lr if evaluation else self.inner_lr

    # -- the batched computation (leading task dimension T everywhere) ------------------------------

    def _call(self, module: nn.Module, params: Params, x: Tensor) -> Tensor:
        """functional_call with the module's own buffers, so normalisation layers see their state."""
        return functional_call(module, (params, dict(module.named_buffers())), (x,))

    def _forward_per_task(self, module: nn.Module, params: Params, x: Tensor) -> Tensor:
        """`module` (the net, or ANIL's head) on x[t] with task t's parameters params[k][t], for every t: the
        backbone's `forward_per_task` (batched matrix products for the MLP, else vmap), then the head's bmm."""
        if module is self.net.head:
            return per_task.linear(x, params["weight"], params["bias"])
        features = self.backbone.forward_per_task(submodule_params(params, "backbone."), x)
        return per_task.linear(features, params["head.weight"], params["head.bias"])

    def _task_losses(self, module: nn.Module, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-task (loss [T], metric [T]) of `module` with task t's parameters params[k][t] on x[t], y[t]."""
        return task_losses(self.spec, self._forward_per_task(module, params, x), y)

    def _adapt_and_score(
        self, params: Params, batch: TaskBatch, steps: int, lr: Rate, first_order: bool,
        evaluation: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Adapt every task on its support set for `steps` SGD steps; query (loss, metric) [T], or in
        `evaluation` [T, steps + 1] after each step, without any graph kept between steps.

        The shared parameters are expanded to one copy per task ([T, ...] views, no memory) and only the
        forward passes are batched (vmap, or `forward_per_task`); both backward passes are ordinary autograd
        over the batched graph. As the tasks are independent, the gradient of the summed support losses
        w.r.t. task t's copy is task t's inner gradient, and create_graph keeps it differentiable for the
        second-order meta-gradient. Against torch.func.grad inside vmap it computes the same meta-gradient to
        float64 rounding, faster (scripts/bench.py, sine: 411 vs 265 meta-iterations/s).
        """
        module: nn.Module = self.net
        sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
        if self.adapt == "head":
            # ANIL: the body is not adapted, so its features are computed once per task.
            body = submodule_params(params, "backbone.")
            features = over_tasks(lambda x: self._call(self.net.backbone, body, x))
            sx, qx = features(sx), features(qx)
            module = self.net.head
            params = submodule_params(params, "head.")
            lr = submodule_params(lr, "head.") if isinstance(lr, dict) else lr
        tasks = sx.shape[0]
        fast = {k: p.expand(tasks, *p.shape) for k, p in params.items()}
        if evaluation:  # leaves of their own: each step's graph is freed by autograd.grad
            fast = {k: p.detach().requires_grad_() for k, p in fast.items()}
        scores = []
        for step in range(steps + 1):
            if evaluation:
                with torch.no_grad():
                    scores.append(self._task_losses(module, fast, qx, qy))
            if step == steps:
                break
            support_loss = self._task_losses(module, fast, sx, sy)[0].sum()
            grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not first_order)
            fast = {k: p - step_size(lr, k) * g for (k, p), g in zip(fast.items(), grads)}
            if evaluation:
                fast = {k: p.detach().requires_grad_() for k, p in fast.items()}
        if not evaluation:
            return self._task_losses(module, fast, qx, qy)
        losses, metrics = zip(*scores)
        return torch.stack(losses, dim=1), torch.stack(metrics, dim=1)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        params = dict(self.net.named_parameters())
        losses, metric = self._adapt_and_score(params, batch, self.inner_steps, self._inner_rate(False),
                                               self.first_order)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    def _detached_rate(self) -> Rate:
        rate = self._inner_rate(True)
        return {k: v.detach() for k, v in rate.items()} if isinstance(rate, dict) else rate

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metric after 0..eval_inner_steps steps (keys `mse@k`), and after all of them (`mse`).

        Adaptation is first-order and no graph outlives a step: the inner gradients are taken w.r.t.
        detached copies, so evaluation costs a forward and a backward per step whatever the training order.
        """
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        with torch.enable_grad():
            _, metric = self._adapt_and_score(params, batch, self.eval_inner_steps, self._detached_rate(),
                                              first_order=True, evaluation=True)
        name = self.spec.metric
        out = {f"{name}@{k}": metric[:, k] for k in range(metric.shape[1])}
        out[name] = metric[:, -1]
        return out

    @torch.no_grad()
    def visualize(self, batch: TaskBatch) -> dict[str, Tensor]:
        """For 1-D regression (sine): the model's curve before and after adaptation on the first task,
        against its support and query points; titled with the sine's amplitude and phase when the points
        determine them. Other benchmarks: nothing to draw."""
        if self.spec.kind != "regression" or self.spec.input_shape != (1,):
            return {}
        from metarun.plotting import curve_plot, sine_fit

        params = {k: v.detach() for k, v in self.net.named_parameters()}
        sx, sy, qx, qy = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
        grid = torch.linspace(-5.0, 5.0, 200, dtype=sx.dtype, device=sx.device).unsqueeze(-1)
        curves = {"before adaptation": (self._call(self.net, params, grid), (90, 90, 230))}
        fast, rate = params, self._detached_rate()
        for step in range(1, self.eval_inner_steps + 1):
            grads = grad(lambda p: task_loss(self.spec, self._call(self.net, p, sx), sy)[0])(fast)
            fast = {k: p - step_size(rate, k) * grads[k] for k, p in fast.items()}
            if step in (1, self.eval_inner_steps):
                shade = (40, 170, 40) if step == self.eval_inner_steps else (150, 210, 150)
                curves[f"after {step} step{'s' if step > 1 else ''}"] = (self._call(self.net, fast, grid), shade)

        def flat(t: Tensor) -> Any:  # [N, 1] -> [N] float64 numpy array
            return t.detach().squeeze(-1).cpu().double().numpy()

        numpy_curves = {k: (flat(v), c) for k, (v, c) in curves.items()}
        points = {"query (true)": (flat(qx), flat(qy), (0, 0, 0)),
                  f"support (K={len(sx)})": (flat(sx), flat(sy), (220, 40, 40))}
        truth = sine_fit(flat(torch.cat([sx, qx])), flat(torch.cat([sy, qy])))
        title = "validation task 0" + (f": y = {truth[0]:.2f} sin(x - {truth[1]:.2f})" if truth else "")
        return {"val/adaptation": curve_plot(flat(grid), numpy_curves, points, title, truth)}
