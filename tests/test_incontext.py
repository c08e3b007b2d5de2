"""The in-context learner's structural promises: queries never see each other, the support set is a set,
labels are permuted in training only; and it learns, on sine through the CLI and on a tiny image task."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metarun.algorithms.heatmap import group_breaks, heatmap
from metarun.algorithms.incontext import InContextLearner
from metarun.benchmarks.base import TaskSpec
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.cnn import ConvNet
from metarun.models.mlp import MLP
from metarun.models.transformer import Transformer
from tests.conftest import read_results, run_metarun
from tests.test_pictures import hide_matplotlib, needs_matplotlib

SINE = TaskSpec(name="sine", kind="regression", input_shape=(1,), output_size=1, ways=1, shots=5, queries=4)
IMAGES = TaskSpec(name="toy", kind="classification", input_shape=(1, 16, 16), output_size=3, ways=3, shots=2,
                  queries=3)


def sine_batch(tasks: int = 3, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 9, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = (torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 4 + 1) * torch.sin(x)
    return TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


def image_batch(tasks: int = 4, seed: int = 0) -> TaskBatch:
    """Each class is a bright square at its own place plus noise; labels shuffled per task."""
    g = torch.Generator().manual_seed(seed)
    ways, shots, queries = IMAGES.ways, IMAGES.shots, IMAGES.queries
    patterns = torch.zeros(tasks, ways, 1, 16, 16, dtype=torch.float64)
    for c in range(ways):
        patterns[:, c, :, 5 * c: 5 * c + 5, 5 * c: 5 * c + 5] = 1.0
    classes = torch.rand(tasks, ways, generator=g).argsort(dim=1)  # which pattern each label names
    support_y = torch.stack([torch.arange(ways).repeat_interleave(shots)[torch.randperm(ways * shots, generator=g)]
                             for _ in range(tasks)])
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)

    def draw(labels: torch.Tensor) -> torch.Tensor:
        picked = patterns[torch.arange(tasks)[:, None], classes.gather(1, labels)]
        return picked + 0.3 * torch.rand(picked.shape, generator=g, dtype=torch.float64)

    return TaskBatch(draw(support_y), support_y, draw(query_y), query_y)


def make(spec: TaskSpec, seed: int = 0, backbone: str = "mlp", **kwargs: object) -> InContextLearner:
    torch.manual_seed(seed)
    net = {"mlp": lambda: MLP(spec.input_shape, hidden=[16, 16]),
           "transformer": lambda: Transformer(spec.input_shape, width=16, depth=1, heads=2),
           "cnn": lambda: ConvNet(spec.input_shape, filters=8)}[backbone]()
    return InContextLearner(net, spec, width=16, depth=2, heads=2, **kwargs).double()  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Two threads on a shared 2-core machine make the Conv-4 test 50x slower; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


Sampler = Callable[[], TaskBatch]
CASES = [(SINE, sine_batch, "mlp"), (SINE, sine_batch, "transformer"), (IMAGES, image_batch, "mlp")]


@pytest.mark.parametrize(("spec", "sample", "backbone"), CASES)
def test_queries_do_not_see_each_other(spec: TaskSpec, sample: Sampler, backbone: str) -> None:
    net = make(spec, backbone=backbone)
    batch = sample()
    before = net.predict(batch)
    query_x = batch.query_x.clone()
    query_x[:, 0] = query_x[:, 0] * 0.5 + 0.7
    after = net.predict(TaskBatch(batch.support_x, batch.support_y, query_x, batch.query_y))
    assert not torch.allclose(after[:, 0], before[:, 0])
    torch.testing.assert_close(after[:, 1:], before[:, 1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("spec", "sample", "backbone"), CASES)
def test_predictions_ignore_the_order_of_the_support_set(spec: TaskSpec, sample: Sampler, backbone: str) -> None:
    net = make(spec, backbone=backbone)
    batch = sample()
    order = torch.randperm(batch.support_x.shape[1], generator=torch.Generator().manual_seed(3))
    shuffled = TaskBatch(batch.support_x[:, order], batch.support_y[:, order], batch.query_x, batch.query_y)
    torch.testing.assert_close(net.predict(shuffled), net.predict(batch), rtol=1e-10, atol=1e-10)
    # ... but they do depend on the support labels
    other = TaskBatch(batch.support_x, batch.support_y.flip(1), batch.query_x, batch.query_y)
    assert not torch.allclose(net.predict(other), net.predict(batch))


def test_labels_are_permuted_in_training_and_not_in_evaluation() -> None:
    net = make(IMAGES)
    batch = image_batch()
    unpermuted_loss = net.evaluate(batch)["loss"].mean()
    # training: the loss is that of the batch relabelled by the permutation drawn from the algorithm's generator
    state = net.generator.get_state()
    relabelled = net.permuted(batch)
    net.generator.set_state(state)
    torch.manual_seed(5)  # the global RNG plays no part
    train_loss, _ = net.train().meta_loss(batch)
    torch.testing.assert_close(train_loss, net.eval().evaluate(relabelled)["loss"].mean(), rtol=1e-12, atol=0)
    assert not torch.allclose(train_loss, unpermuted_loss)
    for t in range(batch.num_tasks):  # one permutation per task, applied to support and query alike
        perm = torch.full((3,), -1)
        perm[batch.support_y[t]] = relabelled.support_y[t]
        assert sorted(perm.tolist()) == [0, 1, 2]
        torch.testing.assert_close(relabelled.query_y[t], perm[batch.query_y[t]])
    draws = torch.stack([net.permuted(batch).support_y for _ in range(20)])
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1
    # evaluation: no permutation, whatever the RNG state; meta_loss outside training does not permute either
    torch.manual_seed(6)
    first = net.evaluate(batch)
    torch.manual_seed(7)
    torch.testing.assert_close(net.evaluate(batch), first, rtol=0, atol=0)
    torch.testing.assert_close(net.eval().meta_loss(batch)[0], unpermuted_loss, rtol=1e-12, atol=0)
    # permute_labels=false keeps the sampler's labels in training
    torch.manual_seed(5)
    fixed = make(IMAGES, permute_labels=False).train()
    torch.testing.assert_close(fixed.meta_loss(batch)[0], fixed.evaluate(batch)["loss"].mean(), rtol=1e-12, atol=0)


def test_tiny_image_task_end_to_end() -> None:
    """Conv-4 features of 16x16 images: meta_loss reaches every parameter, evaluate gives per-task metrics,
    and a few Adam steps on fresh tasks lower the loss on held-out ones (from above chance level towards
    it: learning to read the support set takes far more steps than a unit test may)."""
    net = make(IMAGES, backbone="cnn").train()
    held_out = image_batch(tasks=8, seed=1)
    before = net.evaluate(held_out)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(20):
        loss, metrics = net.meta_loss(image_batch(tasks=8, seed=100 + step))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert set(metrics) == {"loss", "accuracy"} and torch.isfinite(loss)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        optimizer.step()
    after = net.evaluate(held_out)
    assert set(after) == {"accuracy", "loss"} and after["accuracy"].shape == (8,) and after["loss"].shape == (8,)
    assert float(after["loss"].mean()) < float(before["loss"].mean()) - 0.03


def test_more_ways_than_configured_is_one_line() -> None:
    net = make(IMAGES)
    batch = image_batch()
    wide = TaskBatch(batch.support_x, batch.support_y + 1, batch.query_x, batch.query_y)
    with pytest.raises(UserInputError, match="3-way") as info:
        net.evaluate(wide)
    assert "\n" not in str(info.value)


@needs_matplotlib
@pytest.mark.parametrize(("spec", "sample"), [(SINE, sine_batch), (IMAGES, image_batch)])
def test_visualize_draws_query_to_support_attention(spec: TaskSpec, sample: Sampler) -> None:
    image = make(spec).visualize(sample())["query_support_attention"]
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert image.shape[1:] == (480, 640) and float(image.float().std()) > 0  # the matplotlib figure


@pytest.mark.parametrize(("spec", "sample"), [(SINE, sine_batch), (IMAGES, image_batch)])
def test_visualize_without_matplotlib_paints_the_raster(spec: TaskSpec, sample: Sampler,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    hide_matplotlib(monkeypatch)
    image = make(spec).visualize(sample())["query_support_attention"]
    assert image.dtype == torch.uint8 and float(image.float().std()) > 0
    if spec.kind == "classification":  # 9 queries x 6 support, 2 white class separators each way
        assert image.shape[1:] == (9 * 32 + 2, 6 * 32 + 2)
    else:
        assert image.shape[1:] == (4 * 32, 5 * 32)


def test_heatmap_scales_to_the_maximum_and_draws_separators() -> None:
    image = heatmap(torch.tensor([[0.0, 1.0], [0.5, 0.5]]), row_breaks=[1], cell=2)
    assert image.shape == (3, 5, 4) and image.dtype == torch.uint8
    assert torch.equal(image[:, 2], torch.full((3, 4), 255, dtype=torch.uint8))  # the separator row
    assert image[:, 0, 2:].sum() > image[:, 0, :2].sum()  # viridis: the maximum is the bright end
    assert group_breaks(torch.tensor([0, 0, 1, 2, 2])) == [2, 3]


def test_trains_on_sine_through_the_cli(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_metarun("train", "algo=incontext", "debug=smoke", "logger.console=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    results = read_results(run_dir)
    assert results["algo"] == "incontext" and results["metric"] == "mse" and results["tasks"] == 6
