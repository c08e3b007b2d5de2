"""FEAT against hand computations: the set function's symmetry, logits with the attention switched off,
the contrastive regulariser against the paper's per-class loop, backbone initialisation from a checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.feat import FEAT
from metarun.algorithms.pretrained import load_backbone
from metarun.algorithms.protonet import ProtoNet
from metarun.benchmarks.base import TaskSpec
from metarun.checkpoint import save_checkpoint
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.mlp import MLP
from metarun.run import build_optimizer
from tests.conftest import run_metarun
from tests.test_pictures import hide_matplotlib, needs_matplotlib

TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 6, 6), output_size=3, ways=3, shots=2, queries=2)


def toy_batch(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> TaskBatch:
    """Random 1x6x6 images; support labels shuffled per task (no layout is assumed), queries class-major."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.stack([torch.arange(ways).repeat_interleave(shots)[torch.randperm(ways * shots, generator=g)]
                             for _ in range(tasks)])
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 6, 6, generator=g, dtype=torch.float64), support_y,
                     torch.rand(tasks, ways * queries, 1, 6, 6, generator=g, dtype=torch.float64), query_y)


def make(seed: int = 0, hidden: tuple[int, ...] = (16, 8), **kwargs: object) -> FEAT:
    torch.manual_seed(seed)
    return FEAT(MLP(TOY.input_shape, hidden=hidden), TOY, **kwargs).double().eval()  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Two threads on a shared 2-core machine slow these small ops down many times; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relabel(batch: TaskBatch, perm: torch.Tensor) -> TaskBatch:
    """Class c is called perm[c]."""
    return TaskBatch(batch.support_x, perm[batch.support_y], batch.query_x, perm[batch.query_y])


def test_set_function_is_permutation_equivariant() -> None:
    net = make(heads=2)
    prototypes = torch.randn(4, 5, 8, dtype=torch.float64)
    adapted, weights = net.set_function(prototypes)
    assert adapted.shape == (4, 5, 8) and weights.shape == (4, 2, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 2, 5, dtype=torch.float64))
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted, permuted_weights = net.set_function(prototypes[:, perm])
    torch.testing.assert_close(permuted, adapted[:, perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(permuted_weights, weights[:, :, perm][:, :, :, perm], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(adapted, F.layer_norm(prototypes, (8,)))  # the attention does something


def test_renaming_the_classes_permutes_the_logits() -> None:
    net = make()
    batch = toy_batch()
    perm = torch.tensor([2, 0, 1])
    logits = net.logits(batch)
    assert logits.shape == (3, 6, 3)
    torch.testing.assert_close(net.logits(relabel(batch, perm))[:, :, perm], logits, rtol=1e-10, atol=1e-10)


def test_logits_match_a_hand_computation_with_the_attention_switched_off() -> None:
    """zero_init_output: the set function starts as LayerNorm(prototype); logits are -distance / temperature."""
    net = make(temperature=2.5, zero_init_output=True)
    assert not net.set_function.out.weight.any() and not make().set_function.out.weight.eq(0).all()
    batch = toy_batch(tasks=2)
    want = torch.empty(2, 6, 3, dtype=torch.float64)
    for t in range(2):
        support, query = net.backbone(batch.support_x[t]), net.backbone(batch.query_x[t])
        for c in range(3):
            prototype = support[batch.support_y[t] == c].mean(dim=0)
            standardised = (prototype - prototype.mean()) / torch.sqrt(prototype.var(unbiased=False) + 1e-5)
            for i, q in enumerate(query):
                want[t, i, c] = -((q - standardised) ** 2).sum() / 2.5
    torch.testing.assert_close(net.logits(batch), want, rtol=1e-10, atol=1e-10)
    evaluated = net.evaluate(batch)
    torch.testing.assert_close(evaluated["accuracy"], (want.argmax(-1) == batch.query_y).double().mean(dim=1))
    torch.testing.assert_close(evaluated["loss"], torch.stack([F.cross_entropy(want[t], batch.query_y[t])
                                                               for t in range(2)]))


def naive_regulariser(net: FEAT, batch: TaskBatch) -> torch.Tensor:
    """The paper's form, one task and one class at a time: each class's support+query set through the set
    function alone, centres = means, every instance (before adaptation) scored against the centres."""
    out = []
    for t in range(batch.num_tasks):
        instances = torch.cat([net.backbone(batch.support_x[t]), net.backbone(batch.query_x[t])])
        labels = torch.cat([batch.support_y[t], batch.query_y[t]])
        centres = torch.stack([net.set_function(instances[labels == c])[0].mean(dim=0) for c in range(3)])
        logits = -torch.cdist(instances, centres) ** 2 / net.temperature2
        out.append(F.cross_entropy(logits, labels))
    return torch.stack(out)


def test_regulariser_matches_the_per_class_loop_and_balance_weighs_it() -> None:
    batch = toy_batch()
    plain = make(balance=0.0)
    loss, metrics = plain.meta_loss(batch)
    assert "regulariser" not in metrics
    torch.testing.assert_close(loss, plain.evaluate(batch)["loss"].mean(), rtol=1e-12, atol=0)

    net = make(balance=0.5, temperature2=3.0)
    support, query = net.embed(batch)
    regulariser = net.regulariser(support, query, batch)
    torch.testing.assert_close(regulariser, naive_regulariser(net, batch), rtol=1e-9, atol=1e-10)
    loss_with, metrics_with = net.meta_loss(batch)
    torch.testing.assert_close(loss_with - loss, 0.5 * regulariser.mean(), rtol=1e-9, atol=1e-12)
    assert float(regulariser.detach().mean()) > 0.01
    torch.testing.assert_close(metrics_with["regulariser"], regulariser.mean())
    torch.testing.assert_close(metrics_with["loss"], loss_with.detach())


def test_training_step_reaches_every_parameter_and_dropout_is_active() -> None:
    net = make(balance=0.1).train()
    batch = toy_batch()
    loss, metrics = net.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) == {"loss", "accuracy", "regulariser"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert not torch.equal(net.meta_loss(batch)[0], loss.detach())  # dropout in training
    net.eval()
    torch.testing.assert_close(net.meta_loss(batch)[0], net.meta_loss(batch)[0], rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["backbone.", "net.backbone."])
def test_init_from_copies_the_backbone_of_a_checkpoint(tmp_path: Path, prefix: str) -> None:
    torch.manual_seed(1)
    source = ProtoNet(MLP(TOY.input_shape, hidden=[16, 8]), TOY)
    assert any(k.startswith("backbone.") for k in source.state_dict())  # ProtoNet's module naming
    state = {f"{prefix}{k[len('backbone.'):]}": v for k, v in source.state_dict().items()}
    state["net.head.weight"] = torch.zeros(3, 8)  # other modules of the saved algorithm are ignored
    path = tmp_path / "best.pt"
    save_checkpoint({"model": state, "step": 7}, path)
    net = make(seed=2, init_from=str(path))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[key], value.double())
    assert not torch.allclose(make(seed=2).backbone.layers[1].weight, net.backbone.layers[1].weight)


def test_init_from_refuses_checkpoints_without_a_fitting_backbone(tmp_path: Path) -> None:
    no_backbone = tmp_path / "head.pt"
    save_checkpoint({"model": {"head.weight": torch.zeros(2, 2)}, "step": 0}, no_backbone)
    with pytest.raises(UserInputError, match="no backbone weights") as info:
        make(init_from=str(no_backbone))
    assert "\n" not in str(info.value)
    wider = tmp_path / "wider.pt"
    wider_mlp = MLP(TOY.input_shape, hidden=[32, 8])
    save_checkpoint({"model": {f"backbone.{k}": v for k, v in wider_mlp.state_dict().items()}, "step": 0}, wider)
    with pytest.raises(UserInputError, match="does not fit") as info:
        load_backbone(MLP(TOY.input_shape, hidden=[16, 8]), str(wider))
    assert "\n" not in str(info.value)
    with pytest.raises(UserInputError, match=r"not found.*algo.init_from=null"):
        make(init_from=str(tmp_path / "missing.pt"))


@needs_matplotlib
def test_visualize_draws_the_prototype_attention() -> None:
    image = make().visualize(toy_batch())["prototype_attention"]
    assert image.dtype == torch.uint8 and image.shape == (3, 480, 640)  # the matplotlib figure
    assert float(image.float().std()) > 0


def test_visualize_without_matplotlib_paints_the_raster(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_matplotlib(monkeypatch)
    raster = make().visualize(toy_batch())["prototype_attention"]
    assert raster.dtype == torch.uint8 and raster.dim() == 3 and raster.shape[0] == 3
    assert raster.shape[1] == raster.shape[2] >= 3 * 8  # 3 x 3 prototypes, cells of at least 8 px


def test_set_function_trains_at_its_own_learning_rate_and_the_scheduler_keeps_the_ratio() -> None:
    net = make(set_function_lr_scale=10.0)
    optimizer = build_optimizer(partial(torch.optim.Adam, lr=1e-4), net)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    backbone, set_function = optimizer.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in net.backbone.parameters()}
    assert {id(p) for p in set_function["params"]} == {id(p) for p in net.set_function.parameters()}
    assert backbone["lr"] == pytest.approx(1e-4) and set_function["lr"] == pytest.approx(1e-3)
    optimizer.step()
    scheduler.step()
    assert backbone["lr"] == pytest.approx(5e-5) and set_function["lr"] == pytest.approx(5e-4)
    assert len(list(net.parameters())) == len(backbone["params"]) + len(set_function["params"])


def test_bad_settings_are_one_line_errors() -> None:
    for kwargs in ({"temperature": 0.0}, {"balance": -1.0}, {"heads": 3}, {"dropout": 1.0},
                   {"set_function_lr_scale": 0.0}):
        with pytest.raises(ValueError, match="algo."):
            make(**kwargs)


def test_regression_is_refused_in_one_line() -> None:
    proc = run_metarun("train", "algo=feat", "debug=smoke")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "algo=feat supports only classification" in lines[0] and "algo=incontext" in lines[0]
