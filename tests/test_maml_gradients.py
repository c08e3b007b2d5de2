"""Batched (vmap) MAML must give the same meta-gradient as the per-task autograd loop, in float64."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.maml import MAML
from metarun.benchmarks.sine import SineBenchmark
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
