"""MAML: Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017. First-order MAML is the same class with `first_order: true`; ANIL (Raghu
et al., "Rapid Learning or Feature Reuse?", ICLR 2020) is `adapt: head`.

On reinforcement-learning benchmarks with continuous actions (benchmark=navigation2d) the same class is MAML for
RL (the paper's 3.2 and 5.3): the backbone plus head is the mean of a Gaussian policy with a learned
state-independent log std, the inner step is a policy-gradient step on each task's own rollouts, and the outer
step follows the adapted policies' rollouts; the rollout logic is metarun/rl/maml_rl.py.

All tasks of a batch adapt at once: the parameters get a task dimension (expanded views), the
forward passes are torch.func.vmap over a functional_call, and the inner gradients come from
torch.autograd.grad of the summed task losses (see `_adapt_and_score`). The outer backward
differentiates through those inner gradients (second order) unless they are detached (first order).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_loss, task_losses
from metarun.benchmarks.base import Kind, TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import Batch, TaskBatch
from metarun.errors import UserInputError
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
    """Backbone plus a linear head, adapted per task by `inner_steps` SGD steps on the support set (or, on RL
    benchmarks, policy-gradient steps on the task's rollouts)."""

    supports: ClassVar[frozenset[Kind]] = frozenset({"classification", "regression", "reinforcement"})
    continuous_actions: ClassVar[bool] = True
    discrete_actions: ClassVar[bool] = False
    trust_region: ClassVar[bool] = True

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
        rollouts: int = _DEFAULTS["rollouts"],
        gamma: float = _DEFAULTS["gamma"],
        init_std: float = _DEFAULTS["init_std"],
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
        self.rl = None
        if spec.kind == "reinforcement":
            self._init_policy(rollouts, gamma, init_std)

    def _init_policy(self, rollouts: int, gamma: float, init_std: float) -> None:
        """RL benchmarks: the net is the Gaussian policy's mean; its log std a learned vector (Finn et al.:
        initial std 1), registered on the net so the inner step adapts it with the rest."""
        from metarun.rl.maml_rl import RLSettings

        if not self.spec.continuous_actions:
            raise UserInputError("algo=maml on RL acts in continuous action spaces (a Gaussian policy) and this "
                                 "benchmark's actions are discrete; use algo=rl2 there")
        if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts < 1:
            raise UserInputError(f"algo.rollouts must be an integer >= 1 (got {rollouts!r})")
        if not 0 <= gamma <= 1 or not init_std > 0:
            raise UserInputError(f"algo.gamma must be in [0, 1] and algo.init_std > 0 (got {gamma!r}, {init_std!r})")
        self.net.register_parameter(
            "log_std", nn.Parameter(torch.full((self.spec.output_size,), math.log(init_std))))
        adapted = None if self.adapt == "all" else frozenset(
            ["log_std", *(f"head.{k}" for k, _ in self.net.head.named_parameters())])
        self.rl = RLSettings(policy=self._policy, rollouts=rollouts, gamma=gamma, horizon=self.spec.horizon,
                             adapted=adapted)

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
        evaluation: bool = False, outputs: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Adapt every task on its support set for `steps` SGD steps; query (loss, metric) [T], or in
        `evaluation` [T, steps + 1] after each step, without any graph kept between steps. `outputs` (with
        `evaluation`): the adapted network's query outputs [T, Q, ...] instead, as the first element.

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
            if evaluation and not outputs:
                with torch.no_grad():
                    scores.append(self._task_losses(module, fast, qx, qy))
            if step == steps:
                break
            support_loss = self._task_losses(module, fast, sx, sy)[0].sum()
            grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not first_order)
            fast = {k: p - step_size(lr, k) * g for (k, p), g in zip(fast.items(), grads)}
            if evaluation:
                fast = {k: p.detach().requires_grad_() for k, p in fast.items()}
        if outputs:
            with torch.no_grad():
                return self._forward_per_task(module, fast, qx), qy
        if not evaluation:
            return self._task_losses(module, fast, qx, qy)
        losses, metrics = zip(*scores)
        return torch.stack(losses, dim=1), torch.stack(metrics, dim=1)

    def _policy(self, params: Params, observations: Tensor) -> tuple[Tensor, Tensor]:
        """RL: (mean, log_std) [T, ..., A] of task t's Gaussian policy params[k][t] at observations [T, ..., O]."""
        from metarun.rl.policy_gradient import per_task_log_std

        flat = observations.reshape(observations.shape[0], -1, observations.shape[-1])
        mean = self._forward_per_task(self.net, params, flat).view(*observations.shape[:-1], -1)
        return mean, per_task_log_std(params["log_std"], mean)

    # -- the MetaAlgorithm protocol ------------------------------------------------------------------

    def updates(self, batch: Batch) -> Iterator[Batch]:
        """Supervised: the batch. RL: the step's rollouts, collected before and after the inner steps with the
        current parameters (metarun/rl/maml_rl.py), once."""
        if self.rl is None:
            yield batch
            return
        from metarun.rl.maml_rl import collect_adaptation

        yield collect_adaptation(dict(self.net.named_parameters()), batch, self.inner_steps,
                                 self._detached_rate(False), self.rl)

    def trust_region_terms(self, batch: Batch, differentiable: bool = True) -> tuple[Tensor, Tensor]:
        """RL: the adapted policies' surrogate and mean KL from the policies that collected `batch`."""
        if self.rl is None:
            raise UserInputError("trainer/optimizer=trpo needs a policy: MAML takes it on RL benchmarks only")
        from metarun.rl.maml_rl import surrogate_and_kl

        with torch.enable_grad():
            params = dict(self.net.named_parameters())
            if not differentiable:
                params = {k: v.detach() for k, v in params.items()}
            surrogate, kl = surrogate_and_kl(params, batch, self._inner_rate(False),
                                             self.first_order or not differentiable, self.rl)
        if not differentiable:
            return surrogate.detach().mean(), kl.detach().mean()
        return surrogate.mean(), kl.mean()

    def fisher_vector_product(self, batch: Batch, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        """RL: the KL's Hessian by the chain rule through the inner steps (metarun/rl/maml_rl.py)."""
        names = {id(p): k for k, p in self.net.named_parameters()}
        if self.rl is None or isinstance(self._inner_rate(False), dict) or any(id(p) not in names for p in params):
            return None
        from metarun.rl.maml_rl import fisher_vector_product

        shared = {k: v.detach() for k, v in self.net.named_parameters()}
        product = fisher_vector_product(shared, batch, self._inner_rate(False), self.first_order, self.rl)
        order = [names[id(p)] for p in params]

        def flat(v: Tensor) -> Tensor:
            given = dict(zip(order, (x.view_as(p) for x, p in zip(v.split([p.numel() for p in params]), params))))
            out = product({k: given.get(k, torch.zeros_like(p)) for k, p in shared.items()})
            return torch.cat([out[k].reshape(-1) for k in order])

        return flat

    def meta_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.rl is not None:
            from metarun.rl.maml_rl import surrogate_and_kl, training_metrics

            surrogate, kl = surrogate_and_kl(dict(self.net.named_parameters()), batch, self._inner_rate(False),
                                             self.first_order, self.rl)
            return surrogate.mean(), training_metrics(surrogate, kl, batch)
        params = dict(self.net.named_parameters())
        losses, metric = self._adapt_and_score(params, batch, self.inner_steps, self._inner_rate(False),
                                               self.first_order)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    def _detached_rate(self, evaluation: bool = True) -> Rate:
        rate = self._inner_rate(evaluation)
        return {k: v.detach() for k, v in rate.items()} if isinstance(rate, dict) else rate

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metric after 0..eval_inner_steps steps (keys `mse@k`), and after all of them (`mse`).

        Adaptation is first-order and no graph outlives a step: the inner gradients are taken w.r.t.
        detached copies, so evaluation costs a forward and a backward per step whatever the training order.
        """
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        if self.rl is not None:
            from metarun.rl.maml_rl import evaluate_adaptation

            return evaluate_adaptation(params, batch, self.eval_inner_steps, self._detached_rate(), self.rl)
        with torch.enable_grad():
            _, metric = self._adapt_and_score(params, batch, self.eval_inner_steps, self._detached_rate(),
                                              first_order=True, evaluation=True)
        name = self.spec.metric
        out = {f"{name}@{k}": metric[:, k] for k in range(metric.shape[1])}
        out[name] = metric[:, -1]
        return out

    def query_scores(self, batch: TaskBatch) -> Tensor:
        """The query logits after eval_inner_steps steps, adapted exactly as `evaluate` adapts."""
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        with torch.enable_grad():
            logits, _ = self._adapt_and_score(params, batch, self.eval_inner_steps, self._detached_rate(),
                                              first_order=True, evaluation=True, outputs=True)
        return logits

    def _path_picture(self, batch: Batch) -> dict[str, Tensor]:
        from metarun.plotting import path_plot
        from metarun.rl.maml_rl import adaptation_paths

        goals = batch.params.get("goals") if self.spec.input_shape == (2,) else None
        if goals is None:
            return {}
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        paths = adaptation_paths(params, batch.slice(0, 1), self.eval_inner_steps, self._detached_rate(), self.rl)
        shades = [(90, 90, 230), (150, 210, 150), (80, 180, 80), (20, 120, 20)]
        drawn = {("before adaptation" if k == 0 else f"after {k} step{'s' if k > 1 else ''}"):
                 (path[0, 0].double().cpu().numpy(), shades[min(k, len(shades) - 1)]) for k, path in enumerate(paths)}
        goal = goals[0].double().cpu().numpy()
        return {"val/trajectories": path_plot(drawn, goal, f"validation task 0: goal ({goal[0]:.2f}, {goal[1]:.2f})")}

    @torch.no_grad()
    def visualize(self, batch: TaskBatch) -> dict[str, Tensor]:
        """For 1-D regression (sine): the model's curve before and after adaptation on the first task,
        against its support and query points; titled with the sine's amplitude and phase when the points
        determine them. RL benchmarks with 2-D observations (navigation2d): the paths of the first task's first
        rollout before and after each evaluation step, with its goal (Finn et al. 2017, Fig. 4). Other benchmarks:
        nothing to draw."""
        if self.rl is not None:
            return self._path_picture(batch)
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
