"""Prototypical Networks against prototypes and distances computed by hand, one task and one class at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.protonet import ProtoNet
from metarun.benchmarks.base import TaskSpec
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.mlp import MLP

TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=3, ways=3, shots=2, queries=2)


def toy_batch(tasks: int = 4, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0,
              shuffle_support: bool = False) -> TaskBatch:
    """Random 1x8x8 images with class-major labels, as the samplers lay them out (or shuffled)."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    if shuffle_support:
        support_y = torch.stack([row[torch.randperm(len(row), generator=g)] for row in support_y])
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64), support_y,
                     torch.rand(tasks, ways * queries, 1, 8, 8, generator=g, dtype=torch.float64), query_y)


def naive_logits(net: ProtoNet, batch: TaskBatch) -> torch.Tensor:
    """Per task, per class: prototype = mean of that class's support embeddings; per query, per prototype: distance."""
    out = []
    for t in range(batch.num_tasks):
        support, query = net.backbone(batch.support_x[t]), net.backbone(batch.query_x[t])
        ways = int(batch.support_y[t].max()) + 1
        prototypes = [support[batch.support_y[t] == c].mean(dim=0) for c in range(ways)]
        rows = []
        for q in query:
            if net.distance == "euclidean":
                rows.append(torch.stack([-((q - c) ** 2).sum() for c in prototypes]))
            else:
                cosines = [torch.dot(q, c) / (q.norm() * c.norm()) for c in prototypes]
                rows.append(torch.stack(cosines) / net.temperature)
        out.append(torch.stack(rows))
    return torch.stack(out)


def make(seed: int = 0, **kwargs: object) -> ProtoNet:
    torch.manual_seed(seed)
    return ProtoNet(MLP(TOY.input_shape, hidden=[16, 8]), TOY, **kwargs).double()  # type: ignore[arg-type]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("shuffle_support", [False, True])
def test_logits_match_hand_computed_distances(distance: str, shuffle_support: bool) -> None:
    net = make(distance=distance)
    batch = toy_batch(shuffle_support=shuffle_support)
    torch.testing.assert_close(net.logits(batch), naive_logits(net, batch), rtol=1e-10, atol=1e-10)


def test_loss_accuracy_and_gradient_match_the_reference() -> None:
    net = make()
    batch = toy_batch(tasks=3)
    want = naive_logits(net, batch)
    want_loss = torch.stack([F.cross_entropy(want[t], batch.query_y[t]) for t in range(3)]).mean()
    loss, metrics = net.meta_loss(batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    params = list(net.parameters())
    got_grads = torch.autograd.grad(loss, params)
    want_grads = torch.autograd.grad(want_loss, params)
    for got, ref in zip(got_grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    accuracy = (want.argmax(-1) == batch.query_y).double().mean(dim=1)
    evaluated = net.evaluate(batch)
    torch.testing.assert_close(evaluated["accuracy"], accuracy)
    assert set(evaluated) == {"accuracy"} and evaluated["accuracy"].shape == (3,)
    torch.testing.assert_close(metrics["accuracy"], accuracy.mean())


def test_queries_on_their_prototype_are_classified_correctly() -> None:
    """Identity backbone, 1-shot: a query equal to its class's support example sits on its prototype."""

    class Identity(torch.nn.Module):
        out_features = 64

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(start_dim=-3)

    batch = toy_batch(tasks=2, shots=1, queries=1)
    net = ProtoNet(Identity(), TOY)
    accuracy = net.evaluate(TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y))["accuracy"]
    assert torch.equal(accuracy, torch.ones(2, dtype=accuracy.dtype))


def test_train_ways_asks_for_wider_episodes_and_trains_on_them() -> None:
    net = make(train_ways=5, train_queries=4)
    assert make().train_episode() == {}
    assert make(train_ways=5).train_episode() == {"ways": 5}
    assert net.train_episode() == {"ways": 5, "queries": 4}
    wide = toy_batch(ways=5, queries=4)  # a training episode wider than the benchmark's 3-way test episodes
    loss, _ = net.meta_loss(wide)
    torch.testing.assert_close(loss, torch.stack([F.cross_entropy(l, y) for l, y in
                                                  zip(naive_logits(net, wide), wide.query_y)]).mean())
    net.eval()
    assert net.logits(toy_batch(ways=3)).shape == (4, 6, 3)  # evaluation stays benchmark-shaped


def test_train_episode_not_honoured_is_an_error_not_a_silent_fallback() -> None:
    net = make(train_ways=5, train_queries=2)
    with pytest.raises(UserInputError, match=r"^algo.train_ways=5, algo.train_queries=2 but the training episodes "
                                             r"have 6 support and 6 query examples per task: .*"
                                             r"set algo.train_ways=null and algo.train_queries=null$"):
        net.meta_loss(toy_batch(ways=3))
    net.eval()  # evaluation episodes are benchmark-shaped: no complaint
    net.meta_loss(toy_batch(ways=3))


@pytest.mark.parametrize("kwargs, message", [
    ({"distance": "manhattan"}, "algo.distance must be"),
    ({"temperature": 0.0}, "algo.temperature must be positive"),
    ({"train_ways": 1}, "algo.train_ways must be at least 2"),
    ({"train_queries": 0}, "algo.train_queries must be positive"),
])
def test_bad_settings_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_conv_backbone_embeds_each_task_with_its_own_batch_statistics() -> None:
    """With transductive BatchNorm a task's logits must not depend on the other tasks of the batch."""
    cnn = pytest.importorskip("metarun.models.cnn")
    torch.manual_seed(0)
    net = ProtoNet(cnn.ConvNet(TOY.input_shape, filters=4, stride=2), TOY).double()
    batch = toy_batch(tasks=3)
    together = net.logits(batch)
    alone = torch.cat([net.logits(batch.slice(t, t + 1)) for t in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)
