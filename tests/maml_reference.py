"""The naive per-task MAML that paper code uses: a Python loop over tasks with torch.autograd.grad.

It exists only as the reference that the batched (vmap) implementation must match.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from metarun.algorithms.base import task_loss
from metarun.episodes import TaskBatch


def naive_maml_meta_gradient(maml, batch: TaskBatch, first_order: bool) -> dict[str, Tensor]:
    """Meta-gradient of the mean query loss, adapting each task in turn with torch.autograd.grad."""
    names = [n for n, _ in maml.net.named_parameters()]
    params = [p for _, p in maml.net.named_parameters()]
    buffers = dict(maml.net.named_buffers())
    adapt_head = getattr(maml, "adapt", "all") == "head"
    total = 0.0
    for t in range(batch.num_tasks):
        fast = list(params)
        for _ in range(maml.inner_steps):
            out = functional_call(maml.net, ({**dict(zip(names, fast)), **buffers},), (batch.support_x[t],))
            loss = task_loss(maml.spec, out, batch.support_y[t])[0]
            wrt = [i for i, n in enumerate(names) if not adapt_head or n.startswith("head.")]
            grads = torch.autograd.grad(loss, [fast[i] for i in wrt], create_graph=not first_order)
            for i, g in zip(wrt, grads):
                fast[i] = fast[i] - maml.inner_lr * g
        out = functional_call(maml.net, ({**dict(zip(names, fast)), **buffers},), (batch.query_x[t],))
        total = total + task_loss(maml.spec, out, batch.query_y[t])[0]
    meta_loss = total / batch.num_tasks
    return dict(zip(names, torch.autograd.grad(meta_loss, params)))


def batched_meta_gradient(maml, batch: TaskBatch) -> dict[str, Tensor]:
    """Meta-gradient through metarun's vmapped meta_loss."""
    loss, _ = maml.meta_loss(batch)
    params = dict(maml.net.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def assert_close_gradients(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = 1e-8) -> None:
    """Every parameter's meta-gradient agrees to relative `rtol` (of the gradient's norm)."""
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)
        assert err < rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"
