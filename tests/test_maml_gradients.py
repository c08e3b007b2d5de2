"""Batched MAML (per-task products or vmap) must give the same meta-gradient as the per-task autograd loop,
in float64; its batched pieces must equal their per-task definitions."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.base import task_loss, task_losses
from metarun.algorithms.maml import MAML
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.sine import SineBenchmark
from metarun.episodes import TaskBatch
from metarun.models.mlp import MLP
from tests.maml_reference import assert_close_gradients, batched_meta_gradient, naive_maml_meta_gradient


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner_steps", [1, 3])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_batched_maml_matches_per_task_loop(first_order: bool, inner_steps: int, adapt: str) -> None:
    torch.manual_seed(0)
    bench = SineBenchmark(shots=5, queries=7)
    maml = MAML(MLP([1], hidden=[16, 16]), bench.spec, inner_steps=inner_steps, inner_lr=0.05,
                first_order=first_order, adapt=adapt).double()
    batch = bench.sample("train", 6, torch.Generator().manual_seed(1)).to("cpu", torch.float64)
    assert_close_gradients(batched_meta_gradient(maml, batch), naive_maml_meta_gradient(maml, batch, first_order))


def test_second_order_differs_from_first_order() -> None:
    """Guards the reference itself: if both orders agreed, the test above could not tell them apart."""
    torch.manual_seed(0)
    bench = SineBenchmark(shots=5, queries=5)
    batch = bench.sample("train", 4, torch.Generator().manual_seed(2)).to("cpu", torch.float64)
    maml = MAML(MLP([1], hidden=[8]), bench.spec, inner_steps=2, inner_lr=0.1).double()
    second = batched_meta_gradient(maml, batch)
    maml.first_order = True
    first = batched_meta_gradient(maml, batch)
    assert any((second[k] - first[k]).abs().max() > 1e-6 for k in second)


def test_image_mlp_takes_the_per_task_path_with_the_same_meta_gradient() -> None:
    """MLP.forward_per_task flattens images after the task dimension; checked against the loop."""
    torch.manual_seed(0)
    spec = TaskSpec(name="toy", kind="classification", input_shape=(1, 4, 4), output_size=3, ways=3, shots=2,
                    queries=2)
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(3).repeat_interleave(2).expand(4, -1)
    batch = TaskBatch(torch.randn(4, 6, 1, 4, 4, generator=generator, dtype=torch.float64), labels,
                      torch.randn(4, 6, 1, 4, 4, generator=generator, dtype=torch.float64), labels)
    maml = MAML(MLP(spec.input_shape, hidden=[8]), spec, inner_steps=2, inner_lr=0.3).double()
    assert_close_gradients(batched_meta_gradient(maml, batch), naive_maml_meta_gradient(maml, batch, False))


def test_forward_per_task_equals_vmapped_functional_call() -> None:
    torch.manual_seed(0)
    mlp = MLP([3], hidden=[5, 4]).double()
    params = {k: v.unsqueeze(0) + 0.1 * torch.randn(6, *v.shape, dtype=torch.float64)
              for k, v in mlp.named_parameters()}
    x = torch.randn(6, 7, 3, dtype=torch.float64)
    want = torch.func.vmap(lambda p, xt: torch.func.functional_call(mlp, p, (xt,)))(params, x)
    torch.testing.assert_close(mlp.forward_per_task(params, x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_batched_task_losses_equal_vmapped_task_loss(kind: str) -> None:
    spec = TaskSpec(name="toy", kind=kind, input_shape=(2,), output_size=4 if kind == "classification" else 2,
                    ways=4, shots=1, queries=1)
    outputs = torch.randn(5, 9, spec.output_size, dtype=torch.float64)
    targets = torch.randint(0, 4, (5, 9)) if kind == "classification" else torch.randn(5, 9, 2, dtype=torch.float64)
    got = task_losses(spec, outputs, targets)
    want = torch.func.vmap(lambda o, t: task_loss(spec, o, t))(outputs, targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_evaluation_adapts_each_task_like_the_per_task_loop() -> None:
    """evaluate() runs detached first-order steps for all tasks at once: the same MSE after each step as
    adapting one task at a time with torch.autograd.grad."""
    torch.manual_seed(0)
    bench = SineBenchmark(shots=5, queries=7)
    maml = MAML(MLP([1], hidden=[16]), bench.spec, inner_steps=1, inner_lr=0.05, eval_inner_steps=3).double()
    batch = bench.sample("test", 4, torch.Generator().manual_seed(4)).to("cpu", torch.float64)
    got = maml.evaluate(batch)
    names, params = zip(*maml.net.named_parameters())
    for t in range(batch.num_tasks):
        fast = [p.detach().requires_grad_() for p in params]
        for step in range(4):
            out = torch.func.functional_call(maml.net, dict(zip(names, fast)), (batch.query_x[t],))
            mse = float((out - batch.query_y[t]).square().mean().detach())
            assert abs(float(got[f"mse@{step}"][t]) - mse) < 1e-10 * max(1.0, mse)
            support = torch.func.functional_call(maml.net, dict(zip(names, fast)), (batch.support_x[t],))
            grads = torch.autograd.grad((support - batch.support_y[t]).square().mean(), fast)
            fast = [(p - 0.05 * g).detach().requires_grad_() for p, g in zip(fast, grads)]
    assert torch.equal(got["mse"], got["mse@3"])
