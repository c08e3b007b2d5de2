"""Batched Meta-SGD against a per-task autograd loop in float64: the meta-gradient of the weights and of
the learned per-weight learning rates (d/d alpha) agree to relative 1e-8."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metarun.algorithms.base import task_loss
from metarun.algorithms.metasgd import MetaSGD, lr_key
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.sine import SineBenchmark
from metarun.episodes import TaskBatch
from metarun.models.mlp import MLP
from tests.maml_reference import assert_close_gradients

TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=3, ways=3, shots=2, queries=2)


def toy_batch(tasks: int = 4, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(2).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64), labels,
                     torch.rand(tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64), labels.clone())


def naive_meta_gradient(algo: MetaSGD, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """The paper's algorithm one task at a time: theta' = theta - alpha * grad (create_graph unless first order)."""
    names = [n for n, _ in algo.net.named_parameters()]
    params = [p for _, p in algo.net.named_parameters()]
    alphas = [algo.inner_lrs[lr_key(n)] for n in names]
    total = 0.0
    for t in range(batch.num_tasks):
        fast = list(params)
        for _ in range(algo.inner_steps):
            loss = task_loss(algo.spec, functional_call(algo.net, dict(zip(names, fast)), (batch.support_x[t],)),
                             batch.support_y[t])[0]
            grads = torch.autograd.grad(loss, fast, create_graph=not algo.first_order)
            fast = [p - a * g for p, a, g in zip(fast, alphas, grads)]
        out = functional_call(algo.net, dict(zip(names, fast)), (batch.query_x[t],))
        total = total + task_loss(algo.spec, out, batch.query_y[t])[0]
    meta_loss = total / batch.num_tasks
    wrt = params + alphas
    keys = names + [f"inner_lrs.{lr_key(n)}" for n in names]
    return dict(zip(keys, torch.autograd.grad(meta_loss, wrt)))


def batched_meta_gradient(algo: MetaSGD, batch: TaskBatch) -> dict[str, torch.Tensor]:
    loss, _ = algo.meta_loss(batch)
    named = {**{n: p for n, p in algo.net.named_parameters()},
             **{f"inner_lrs.{k}": p for k, p in algo.inner_lrs.items()}}
    return dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


def randomise_rates(algo: MetaSGD, seed: int) -> None:
    """Learned rates differ per weight (and may be negative); a constant alpha would hide index mix-ups."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in algo.inner_lrs.values():
            p.copy_(0.1 * torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.02)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_sine_meta_gradient_matches_per_task_loop(first_order: bool, inner_steps: int) -> None:
    torch.manual_seed(0)
    bench = SineBenchmark(shots=5, queries=7)
    algo = MetaSGD(MLP([1], hidden=[16, 16]), bench.spec, inner_steps=inner_steps, first_order=first_order).double()
    randomise_rates(algo, 1)
    batch = bench.sample("train", 5, torch.Generator().manual_seed(1)).to("cpu", torch.float64)
    assert_close_gradients(batched_meta_gradient(algo, batch), naive_meta_gradient(algo, batch))


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_classification_meta_gradient_matches_per_task_loop(inner_steps: int) -> None:
    torch.manual_seed(0)
    algo = MetaSGD(MLP(TOY.input_shape, hidden=[12]), TOY, inner_steps=inner_steps).double()
    randomise_rates(algo, 2)
    batch = toy_batch()
    assert_close_gradients(batched_meta_gradient(algo, batch), naive_meta_gradient(algo, batch))


def test_conv_backbone_meta_gradient_matches_per_task_loop() -> None:
    cnn = pytest.importorskip("metarun.models.cnn")
    torch.manual_seed(0)
    algo = MetaSGD(cnn.ConvNet(TOY.input_shape, filters=3, stride=2), TOY).double()
    randomise_rates(algo, 3)
    batch = toy_batch(tasks=3)
    assert_close_gradients(batched_meta_gradient(algo, batch), naive_meta_gradient(algo, batch))


def test_rates_start_at_inner_lr_with_the_weights_shapes_and_are_trained() -> None:
    algo = MetaSGD(MLP([1], hidden=[8]), SineBenchmark().spec, inner_lr=0.03)
    for name, p in algo.net.named_parameters():
        rate = algo.inner_lrs[lr_key(name)]
        assert rate.shape == p.shape and torch.all(rate == 0.03)
    trained = {id(p) for p in algo.parameters()}
    assert all(id(r) in trained for r in algo.inner_lrs.values())  # the trainer's optimizer sees them


def test_second_order_differs_from_first_order() -> None:
    """Guards the reference: if both orders agreed, the tests above could not tell them apart."""
    torch.manual_seed(0)
    bench = SineBenchmark(shots=5, queries=5)
    batch = bench.sample("train", 4, torch.Generator().manual_seed(2)).to("cpu", torch.float64)
    algo = MetaSGD(MLP([1], hidden=[8]), bench.spec, inner_steps=2, inner_lr=0.1).double()
    second = batched_meta_gradient(algo, batch)
    algo.first_order = True
    first = batched_meta_gradient(algo, batch)
    assert any((second[k] - first[k]).abs().max() > 1e-6 for k in second)


def test_evaluate_reports_each_step() -> None:
    torch.manual_seed(0)
    bench = SineBenchmark(shots=5, queries=5)
    algo = MetaSGD(MLP([1], hidden=[8]), bench.spec, eval_inner_steps=3)
    out = algo.evaluate(bench.sample("test", 6, torch.Generator().manual_seed(0)))
    assert set(out) == {"mse@0", "mse@1", "mse@2", "mse@3", "mse"}
    assert all(v.shape == (6,) for v in out.values())
    assert torch.equal(out["mse"], out["mse@3"])


def test_evaluation_adapts_with_the_learned_rates() -> None:
    """Evaluation steps use the learned rates: set to zero, adaptation leaves the query error unchanged."""
    torch.manual_seed(0)
    bench = SineBenchmark(shots=5, queries=5)
    batch = bench.sample("test", 6, torch.Generator().manual_seed(0))
    algo = MetaSGD(MLP([1], hidden=[8]), bench.spec, inner_lr=0.05, eval_inner_steps=2)
    moved = algo.evaluate(batch)
    assert not torch.allclose(moved["mse@2"], moved["mse@0"])
    with torch.no_grad():
        for rate in algo.inner_lrs.values():
            rate.zero_()
    still = algo.evaluate(batch)
    torch.testing.assert_close(still["mse@2"], still["mse@0"])
