"""MMAML (Vuorio et al. 2019): FiLM by hand on a tiny network, the batched meta-gradient against a naive per-task
loop in float64 (encoder, modulation and task network; both orders; the Multi-MAML oracle), the evaluation's
per-step and per-mode metrics, the PCA picture, other backbones, and a tiny `metarun.run.train` in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from torch import Tensor

from metarun.algorithms.mmaml import MMAML, modulate, pca_2d
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.multimodal import FAMILIES, ModalTaskBatch, MultimodalBenchmark
from metarun.config import config_dir
from metarun.episodes import TaskBatch
from metarun.models.cnn import ConvNet
from metarun.models.mlp import MLP
from metarun.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**options: object) -> tuple[MMAML, ModalTaskBatch]:
    torch.manual_seed(0)
    bench = MultimodalBenchmark(shots=4, queries=3)
    model = MMAML(MLP([1], hidden=[6, 5]), bench.spec, embedding_dim=8, encoder_heads=2, **options).double()
    batch = bench.sample("train", 5, torch.Generator().manual_seed(1)).to("cpu", torch.float64)
    return model, batch


def test_film_by_hand_on_a_one_layer_network() -> None:
    """y = head(relu((W x + b) * scale + shift)), numbers worked out by hand."""
    spec = TaskSpec(name="toy", kind="regression", input_shape=(1,), output_size=1, ways=1, shots=2, queries=1)
    model = MMAML(MLP([1], hidden=[2]), spec, embedding_dim=4, encoder_heads=2).double()
    params = {"backbone.layers.0.weight": torch.tensor([[[1.0], [-1.0]]]),
              "backbone.layers.0.bias": torch.tensor([[0.0, 0.5]]),
              "head.weight": torch.tensor([[[1.0, 2.0]]]), "head.bias": torch.tensor([[0.25]])}
    params = {k: v.double() for k, v in params.items()}
    film = [(torch.tensor([[2.0, 3.0]]).double(), torch.tensor([[0.1, -1.0]]).double())]
    x = torch.tensor([[[1.0], [-2.0]]]).double()
    # x = 1: pre-activations (1, -0.5) -> FiLM (2.1, -2.5) -> relu (2.1, 0) -> 2.1 + 0.25
    # x = -2: (-2, 2.5) -> (-3.9, 6.5) -> (0, 6.5) -> 13 + 0.25
    got = model.task_outputs(params, x, film)
    torch.testing.assert_close(got, torch.tensor([[[2.35], [13.25]]]).double())
    # no modulation: (1, 0) -> 1 + 0.25; (0, 2.5) -> 5 + 0.25
    torch.testing.assert_close(model.task_outputs(params, x, None), torch.tensor([[[1.25], [5.25]]]).double())
    # the modulation network's output (g, b) becomes scale 1 + g and shift b
    layer = model.modulation[0]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([1.0, 2.0, 0.1, -1.0]))
    ((scale, shift),) = model.film(torch.zeros(1, 4, dtype=torch.float64))
    torch.testing.assert_close(scale, torch.tensor([[2.0, 3.0]]).double())
    torch.testing.assert_close(shift, torch.tensor([[0.1, -1.0]]).double())
    model.modulation_kind = "sigmoid"
    ((scale, shift),) = model.film(torch.zeros(1, 4, dtype=torch.float64))
    assert shift is None and torch.allclose(scale, torch.sigmoid(torch.tensor([[1.0, 2.0]])).double())


def naive_meta_gradient(model: MMAML, batch: ModalTaskBatch, first_order: bool) -> dict[str, Tensor]:
    """One task at a time: encode its support set alone, FiLM written out, MAML's inner loop with autograd.grad."""
    names = [n for n, p in model.net.named_parameters()]
    shared = dict(model.net.named_parameters())
    linears = [i for i, layer in enumerate(model.backbone.layers) if isinstance(layer, torch.nn.Linear)]
    total = 0.0
    for t in range(batch.num_tasks):
        one = batch.slice(t, t + 1)
        if model.oracle:
            fast = {n: model.mode_params[n.replace(".", "-")][int(batch.mode[t])] for n in names}
            film = None
        else:
            pairs = torch.cat([one.support_x, one.support_y], dim=-1)
            film = [(s[0], None if b is None else b[0]) for s, b in model.film(model.encoder(pairs))]

        def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
            h = x
            for layer_number, i in enumerate(linears):
                h = F.linear(h, p[f"backbone.layers.{i}.weight"], p[f"backbone.layers.{i}.bias"])
                if film is not None:
                    scale, shift = film[layer_number]
                    h = h * scale + (0.0 if shift is None else shift)
                h = torch.relu(h)
            return F.linear(h, p["head.weight"], p["head.bias"])

        if not model.oracle:
            fast = dict(shared)
        for _ in range(model.inner_steps):
            loss = (forward(fast, batch.support_x[t]) - batch.support_y[t]).square().mean()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            if model.inner_grad_clip is not None:
                grads = [g.clamp(-model.inner_grad_clip, model.inner_grad_clip) for g in grads]
            fast = {n: p - model.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
        total = total + (forward(fast, batch.query_x[t]) - batch.query_y[t]).square().mean()
    learned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(learned, torch.autograd.grad(total / batch.num_tasks, list(learned.values()))))


def batched_meta_gradient(model: MMAML, batch: ModalTaskBatch) -> dict[str, Tensor]:
    loss, _ = model.meta_loss(batch)
    learned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(learned, torch.autograd.grad(loss, list(learned.values()))))


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = 1e-8) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("encoder,modulation,clip,steps", [
    ("attention", "film", None, 2), ("lstm", "film", 10.0, 1), ("gru", "sigmoid", None, 2),
    ("attention", "softmax", 0.05, 2),  # a clip small enough to bite
])
def test_batched_meta_gradient_matches_the_per_task_loop(first_order: bool, encoder: str, modulation: str,
                                                         clip: float | None, steps: int) -> None:
    model, batch = tiny(encoder=encoder, modulation=modulation, inner_grad_clip=clip, inner_steps=steps,
                        inner_lr=0.05, first_order=first_order)
    got, want = batched_meta_gradient(model, batch), naive_meta_gradient(model, batch, first_order)
    assert any(n.startswith("encoder.") for n in got) and any(n.startswith("modulation.") for n in got)
    assert all(float(g.abs().max()) > 0 for n, g in got.items() if n.startswith(("encoder.", "modulation.")))
    assert_close(got, want)


def test_oracle_meta_gradient_matches_the_per_task_loop_and_reaches_only_the_tasks_modes() -> None:
    model, batch = tiny(oracle=True, inner_steps=2, inner_lr=0.05)
    got = batched_meta_gradient(model, batch)
    assert set(got) == {n for n, _ in model.named_parameters() if n.startswith("mode_params.")}
    assert_close(got, naive_meta_gradient(model, batch, first_order=False))
    present = set(batch.mode.tolist())
    for index in range(len(FAMILIES)):
        touched = any(float(g[index].abs().max()) > 0 for g in got.values())
        assert touched == (index in present), FAMILIES[index]


def test_second_order_differs_from_first_order() -> None:
    """Guards the reference: if both orders agreed, the comparison above could not tell them apart."""
    model, batch = tiny(inner_steps=2, inner_lr=0.1)
    second = batched_meta_gradient(model, batch)
    model.first_order = True
    first = batched_meta_gradient(model, batch)
    assert any(float((second[k] - first[k]).abs().max()) > 1e-6 for k in second)


def test_evaluation_reports_each_step_and_each_mode() -> None:
    model, batch = tiny(inner_steps=3, eval_inner_steps=3, inner_lr=0.05)
    scores = model.evaluate(batch)
    assert {f"mse@{k}" for k in range(4)} | {"mse"} <= set(scores)
    # the values do not depend on the order of the meta-gradient: after all steps, the meta-loss's tasks
    loss, _ = model.meta_loss(batch)
    torch.testing.assert_close(scores["mse@3"].mean(), loss.detach())
    torch.testing.assert_close(scores["mse"], scores["mse@3"])
    for index in set(batch.mode.tolist()):
        torch.testing.assert_close(scores[f"mse/{FAMILIES[index]}"], scores["mse"][batch.mode == index])
    # mse@0 is the modulated network before adaptation ("post modulation" in the paper's Table 1)
    film = model.film(model.task_embedding(batch))
    params = model.initial_params(batch)
    before = (model.task_outputs(params, batch.query_x, film) - batch.query_y).square().mean(dim=(1, 2))
    torch.testing.assert_close(scores["mse@0"], before.detach())


def test_picture_projects_the_evaluated_tasks_and_colours_them_by_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = tiny()
    model.float()
    bench = MultimodalBenchmark(modes=["sinusoid", "linear"])
    model.evaluate(bench.sample("val", 30, torch.Generator().manual_seed(0)))
    pictures = model.visualize(bench.sample("val", 1, torch.Generator().manual_seed(1)))
    (image,) = pictures.values()
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert model._embeddings == []  # drawn once, then forgotten
    assert MMAML(MLP([1], hidden=[4]), bench.spec, oracle=True).visualize(batch.to("cpu", torch.float32)) == {}
    monkeypatch.setattr("metarun.plotting.render", lambda *args, **kwargs: None)  # no matplotlib: Pillow's dots
    fallback = model.visualize(bench.sample("val", 8, torch.Generator().manual_seed(2)))["task_embeddings"]
    assert fallback.dtype == torch.uint8 and fallback.shape == (3, 240, 360) and int(fallback.min()) < 255


def test_pca_keeps_the_geometry_of_rank_two_embeddings() -> None:
    generator = torch.Generator().manual_seed(0)
    coords = torch.randn(50, 2, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(7, 2, generator=generator, dtype=torch.float64))[0]
    projected = pca_2d(coords @ basis.T + 3.0)
    torch.testing.assert_close(torch.cdist(projected, projected), torch.cdist(coords, coords))
    assert float(projected[:, 0].var()) >= float(projected[:, 1].var())


def test_modulate_applies_one_scale_and_shift_per_task() -> None:
    h = torch.ones(2, 3, 4)
    scale, shift = torch.arange(8.0).view(2, 4), torch.full((2, 4), 0.5)
    out = modulate(h, scale, shift)
    assert torch.equal(out[1, 2], scale[1] + 0.5) and torch.equal(modulate(h, scale, None)[0, 0], scale[0])


def test_film_by_hand_on_every_conv4_block() -> None:
    """Conv-4's forward with a modulation: block i's BatchNorm output h -> h * scale_i + shift_i before the ReLU;
    none is the plain network. A zero scale at the last block leaves relu(shift) in every position."""
    torch.manual_seed(0)
    net = ConvNet((1, 16, 16), filters=3).double()
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    ones = [(torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)) for _ in range(4)]
    torch.testing.assert_close(net(x, ones), net(x), rtol=0, atol=0)
    shift = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    last = [*ones[:3], (torch.zeros(3, dtype=torch.float64), shift)]
    want = torch.relu(shift).repeat_interleave(net.out_features // 3).expand(4, -1)
    torch.testing.assert_close(net(x, last), want)
    first = [(torch.full((3,), 2.0, dtype=torch.float64), None), *ones[1:]]
    block = net.blocks[0]
    h = block.finish(2.0 * block.norm(block.conv(x)))
    for b in net.blocks[1:]:
        h = b(h)
    torch.testing.assert_close(net(x, first), h.flatten(start_dim=1))


def test_conv4_is_modulated_per_block_for_classification() -> None:
    """Conv-4: FiLM after every block; the encoder reads pixels and one-hot labels."""
    torch.manual_seed(0)
    spec = TaskSpec(name="toy", kind="classification", input_shape=(1, 16, 16), output_size=3, ways=3, shots=1,
                    queries=2)
    model = MMAML(ConvNet(spec.input_shape, filters=4), spec, inner_steps=1, inner_lr=0.1, embedding_dim=8,
                  encoder_heads=2)
    assert model.widths == [4, 4, 4, 4] and len(model.modulation) == 4
    labels = torch.arange(3).expand(2, -1)
    batch = TaskBatch(torch.rand(2, 3, 1, 16, 16), labels, torch.rand(2, 6, 1, 16, 16), labels.repeat(1, 2))
    loss, metrics = model.meta_loss(batch)
    loss.backward()
    assert "accuracy" in metrics and model.encoder.pairs[0].weight.grad.abs().max() > 0
    assert all(layer.weight.grad.abs().max() > 0 for layer in model.modulation)  # every block's FiLM is learned
    assert set(model.evaluate(batch)) >= {"accuracy", "accuracy@0", "accuracy@1"}


def test_constructor_refuses_bad_options_in_one_line() -> None:
    spec = MultimodalBenchmark().spec
    for options, words in (({"encoder": "cnn"}, "algo.encoder"), ({"modulation": "gate"}, "algo.modulation"),
                           ({"embedding_dim": 10, "encoder_heads": 4}, "must divide"),
                           ({"encoder": "lstm", "embedding_dim": 9}, "must be even"),
                           ({"inner_grad_clip": 0.0}, "inner_grad_clip")):
        with pytest.raises(ValueError, match=words):
            MMAML(MLP([1], hidden=[4]), spec, **options)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """As tests/test_golden.py: a fresh working directory (the run directory) and no Hydra runtime."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    with torch.random.fork_rng(devices=[]):
        yield tmp_path
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("extra", [[], ["algo.oracle=true"], ["algo.encoder=lstm", "algo.first_order=true"]])
def test_tiny_training_run_in_process_reports_per_mode_metrics(extra: list[str], isolated: Path) -> None:
    overrides = ["algo=mmaml", "benchmark=multimodal", "benchmark.modes=[sinusoid,linear,tanh]", "model=mlp",
                 "model.hidden=[16,16]", "algo.embedding_dim=8", "algo.encoder_heads=2", "debug=smoke",
                 "trainer.eval_tasks=12", "device=cpu", "threads=1", "logger.console=false", *extra]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    returned = train(cfg)
    results = json.loads((isolated / "results.json").read_text())
    assert results["metric"] == "mse" and results["tasks"] == 12 and results["nonfinite_tasks"] == 0
    assert returned == pytest.approx(results["val_best"])
    per_mode = {k: v for k, v in results["metrics"].items() if "/" in k}
    assert set(per_mode) == {"mse/sinusoid", "mse/linear", "mse/tanh"}
    assert sum(v["tasks"] for v in per_mode.values()) == 12
    mean = sum(v["mean"] * v["tasks"] for v in per_mode.values()) / 12
    assert mean == pytest.approx(results["mean"])
    scores = json.loads((isolated / "scores.json").read_text())["scores"]
    assert len(scores["mse"]) == 12 and len(scores["mse/tanh"]) == per_mode["mse/tanh"]["tasks"]
    if not extra:  # the embedding picture went to TensorBoard with the validation
        assert list((isolated / "tb").glob("events.*"))


def test_conv4_batched_meta_gradient_matches_the_per_task_loop() -> None:
    """Per-block FiLM under the batched inner loop (second order) against one task at a time, float64."""
    from torch.func import functional_call

    torch.manual_seed(0)
    spec = TaskSpec(name="toy", kind="classification", input_shape=(1, 16, 16), output_size=3, ways=3, shots=2,
                    queries=2)
    model = MMAML(ConvNet(spec.input_shape, filters=3), spec, inner_steps=2, inner_lr=0.1, embedding_dim=8,
                  encoder_heads=2).double()
    labels = torch.arange(3).repeat_interleave(2).expand(3, -1)
    batch = TaskBatch(torch.rand(3, 6, 1, 16, 16, dtype=torch.float64), labels,
                      torch.rand(3, 6, 1, 16, 16, dtype=torch.float64), labels)
    got = batched_meta_gradient(model, batch)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(batch.num_tasks):
        film = [(s[0], b[0]) for s, b in model.film(model.task_embedding(batch.slice(t, t + 1)))]

        def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
            body = {k.removeprefix("backbone."): v for k, v in p.items() if k.startswith("backbone.")}
            h = functional_call(model.backbone, body, (x,), {"modulation": film})
            return F.linear(h, p["head.weight"], p["head.bias"])

        fast = dict(model.net.named_parameters())
        for _ in range(model.inner_steps):
            loss = F.cross_entropy(forward(fast, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            grads = [g.clamp(-model.inner_grad_clip, model.inner_grad_clip) for g in grads]
            fast = {n: p - model.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(forward(fast, batch.query_x[t]), batch.query_y[t])
    learned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = dict(zip(learned, torch.autograd.grad(total / batch.num_tasks, list(learned.values()))))
    for name in learned:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10, msg=name)
