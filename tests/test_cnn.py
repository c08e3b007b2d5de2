"""model=cnn (Conv-4): batched MAML through the convolutions and the hand-written BatchNorm must match
the per-task autograd loop in float64; native BatchNorm's known second-order bug under grad-inside-vmap is
pinned, and shown not to reach metarun's formulation; shapes; inductive running statistics.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import Tensor, nn

from metarun.algorithms.maml import MAML
from metarun.benchmarks.base import TaskSpec
from metarun.config import config_dir, validate
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.base import Backbone
from metarun.models.cnn import ConvNet
from metarun.run import build
from tests.maml_reference import assert_close_gradients, batched_meta_gradient, naive_maml_meta_gradient


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# 16x16 is the smallest image four 2x2 max-pools accept; strided, it goes 8, 4, 2, 1.
TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 16, 16), output_size=3, ways=3, shots=2, queries=2)


def toy_batch(num_tasks: int, seed: int, spec: TaskSpec = TOY) -> TaskBatch:
    """Random float64 images with balanced labels 0..ways-1 (the real loaders are tested elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    support, query = spec.ways * spec.shots, spec.ways * spec.queries

    def images(n: int) -> Tensor:
        return torch.randn(num_tasks, n, *spec.input_shape, generator=g, dtype=torch.float64)

    def labels(n: int) -> Tensor:
        return torch.stack([torch.randperm(n, generator=g) % spec.ways for _ in range(num_tasks)])

    return TaskBatch(images(support), labels(support), images(query), labels(query))


def small_maml(backbone: nn.Module, spec: TaskSpec = TOY, **algo: object) -> MAML:
    return MAML(backbone, spec, inner_lr=0.1, **algo).double()  # type: ignore[arg-type]


# -- the meta-gradient against the per-task reference -----------------------------------------------

VARIANTS = [("transductive", 1), ("inductive", 1), ("transductive", 2), ("inductive", 2), ("none", 1)]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize(("bn", "stride"), VARIANTS, ids=[f"{bn}-stride{s}" for bn, s in VARIANTS])
def test_batched_maml_matches_per_task_loop(bn: str, stride: int, inner_steps: int, first_order: bool) -> None:
    torch.manual_seed(0)
    maml = small_maml(ConvNet(TOY.input_shape, filters=4, stride=stride, bn=bn),  # type: ignore[arg-type]
                      inner_steps=inner_steps, first_order=first_order)
    batch = toy_batch(3, seed=1)
    assert_close_gradients(batched_meta_gradient(maml, batch), naive_maml_meta_gradient(maml, batch, first_order))


def test_anil_with_cnn_matches_per_task_loop() -> None:
    torch.manual_seed(0)
    maml = small_maml(ConvNet(TOY.input_shape, filters=4), inner_steps=2, adapt="head")
    batch = toy_batch(3, seed=2)
    assert_close_gradients(batched_meta_gradient(maml, batch), naive_maml_meta_gradient(maml, batch, False))


# -- why BatchNorm is hand-written -----------------------------------------------------------------


class NativeBatchNormNet(nn.Module, Backbone):
    """One [conv, nn.BatchNorm2d, ReLU, max-pool] block: the layer ConvNet deliberately does not use."""

    def __init__(self, track_running_stats: bool) -> None:
        super().__init__()
        c, h, w = TOY.input_shape
        self.layers = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(4, track_running_stats=track_running_stats),
                                    nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(start_dim=-3))
        self.out_features = 4 * (h // 2) * (w // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


def grad_inside_vmap_meta_gradient(maml: MAML, batch: TaskBatch) -> dict[str, Tensor]:
    """The textbook torch.func formulation: vmap over tasks of a function taking torch.func.grad of the
    support loss (one inner step), then the query loss; metarun's MAML used it before measuring it slower."""
    params = dict(maml.net.named_parameters())

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(maml.net, p, (x,)), y)

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        grads = torch.func.grad(loss)(params, sx, sy)
        return loss({k: p - maml.inner_lr * grads[k] for k, p in params.items()}, qx, qy)

    meta_loss = torch.func.vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y).mean()
    return dict(zip(params, torch.autograd.grad(meta_loss, list(params.values()))))


def test_native_batchnorm_second_order_is_wrong_under_grad_inside_vmap() -> None:
    """pytorch/functorch#534, still so on torch 2.13: batching the native kernel's double backward inside
    torch.func.grad gives a 3e-3 relative error in float64. If this starts failing, torch has fixed it."""
    torch.manual_seed(0)
    batch = toy_batch(3, seed=1)
    second = small_maml(NativeBatchNormNet(track_running_stats=False), inner_steps=1)
    want = naive_maml_meta_gradient(second, batch, False)
    assert _relative_error(grad_inside_vmap_meta_gradient(second, batch), want) > 1e-4


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_metarun_maml_is_exact_even_with_native_batchnorm(inner_steps: int) -> None:
    """metarun vmaps only the forward passes and takes both gradients with plain autograd, which never
    batches a double backward: native BatchNorm (batch statistics) then gives the reference meta-gradient.
    ConvNet keeps its own layer for running statistics, which a vmapped forward cannot write."""
    torch.manual_seed(0)
    batch = toy_batch(3, seed=1)
    maml = small_maml(NativeBatchNormNet(track_running_stats=False), inner_steps=inner_steps)
    for first_order in (False, True):
        maml.first_order = first_order
        want = naive_maml_meta_gradient(maml, batch, first_order)
        assert _relative_error(batched_meta_gradient(maml, batch), want) < 1e-10


def test_native_batchnorm_running_stats_cannot_update_under_vmap() -> None:
    """The in-place running-statistics update of nn.BatchNorm2d fails inside MAML's vmapped forward."""
    torch.manual_seed(0)
    maml = small_maml(NativeBatchNormNet(track_running_stats=True))
    with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated in place"):
        maml.meta_loss(toy_batch(2, seed=1))


# -- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("input_shape", "filters", "stride", "out_features"), [
    ((1, 28, 28), 64, 1, 64 * 1 * 1),   # Omniglot, Vinyals et al.: 28 -> 14 -> 7 -> 3 -> 1
    ((1, 28, 28), 64, 2, 64 * 2 * 2),   # Omniglot, MAML: 28 -> 14 -> 7 -> 4 -> 2
    ((3, 84, 84), 32, 1, 32 * 5 * 5),   # miniImageNet, MAML: 84 -> 42 -> 21 -> 10 -> 5
    ((3, 84, 84), 64, 2, 64 * 6 * 6),   # 84 -> 42 -> 21 -> 11 -> 6
])
def test_output_shape(input_shape: tuple[int, int, int], filters: int, stride: int, out_features: int) -> None:
    model = ConvNet(input_shape, filters=filters, stride=stride)
    assert model.out_features == out_features
    assert model(torch.randn(2, *input_shape)).shape == (2, out_features)
    # with a task dimension, as MAML calls it
    assert torch.func.vmap(model)(torch.randn(3, 2, *input_shape)).shape == (3, 2, out_features)


def test_max_pool_needs_16_pixels_and_bad_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="at least 16x16"):
        ConvNet((1, 8, 8))
    assert ConvNet((1, 8, 8), stride=2).out_features == 64
    for bad in ({"bn": "batch"}, {"stride": 3}, {"filters": 0}, {"bn_momentum": 0.0}):
        with pytest.raises(ValueError, match="model."):
            ConvNet((1, 28, 28), **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image inputs"):
        ConvNet((5,))


def test_vector_benchmark_is_a_one_line_user_error() -> None:
    """`metarun train model=cnn` on sine must stop at start-up naming the conflict."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=["model=cnn", "benchmark=sine"]))
    with pytest.raises(UserInputError, match="model=cnn needs image inputs and benchmark=sine has vector"):
        build(cfg, {"algo": "maml", "model": "cnn", "benchmark": "sine"})


# -- BatchNorm modes -------------------------------------------------------------------------------


def _native_set_moments(model: ConvNet, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (mean, unbiased var) that nn.BatchNorm2d's own training-mode update records for one set."""
    moments = []
    for block in model.blocks:
        h = block.conv(x)
        mean, var = torch.zeros(h.shape[1], dtype=h.dtype), torch.ones(h.shape[1], dtype=h.dtype)
        h = F.batch_norm(h, mean, var, block.norm.weight, block.norm.bias, training=True, momentum=1.0)
        moments.append((mean, var))
        x = block.finish(h)
    return moments


def test_inductive_running_stats_follow_training() -> None:
    """The algorithm's meta-loss leaves the running statistics alone; the trainer's once-per-step hook
    moves them by `momentum` towards the mean over tasks of what native BatchNorm would record for each
    task's support and query images taken as one batch."""
    torch.manual_seed(0)
    maml = small_maml(ConvNet(TOY.input_shape, filters=4, bn="inductive", bn_momentum=0.25))
    batch = toy_batch(3, seed=3)
    before = {k: v.clone() for k, v in maml.named_buffers()}
    assert len(before) == 8  # mean and variance of four layers
    with torch.no_grad():
        sets = [_native_set_moments(maml.net.backbone, torch.cat((s, q))) for s, q in zip(batch.support_x,
                                                                                         batch.query_x)]
    maml.train()
    maml.meta_loss(batch)
    assert all(torch.equal(v, dict(maml.named_buffers())[k]) for k, v in before.items())
    maml.backbone.update_running_stats(batch.support_x, batch.query_x)
    for i, block in enumerate(maml.net.backbone.blocks):
        for j, name in enumerate(("running_mean", "running_var")):
            observed = torch.stack([s[i][j] for s in sets]).mean(dim=0)
            want = 0.75 * before[f"net.backbone.blocks.{i}.norm.{name}"] + 0.25 * observed
            torch.testing.assert_close(getattr(block.norm, name), want, rtol=1e-12, atol=1e-12)
    # evaluation never moves them, and transductive mode has none
    maml.eval()
    moved = {k: v.clone() for k, v in maml.named_buffers()}
    maml.evaluate(batch)
    assert all(torch.equal(v, dict(maml.named_buffers())[k]) for k, v in moved.items())
    assert not list(ConvNet(TOY.input_shape, bn="transductive").buffers())


def test_inductive_eval_uses_running_stats_and_transductive_does_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, *TOY.input_shape, dtype=torch.float64)
    inductive = ConvNet(TOY.input_shape, filters=4, bn="inductive").double()
    transductive = ConvNet(TOY.input_shape, filters=4, bn="transductive").double()
    transductive.load_state_dict(inductive.state_dict(), strict=False)
    for block in inductive.blocks:
        block.norm.running_mean.uniform_(-0.5, 0.5)
        block.norm.running_var.uniform_(0.5, 2.0)
    inductive.eval()
    transductive.eval()
    # inductive at test time: each example on its own, as native BatchNorm in eval mode computes it
    want = x
    for block in inductive.blocks:
        n = block.norm
        want = block.finish(F.batch_norm(block.conv(want), n.running_mean, n.running_var, n.weight, n.bias,
                                         training=False, eps=n.eps))
    torch.testing.assert_close(inductive(x), want.flatten(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inductive(x[:2]), inductive(x)[:2], rtol=1e-12, atol=1e-12)
    # transductive at test time: the batch's own statistics, so an example's features depend on its batch
    assert not torch.allclose(transductive(x[:2]), transductive(x)[:2])
    inductive.train()
    torch.testing.assert_close(inductive(x), transductive(x), rtol=1e-12, atol=1e-12)


def test_maml_call_under_vmap_reads_running_stats_in_eval_mode() -> None:
    """MAML passes the buffers through functional_call under vmap: in eval mode an inductive network
    scores each query example on its own, whatever else is in the task's batch."""
    torch.manual_seed(0)
    maml = small_maml(ConvNet(TOY.input_shape, filters=4, bn="inductive"))
    batch = toy_batch(4, seed=4)
    maml.train()
    maml.meta_loss(batch)  # running statistics away from their initial 0 and 1
    params = dict(maml.net.named_parameters())

    def logits(x: Tensor) -> Tensor:
        return torch.func.vmap(lambda task_x: maml._call(maml.net, params, task_x))(x)

    with torch.no_grad():
        maml.eval()
        alone = torch.stack([maml.net(x[:1])[0] for x in batch.query_x])
        torch.testing.assert_close(logits(batch.query_x)[:, 0], alone, rtol=1e-12, atol=1e-12)
        maml.train()
        assert not torch.allclose(logits(batch.query_x)[:, 0], alone)
