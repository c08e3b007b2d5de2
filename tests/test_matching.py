"""Matching Networks against attention computed by hand (one task, one query, one support example at a time),
and the full context embeddings' shape, determinism and independence between tasks."""

from __future__ import annotations

import math

import pytest
import torch

from metarun.algorithms.matching import MatchingNet
from metarun.benchmarks.base import TaskSpec
from metarun.episodes import TaskBatch
from metarun.models.mlp import MLP

TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=3, ways=3, shots=2, queries=2)
FIVE_WAY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=5, ways=5, shots=3, queries=1)


def toy_batch(tasks: int = 4, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> TaskBatch:
    """Random 1x8x8 images with class-major labels, as the samplers lay them out."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64), support_y,
                     torch.rand(tasks, ways * queries, 1, 8, 8, generator=g, dtype=torch.float64), query_y)


@torch.no_grad()
def naive_probabilities(net: MatchingNet, batch: TaskBatch) -> torch.Tensor:
    """Eq. 1-2 literally: a = softmax_i(cos(f(x), g(x_i)) / temperature); y_hat = sum_i a_i onehot(y_i)."""
    out = []
    for t in range(batch.num_tasks):
        support, query = net.backbone(batch.support_x[t]), net.backbone(batch.query_x[t])
        ways = int(batch.support_y[t].max()) + 1
        rows = []
        for q in query:
            cosines = [float(torch.dot(q, s) / (q.norm() * s.norm())) / net.temperature for s in support]
            weights = [math.exp(c) for c in cosines]
            total = sum(weights)
            y_hat = [0.0] * ways
            for w, label in zip(weights, batch.support_y[t].tolist()):
                y_hat[label] += w / total
            rows.append(y_hat)
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


def make(seed: int = 0, spec: TaskSpec = TOY, **kwargs: object) -> MatchingNet:
    torch.manual_seed(seed)
    return MatchingNet(MLP(spec.input_shape, hidden=[16, 8]), spec, **kwargs).double()  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_attention_matches_hand_computation(temperature: float) -> None:
    net = make(temperature=temperature)
    batch = toy_batch()
    want = naive_probabilities(net, batch)
    torch.testing.assert_close(net.log_probs(batch).exp(), want, rtol=1e-10, atol=1e-12)
    loss, metrics = net.meta_loss(batch)
    want_nll = -want.gather(-1, batch.query_y.unsqueeze(-1)).log().mean()
    torch.testing.assert_close(loss, want_nll, rtol=1e-10, atol=0)
    accuracy = (want.argmax(-1) == batch.query_y).double().mean(dim=1)
    torch.testing.assert_close(net.evaluate(batch)["accuracy"], accuracy)
    torch.testing.assert_close(metrics["accuracy"], accuracy.mean())


def test_log_probabilities_are_normalised_and_loss_has_gradients() -> None:
    net = make(spec=FIVE_WAY)
    batch = toy_batch(ways=5, shots=3, queries=1)  # N from the spec (never read back from the labels), any K
    log_probs = net.log_probs(batch)
    assert log_probs.shape == (4, 5, 5)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4, 5, dtype=torch.float64))
    loss, _ = net.meta_loss(batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_fce_shapes_determinism_gradients_and_effect() -> None:
    net = make(fce=True, fce_steps=3)
    batch = toy_batch(tasks=3)
    first, second = net.log_probs(batch), net.log_probs(batch)
    assert first.shape == (3, 6, 3) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    torch.testing.assert_close(first.exp().sum(-1), torch.ones(3, 6, dtype=torch.float64))
    loss, _ = net.meta_loss(batch)
    loss.backward()
    for name in ("support_lstm.weight_ih_l0", "support_lstm.weight_hh_l0_reverse", "query_lstm.weight_ih"):
        assert net.get_parameter(name).grad.abs().sum() > 0, name
    plain = make(fce=False)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k.startswith("backbone.")})
    assert not torch.allclose(plain.log_probs(batch), first)


def test_fce_tasks_do_not_see_each_other() -> None:
    """Tasks are folded into the LSTM batches: each must still read only its own support set."""
    net = make(fce=True, fce_steps=2)
    batch = toy_batch(tasks=3)
    together = net.log_probs(batch)
    alone = torch.cat([net.log_probs(batch.slice(t, t + 1)) for t in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="algo.fce_steps must be a positive integer"):
        make(fce=True, fce_steps=0)
    with pytest.raises(ValueError, match="algo.temperature must be positive"):
        make(temperature=-1.0)
