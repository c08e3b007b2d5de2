"""Reptile against a naive per-task loop with torch.optim (two tasks, then the trainer's outer SGD step),
its mini-batch stream, its checkpointed shuffling state, and the annealed meta step of reptile.yaml."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from metarun.algorithms.base import task_loss
from metarun.algorithms.reptile import Reptile, mini_batch_indices
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.sine import SineBenchmark
from metarun.config import config_dir, validate
from metarun.episodes import TaskBatch
from metarun.models.mlp import MLP

TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=3, ways=3, shots=2, queries=2)


def toy_batch(tasks: int = 2, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(2).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64), labels,
                     torch.rand(tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64), labels.clone())


def sine_batch(tasks: int = 2, shots: int = 5, queries: int = 4, seed: int = 1) -> TaskBatch:
    bench = SineBenchmark(shots=shots, queries=queries)
    return bench.sample("train", tasks, torch.Generator().manual_seed(seed)).to("cpu", torch.float64)


def fine_tune(algo: Reptile, x: torch.Tensor, y: torch.Tensor, steps: int, batches: torch.Tensor | None,
              optimizer: str) -> torch.nn.Module:
    """One task the way paper code does it: a copy of the network and a torch optimizer."""
    net = copy.deepcopy(algo.net)
    opt = (torch.optim.SGD(net.parameters(), lr=algo.inner_lr) if optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=algo.inner_lr, betas=(0.0, 0.999), eps=1e-8))
    for step in range(steps):
        rows = slice(None) if batches is None else batches[step]
        opt.zero_grad()
        task_loss(algo.spec, net(x[rows]), y[rows])[0].backward()
        opt.step()
    return net


def naive_reptile_step(algo: Reptile, batch: TaskBatch, epsilon: float, batches: torch.Tensor | None = None,
                       ) -> dict[str, torch.Tensor]:
    """theta + epsilon * mean_t(theta'_t - theta), with each theta'_t from its own torch optimizer."""
    x, y = batch.support_x, batch.support_y
    if algo.train_on == "all":
        x, y = torch.cat((x, batch.query_x), 1), torch.cat((y, batch.query_y), 1)
    theta = {k: v.detach().clone() for k, v in algo.net.named_parameters()}
    adapted = [dict(fine_tune(algo, x[t], y[t], algo.inner_steps, None if batches is None else batches[t],
                              algo.inner_optimizer).named_parameters()) for t in range(batch.num_tasks)]
    return {k: theta[k] + epsilon * torch.stack([a[k].detach() - theta[k] for a in adapted]).mean(0) for k in theta}


def trainer_step(algo: Reptile, batch: TaskBatch, epsilon: float) -> dict[str, torch.Tensor]:
    """What EpisodicTrainer does with reptile.yaml: zero_grad, backward of the meta-loss, SGD(lr=epsilon).step()."""
    optimizer = torch.optim.SGD(algo.parameters(), lr=epsilon)
    loss, _ = algo.meta_loss(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in algo.net.named_parameters()}


def make(spec: TaskSpec, hidden: list[int], seed: int = 0, **kwargs: object) -> Reptile:
    torch.manual_seed(seed)
    return Reptile(MLP(spec.input_shape, hidden=hidden), spec, **kwargs).double()  # type: ignore[arg-type]


def assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_one_step_with_sgd_inner_loop_matches_the_naive_loop(task: str) -> None:
    spec, batch = (TOY, toy_batch()) if task == "classification" else (SineBenchmark().spec, sine_batch())
    algo = make(spec, [16, 8], inner_steps=3, inner_lr=0.1, inner_optimizer="sgd", inner_batch_size=None)
    want = naive_reptile_step(algo, batch, epsilon=0.7)
    got = trainer_step(algo, batch, epsilon=0.7)
    assert_same_params(got, want)


def test_the_step_moves_the_weights() -> None:
    """Guards the test above: the meta-step is not zero."""
    algo = make(TOY, [16, 8], inner_steps=3, inner_lr=0.1, inner_optimizer="sgd", inner_batch_size=None)
    before = {k: v.detach().clone() for k, v in algo.net.named_parameters()}
    after = trainer_step(algo, toy_batch(), epsilon=1.0)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-3


def test_adam_inner_loop_with_zero_beta1_matches_torch_adam() -> None:
    batch = sine_batch()
    algo = make(SineBenchmark().spec, [16], inner_steps=4, inner_lr=0.01, inner_optimizer="adam", inner_batch_size=None)
    want = naive_reptile_step(algo, batch, epsilon=0.5)
    assert_same_params(trainer_step(algo, batch, epsilon=0.5), want)


@pytest.mark.parametrize("train_on", ["support", "all"])
def test_mini_batches_and_train_on(train_on: str) -> None:
    """Shuffled inner mini-batches (a batch spans an epoch boundary here) drawn from the algorithm's generator."""
    batch = sine_batch(shots=5, queries=4)
    algo = make(SineBenchmark().spec, [16], inner_steps=4, inner_lr=0.05, inner_optimizer="sgd",
                inner_batch_size=3, train_on=train_on)
    size = 5 if train_on == "support" else 9
    state = algo.shuffle.get_state()
    batches = mini_batch_indices(batch.num_tasks, size, 4, 3, algo.shuffle)
    algo.shuffle.set_state(state)
    want = naive_reptile_step(algo, batch, epsilon=1.0, batches=batches)
    assert_same_params(trainer_step(algo, batch, epsilon=1.0), want)


def test_mini_batch_stream_visits_every_example_once_per_epoch() -> None:
    index = mini_batch_indices(3, 5, steps=4, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert index.shape == (3, 4, 5)
    for task in index:
        for epoch in task:
            assert sorted(epoch.tolist()) == list(range(5))
    stream = mini_batch_indices(2, 4, steps=3, batch_size=3, generator=torch.Generator().manual_seed(1)).flatten(1)
    assert all(sorted(s[:4].tolist()) == list(range(4)) for s in stream)  # 9 draws: epoch 1, then part of epoch 2


def test_whole_set_batches_equal_full_batch() -> None:
    """inner_batch_size = set size: each step sees every example once, i.e. the full-batch gradient."""
    batch = sine_batch(shots=6)
    full = make(SineBenchmark().spec, [16], inner_steps=3, inner_lr=0.05, inner_optimizer="sgd", inner_batch_size=None)
    shuffled = make(SineBenchmark().spec, [16], inner_steps=3, inner_lr=0.05, inner_optimizer="sgd", inner_batch_size=6)
    assert_same_params(trainer_step(shuffled, batch, 1.0), trainer_step(full, batch, 1.0))


def test_shuffling_draws_only_from_the_run_generator() -> None:
    """The mini-batch order comes from the generator run.py hands over (whose state the trainer checkpoints),
    never from the global RNG: the same generator state gives the same batches whatever the global RNG does."""
    batch = sine_batch(shots=8)
    generator = torch.Generator().manual_seed(11)
    algo = make(SineBenchmark().spec, [8], inner_steps=2, inner_batch_size=3, generator=generator)
    assert algo.shuffle is generator
    saved = generator.get_state()
    torch.manual_seed(1)
    first, _ = algo.meta_loss(batch)
    second, _ = algo.meta_loss(batch)
    assert not torch.equal(first, second)  # the stream moved on
    generator.set_state(saved)
    torch.manual_seed(2)
    again, _ = algo.meta_loss(batch)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert "_extra_state" not in algo.state_dict()


def test_evaluate_fine_tunes_on_the_support_set() -> None:
    batch = toy_batch(tasks=3)
    algo = make(TOY, [16], inner_lr=0.2, inner_optimizer="sgd", eval_inner_steps=4, eval_inner_batch_size=None)
    out = algo.evaluate(batch)
    assert set(out) == {"accuracy@0", "accuracy@4", "accuracy"} and out["accuracy"].shape == (3,)
    for t in range(3):
        before = task_loss(TOY, algo.net(batch.query_x[t]), batch.query_y[t])[1]
        tuned = fine_tune(algo, batch.support_x[t], batch.support_y[t], 4, None, "sgd")
        after = task_loss(TOY, tuned(batch.query_x[t]), batch.query_y[t])[1]
        torch.testing.assert_close(out["accuracy@0"][t], before.detach())
        torch.testing.assert_close(out["accuracy"][t], after.detach())
    # evaluation mini-batches come from a fixed seed: repeatable, and they leave the training stream alone
    algo.eval_inner_batch_size = 2
    state = algo.shuffle.get_state()
    assert torch.equal(algo.evaluate(batch)["accuracy"], algo.evaluate(batch)["accuracy"])
    assert torch.equal(algo.shuffle.get_state(), state)


@pytest.mark.parametrize("kwargs, message", [
    ({"inner_optimizer": "rmsprop"}, "algo.inner_optimizer must be"),
    ({"train_on": "query"}, "algo.train_on must be"),
    ({"inner_batch_size": 0}, "algo.inner_batch_size must be a positive integer"),
    ({"inner_steps": -1}, "must be >= 0"),
])
def test_bad_settings_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(TOY, [4], **kwargs)


def test_reptile_yaml_sets_sgd_meta_step_annealed_linearly_to_zero() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=["algo=reptile", "trainer.steps=4",
                                                               "trainer.optimizer.lr=0.8"]))
    GlobalHydra.instance().clear()
    assert cfg.algo._target_ == "metarun.algorithms.reptile.Reptile"
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.trainer.optimizer)([param])
    scheduler = instantiate(cfg.trainer.scheduler)(optimizer)
    assert isinstance(optimizer, torch.optim.SGD)
    lrs = []
    for _ in range(4):  # the trainer's order: optimizer.step() with the current lr, then scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # epsilon_i = epsilon_0 * (1 - i / steps), as in the paper's code (meta-step-final 0)
    assert lrs == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
