"""LEO against hand computations and a naive per-task reference in the paper's [N, K] layout (deepmind/leo
model.py, written with explicit loops over pairs), in float64; its Gaussian draws; the frozen pre-trained backbone,
end to end through the CLI; the trainer's element-wise and per-tensor gradient clipping (the paper's outer step)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.leo import LEO
from metarun.algorithms.protonet import ProtoNet
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.models.mlp import MLP
from metarun.trainer import EpisodicTrainer
from tests.image_fixtures import EVALUATION, omniglot_tree, run_metarun
from tests.test_feat import TOY, toy_batch


pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed: int = 0, **kwargs: object) -> LEO:
    torch.manual_seed(seed)
    kwargs.setdefault("num_latents", 6)
    net = LEO(MLP(TOY.input_shape, hidden=[16, 8]), TOY, **kwargs).double().eval()  # type: ignore[arg-type]
    with torch.no_grad():  # a spread of step sizes, so a swapped or broadcast-wrong rate shows
        net.inner_lr.copy_(torch.linspace(0.5, 1.5, net.inner_lr.numel()))
        net.finetuning_lr.copy_(torch.linspace(0.05, 0.2, net.finetuning_lr.numel()))
    return net


def naive_task_loss(net: LEO, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
    """One task as the paper's code lays it out: support sorted into [N, K, D], the relation network over every
    (i, j) pair in a Python loop, codes averaged over K and tiled, predictions the mean over the K weights of each
    class; not meta-training (the means, no dropout), every step differentiable."""
    ways, shots = net.spec.ways, sx.shape[0] // net.spec.ways
    order = torch.argsort(sy, stable=True)
    features = F.normalize(net.backbone(sx[order]), dim=-1)  # [N*K, D], class-major, unit length (the paper's)
    labels = sy[order]
    dim = features.shape[1]
    codes = features @ net.encoder.weight.t()
    relation = torch.stack([torch.stack([net.relation(torch.cat([codes[i], codes[j]])) for j in range(len(codes))])
                            .mean(dim=0) for i in range(len(codes))]).view(ways, shots, -1)
    latents = relation.mean(dim=1, keepdim=True).expand(ways, shots, -1)[..., :net.inner_lr.numel()]

    def decode(z: torch.Tensor) -> torch.Tensor:  # [N, K, L] -> [N, K, D], the means
        return (z @ net.decoder.weight.t())[..., :dim]

    def predict(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # "ijk,lmk->ijlm", mean over m
        return torch.einsum("ik,lmk->ilm", x, w).mean(dim=-1)

    def train_loss(w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predict(features, w), labels, reduction="sum")

    weights = decode(latents)
    loss = train_loss(weights)
    for _ in range(net.inner_steps):
        (g,) = torch.autograd.grad(loss, latents, create_graph=True)
        latents = latents - net.inner_lr * g
        weights = decode(latents)
        loss = train_loss(weights)
    for _ in range(net.finetuning_steps):
        (g,) = torch.autograd.grad(loss, weights, create_graph=True)
        weights = weights - net.finetuning_lr * g
        loss = train_loss(weights)
    return F.cross_entropy(predict(F.normalize(net.backbone(qx), dim=-1), weights), qy)


def naive_loss(net: LEO, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    tasks = [naive_task_loss(net, batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t])
             for t in range(batch.num_tasks)]
    l2 = sum((w ** 2).sum() for w in net.penalised_weights()) / 2
    rows = net.decoder.weight.t()
    correlation = torch.stack([torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for b in rows]) for a in rows])
    orthogonality = ((correlation - torch.eye(len(rows), dtype=rows.dtype)) ** 2).mean()
    return torch.stack(tasks).mean() + net.l2_penalty_weight * l2 + net.orthogonality_penalty_weight * orthogonality


def test_shapes_of_the_codes_the_decoded_weights_and_the_logits() -> None:
    net = make(num_latents=5)
    batch = toy_batch(tasks=4, shots=2, queries=3)
    support, query = net.features(batch)
    assert support.shape == (4, 6, 8) and query.shape == (4, 9, 8)
    torch.testing.assert_close(support.norm(dim=-1), torch.ones(4, 6, dtype=torch.float64))  # the paper's scaling
    raw = make(num_latents=5, normalize_features=False).features(batch)[0]
    torch.testing.assert_close(support, F.normalize(raw, dim=-1))
    params = net.encode(support, batch.support_y)
    assert params.shape == (4, 6, 10)  # mean and raw scale of a 5-d code per support example
    for t in range(4):  # one code per class, shared by its examples
        for c in range(3):
            rows = params[t][batch.support_y[t] == c]
            torch.testing.assert_close(rows, rows[:1].expand_as(rows), rtol=0, atol=0)
    weights = net.decode(params[..., :5])
    assert weights.shape == (4, 6, 8)  # per-example weights over the 8 features
    assert net.logits(query, weights, batch.support_y).shape == (4, 9, 3)


def closed_form_gradient(x: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """d(sum of CE)/d(class weights) [N, D] of logits x @ W^T: sum_i (softmax_i - onehot_i) x_i per class."""
    p = torch.softmax(x @ class_weights.t(), dim=-1)
    return (p - F.one_hot(labels, class_weights.shape[0]).double()).t() @ x


def test_the_latent_step_matches_a_hand_computation() -> None:
    net = make(inner_steps=1, finetuning_steps=0)
    batch = toy_batch(tasks=2, shots=2)
    support, _ = net.features(batch)
    with torch.enable_grad():
        adapted = net.adapt(support, batch.support_y, differentiable=False)
    decoder_mean = net.decoder.weight[: support.shape[-1]].detach()  # [D, L]: z -> the weights' means
    for t in range(2):
        x, y = support[t], batch.support_y[t]
        z0 = adapted.start[t].detach()
        class_weights = torch.stack([(z0[y == c] @ decoder_mean.t()).mean(dim=0) for c in range(3)])
        by_class = closed_form_gradient(x, y, class_weights)  # [N, D]
        # each example's code reaches its class's weights through the decoder, divided by the class's size
        grad_z = torch.stack([decoder_mean.t() @ by_class[y[m]] / (y == y[m]).sum() for m in range(len(y))])
        torch.testing.assert_close(adapted.latents[t].detach(), z0 - net.inner_lr.detach() * grad_z,
                                   rtol=1e-10, atol=1e-12)


def test_the_finetuning_step_matches_a_hand_computation() -> None:
    net = make(inner_steps=0, finetuning_steps=1)
    batch = toy_batch(tasks=2, shots=2)
    support, _ = net.features(batch)
    with torch.enable_grad():
        adapted = net.adapt(support, batch.support_y, differentiable=False)
    w0 = adapted.latent_weights.detach()
    for t in range(2):
        x, y = support[t], batch.support_y[t]
        class_weights = torch.stack([w0[t][y == c].mean(dim=0) for c in range(3)])
        by_class = closed_form_gradient(x, y, class_weights)
        grad_w = torch.stack([by_class[y[m]] / (y == y[m]).sum() for m in range(len(y))])
        torch.testing.assert_close(adapted.weights[t].detach(), w0[t] - net.finetuning_lr.detach() * grad_w,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [(2, 2), (1, 0), (0, 3)])
def test_batched_meta_gradient_matches_the_naive_per_task_reference(steps: tuple[int, int]) -> None:
    """Second order through both inner loops; the support sets are shuffled (toy_batch), the reference sorts."""
    net = make(inner_steps=steps[0], finetuning_steps=steps[1], l2_penalty_weight=0.01,
               orthogonality_penalty_weight=0.3)
    batch = toy_batch(tasks=3, shots=2)
    loss, metrics = net.meta_loss(batch)
    want = naive_loss(net, batch)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    params = [p for p in net.parameters()]
    got_grads = torch.autograd.grad(loss, params, materialize_grads=True)
    want_grads = torch.autograd.grad(want, params, materialize_grads=True)
    for (name, _), got, expected in zip(net.named_parameters(), got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11, msg=name)
    assert float(got_grads[0].abs().sum()) > 0 if steps[0] else True  # inner_lr reached through the latent steps
    assert metrics["kl"] == 0 and metrics["encoder_penalty"] >= 0


def test_first_order_keeps_the_loss_and_drops_the_second_order_terms() -> None:
    batch = toy_batch(tasks=2, shots=2)
    second, first = make(inner_steps=2, finetuning_steps=1), make(inner_steps=2, finetuning_steps=1, first_order=True)
    loss2, loss1 = second.meta_loss(batch)[0], first.meta_loss(batch)[0]
    torch.testing.assert_close(loss1, loss2, rtol=1e-12, atol=0)
    g2 = torch.autograd.grad(loss2, second.encoder.weight)[0]
    g1 = torch.autograd.grad(loss1, first.encoder.weight)[0]
    assert not torch.allclose(g1, g2)


def test_meta_training_samples_and_weighs_the_kl_and_the_encoder_penalty() -> None:
    batch = toy_batch(tasks=2, shots=2)
    results = {}
    for kl_weight, penalty_weight in ((0.0, 0.0), (0.5, 0.0), (0.0, 2.0)):
        net = make(kl_weight=kl_weight, encoder_penalty_weight=penalty_weight, dropout=0.0,
                   generator=torch.Generator().manual_seed(3)).train()
        results[(kl_weight, penalty_weight)] = net.meta_loss(batch)
    base, base_metrics = results[(0.0, 0.0)]
    assert base_metrics["kl"] != 0  # sampled: the KL term is live
    torch.testing.assert_close(results[(0.5, 0.0)][0] - base, 0.5 * base_metrics["kl"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[(0.0, 2.0)][0] - base, 2.0 * base_metrics["encoder_penalty"],
                               rtol=1e-9, atol=1e-12)
    evaluation = make(kl_weight=0.5, encoder_penalty_weight=2.0).meta_loss(batch)[0]  # eval: means, no extra terms
    torch.testing.assert_close(evaluation, make().meta_loss(batch)[0], rtol=1e-12, atol=0)


def test_samples_have_the_papers_scale_and_the_kl_estimates_the_closed_form() -> None:
    net = make(generator=torch.Generator().manual_seed(0)).train()
    mean, scale = 0.7, 0.5
    raw = math.log(scale + 1.0)  # scale = exp(raw) - (1 - offset), offset 0
    params = torch.cat([torch.full((1, 40000, 1), mean), torch.full((1, 40000, 1), raw)], dim=-1).double()
    value, kl = net.sample(params, offset=0.0)
    assert abs(float(value.mean()) - mean) < 0.01 and abs(float(value.std()) - scale) < 0.01
    closed = math.log(1 / scale) + (scale ** 2 + mean ** 2) / 2 - 0.5  # KL(N(0.7, 0.5^2) || N(0, 1))
    assert abs(float(kl[0]) - closed) < 0.02
    offset_value, _ = net.sample(torch.cat([params[..., :1], torch.zeros_like(params[..., :1])], dim=-1), offset=0.3)
    assert abs(float(offset_value.std()) - 0.3) < 0.01  # exp(0) - 1 + offset
    net.eval()
    means, zero = net.sample(params, offset=0.0)
    assert torch.equal(means, params[..., :1]) and float(zero) == 0.0


def test_dropout_draws_from_the_algorithms_generator() -> None:
    batch = toy_batch(tasks=2, shots=2)
    losses = [make(generator=torch.Generator().manual_seed(s)).train().meta_loss(batch)[0] for s in (5, 5, 6)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert not torch.equal(losses[0], losses[2])


def protonet_checkpoint(path: Path) -> ProtoNet:
    torch.manual_seed(4)
    source = ProtoNet(MLP(TOY.input_shape, hidden=[16, 8]), TOY).double()
    save_checkpoint({"model": source.state_dict(), "step": 1}, path)
    return source


def test_init_from_freezes_the_backbone_and_keeps_it_out_of_the_optimizer(tmp_path: Path) -> None:
    source = protonet_checkpoint(tmp_path / "best.pt")
    net = make(init_from=str(tmp_path / "best.pt")).train()
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[key], value)
    assert net.frozen and not net.backbone.training and net.training
    assert all(not p.requires_grad for p in net.backbone.parameters())
    (group,) = net.parameter_groups()
    assert {id(p) for p in group["params"]} == {id(p) for n, p in net.named_parameters() if not n.startswith("backbone.")}
    net.meta_loss(toy_batch(tasks=2, shots=2))[0].backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    joint = make(init_from=str(tmp_path / "best.pt"), freeze_backbone=False).train()
    assert not joint.frozen and joint.backbone.training
    joint.meta_loss(toy_batch(tasks=2, shots=2))[0].backward()
    assert all(p.grad is not None for p in joint.backbone.parameters())
    assert not make().frozen  # no init_from: trained jointly


def test_bad_settings_are_one_line_errors() -> None:
    for kwargs in ({"num_latents": 0}, {"inner_steps": -1}, {"finetuning_steps": -1}, {"dropout": 1.0},
                   {"kl_weight": -1.0}, {"orthogonality_penalty_weight": -0.1}):
        with pytest.raises(ValueError, match="algo.") as info:
            make(**kwargs)
        assert "\n" not in str(info.value)


def test_the_papers_clipping_by_value_then_per_tensor_norm() -> None:
    """trainer.grad_clip_value then trainer.grad_clip with grad_clip_per_tensor (deepmind/leo runner.py's
    _clip_gradients); the logged norm is the one before clipping."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    module = torch.nn.Module()
    module.a, module.b = a, b

    def clipped(**settings: object) -> tuple[float, torch.Tensor, torch.Tensor]:
        a.grad, b.grad = torch.tensor([0.05, -0.5, 0.2]), torch.tensor([3.0, 4.0])
        full = {"grad_clip": None, "grad_clip_value": None, "grad_clip_per_tensor": False, **settings}
        norm = EpisodicTrainer._grad_norm(SimpleNamespace(algorithm=module, s=SimpleNamespace(**full)))  # type: ignore[arg-type]
        return float(norm), a.grad.clone(), b.grad.clone()

    norm, ga, gb = clipped(grad_clip_value=0.1, grad_clip=0.1, grad_clip_per_tensor=True)
    assert norm == pytest.approx(math.sqrt(0.05 ** 2 + 0.5 ** 2 + 0.2 ** 2 + 25.0))
    value_clipped = torch.tensor([0.05, -0.1, 0.1])
    torch.testing.assert_close(ga, value_clipped * min(1.0, 0.1 / float(value_clipped.norm())), rtol=1e-5, atol=0)
    torch.testing.assert_close(gb, torch.tensor([0.1, 0.1]) * (0.1 / math.sqrt(0.02)), rtol=1e-5, atol=0)
    _, ga, gb = clipped(grad_clip=1.0)  # the global norm: both tensors scaled by one factor
    scale = 1.0 / math.sqrt(0.05 ** 2 + 0.5 ** 2 + 0.2 ** 2 + 25.0)
    torch.testing.assert_close(gb, torch.tensor([3.0, 4.0]) * scale, rtol=1e-5, atol=0)
    _, ga, gb = clipped(grad_clip_value=0.3)
    torch.testing.assert_close(ga, torch.tensor([0.05, -0.3, 0.2]))
    torch.testing.assert_close(gb, torch.full((2,), 0.3))


def test_leo_from_a_protonet_run_keeps_its_backbone_and_running_statistics(tmp_path: Path) -> None:
    """End to end as a user runs it: ProtoNet trains a Conv-4 with inductive BatchNorm, LEO starts from its
    best.pt with the backbone frozen; LEO's checkpoint holds exactly ProtoNet's backbone (weights and running
    statistics), and `metarun eval` scores it."""
    root = omniglot_tree(tmp_path / "omniglot", {f"Alphabet_{c}": 2 for c in "ABCD"}, EVALUATION)
    common = ["model=cnn", "benchmark=omniglot", f"benchmark.root={root}", "benchmark.split_scheme=lake",
              "benchmark.image_size=16", "benchmark.queries=2", "model.bn=inductive", "debug=smoke",
              "logger.tensorboard=false", "logger.console=false", f"benchmark.cache_dir={tmp_path / 'cache'}"]
    proto = run_metarun("train", "algo=protonet", *common, f"hydra.run.dir={tmp_path / 'proto'}", cwd=tmp_path)
    assert proto.returncode == 0, proto.stderr
    best = tmp_path / "proto" / "checkpoints" / "best.pt"
    leo = run_metarun("train", "algo=leo", *common, f"algo.init_from={best}", f"hydra.run.dir={tmp_path / 'leo'}",
                      cwd=tmp_path)
    assert leo.returncode == 0, leo.stderr
    before = {k[len("backbone."):]: v for k, v in load_checkpoint(best)["model"].items() if k.startswith("backbone.")}
    after = load_checkpoint(tmp_path / "leo" / "checkpoints" / "last.pt")["model"]
    assert any("running_mean" in k for k in before)
    for key, value in before.items():
        torch.testing.assert_close(after[f"backbone.{key}"], value, rtol=0, atol=0, msg=key)
    results = json.loads((tmp_path / "leo" / "results.json").read_text())
    assert 0.0 <= results["mean"] <= 1.0 and "latent_accuracy" in results["metrics"]


def test_a_resumed_leo_run_draws_the_same_samples_as_one_that_never_stopped(tmp_path: Path) -> None:
    """LEO's Gaussian samples and dropout masks come from the algorithm generator, whose state every checkpoint
    saves: 3 + 3 steps through last.pt give exactly the metrics and results of 6 steps."""
    from tests.image_fixtures import finish, start_metarun

    root = omniglot_tree(tmp_path / "omniglot", {f"Alphabet_{c}": 2 for c in "ABCD"}, EVALUATION)
    common = ["algo=leo", "model=cnn", "benchmark=omniglot", f"benchmark.root={root}", "benchmark.split_scheme=lake",
              "benchmark.image_size=16", "benchmark.queries=2", "debug=smoke", "trainer.meta_batch_size=3",
              "trainer.eval_every=3", "trainer.checkpoint_every=3", "trainer.log_every=1", "logger.console=false",
              "logger.tensorboard=false", f"benchmark.cache_dir={tmp_path / 'cache'}"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    runs = [start_metarun("train", *common, "trainer.steps=6", f"hydra.run.dir={whole}", cwd=tmp_path),
            start_metarun("train", *common, "trainer.steps=3", f"hydra.run.dir={part}", cwd=tmp_path)]
    for run in runs:
        done = finish(run)
        assert done.returncode == 0, done.stderr[-2000:]
    resumed = run_metarun("train", *common, "trainer.steps=6", f"ckpt_path={part / 'checkpoints' / 'last.pt'}",
                          cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def rows(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert rows(whole) == rows(part) and any("train/kl" in row for row in rows(whole))
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, part))
    assert {k: v for k, v in a.items() if k != "train_seconds"} == {k: v for k, v in b.items() if k != "train_seconds"}


def test_a_nan_batch_falls_back_to_a_step_on_the_l2_penalty_alone() -> None:
    """trainer.on_nan=fallback (the LEO pair files): the optimizer steps on nan_fallback_loss, 1e-4 x the L2
    penalty, as deepmind/leo's grads_and_vars: each penalised weight W moves by -lr x 1e-4 x W, nothing else moves."""
    net = make().float()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=10.0)
    settings = SimpleNamespace(grad_clip=None, grad_clip_value=None, grad_clip_per_tensor=False)
    trainer = SimpleNamespace(algorithm=net, optimizer=optimizer, s=settings, dist=SimpleNamespace(
        average_gradients=lambda params: None))
    trainer._grad_norm = lambda: EpisodicTrainer._grad_norm(trainer)  # type: ignore[attr-defined]
    EpisodicTrainer._step_on_fallback(trainer)  # type: ignore[arg-type]
    penalised = {id(w) for w in net.penalised_weights()}
    for name, p in net.named_parameters():
        want = before[name] * (1 - 10.0 * 1e-4) if id(p) in penalised else before[name]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=name)
    assert all(p.grad is None for p in net.parameters())  # nothing left for the next step
