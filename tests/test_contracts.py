"""The Protocols are the contract a new family enters through: a class that declares MetaAlgorithm and
Backbone and writes only the required members trains in the one trainer, which supplies every optional
hook's default and calls the backbone's running-statistics hook once per step; a class that does not
declare its contract is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, batch_metrics, task_losses
from metarun.benchmarks.base import TaskSpec
from metarun.config import config_dir
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.base import Backbone
from metarun.run import build, train

UPDATES: list[tuple[int, ...]] = []  # the shapes the trainer handed to update_running_stats, in order
PROGRESS: list[int] = []  # the steps the trainer told the backbone (set_progress), in order
LOSSES: list[int] = []  # the number of tasks of each batch meta_loss was asked about


class CountingBackbone(nn.Module, Backbone):
    """A linear feature map that records each call of the running-statistics hook."""

    def __init__(self, input_shape: tuple[int, ...], width: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(input_shape[0], width)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(x))

    def update_running_stats(self, *image_sets: Tensor) -> None:
        UPDATES.append(tuple(s.shape[1] for s in image_sets))

    def set_progress(self, step: int) -> None:
        PROGRESS.append(step)


class MinimalRegression(nn.Module, MetaAlgorithm):
    """Only the required members: a pooled regressor on the backbone's features (no adaptation)."""

    def __init__(self, backbone: Backbone, spec: TaskSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.head = nn.Linear(backbone.out_features, spec.output_size)

    def _per_task(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        return task_losses(self.spec, self.head(self.backbone(batch.query_x)), batch.query_y)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        LOSSES.append(batch.num_tasks)
        losses, metric = self._per_task(batch)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        return {self.spec.metric: self._per_task(batch)[1]}


class TaskByTask(MinimalRegression):
    """Takes one optimizer step per task of the batch (as PPO takes one per minibatch): `updates` yields them."""

    def updates(self, batch: TaskBatch):  # type: ignore[no-untyped-def]
        for t in range(batch.num_tasks):
            yield batch.slice(t, t + 1)


class Undeclared(nn.Module):
    """A module with the right methods that does not say it implements MetaAlgorithm."""

    def __init__(self, backbone: nn.Module, spec: TaskSpec) -> None:
        super().__init__()


def _config(*overrides: str, algo: str | None = None, model: str | None = None):  # type: ignore[no-untyped-def]
    """The smoke config, with the algo/model nodes replaced by bare `_target_` nodes of these classes."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=smoke", "logger.tensorboard=false",
                                                      "logger.console=false", "device=cpu", "threads=1", *overrides])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        for group, target in (("algo", algo), ("model", model)):
            if target is not None:
                cfg[group] = OmegaConf.create({"_target_": target})
    return cfg


def test_a_new_algorithm_with_only_the_required_members_trains_in_the_one_trainer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    UPDATES.clear()
    cfg = _config("trainer.steps=3", "trainer.eval_every=3", algo="tests.test_contracts.MinimalRegression",
                  model="tests.test_contracts.CountingBackbone")
    best = train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "mse" and results["steps"] == 3 and best == results["val_best"]
    # once per training step, with the step's support and query sets (sine: 10 and 10 points per task)
    assert UPDATES == [(10, 10)] * 3
    assert PROGRESS == [0, 1, 2]  # told before each step how many are done


def test_an_algorithm_takes_as_many_optimizer_steps_as_its_updates_yield(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`updates` is how PPO takes several optimizer steps per training step: each yielded batch gets its own
    meta_loss, backward and step; running statistics still move once per training step."""
    monkeypatch.chdir(tmp_path)
    UPDATES.clear(), LOSSES.clear()
    cfg = _config("trainer.steps=2", "trainer.eval_every=2", "trainer.meta_batch_size=3", "trainer.task_chunk=null",
                  algo="tests.test_contracts.TaskByTask", model="tests.test_contracts.CountingBackbone")
    steps = []
    original = torch.optim.Adam.step
    torch.optim.Adam.step = lambda self, *a, **k: steps.append(1) or original(self, *a, **k)  # type: ignore
    try:
        train(cfg)
    finally:
        torch.optim.Adam.step = original  # type: ignore[method-assign]
    assert len(steps) == 6 and LOSSES[:6] == [1] * 6  # 2 training steps x 3 tasks, one task per meta_loss
    assert UPDATES == [(10, 10)] * 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows)


def test_zero_steps_scores_the_initial_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.steps=0 (algo=baseline's policies have nothing to train) writes the test results of the weights
    as built, through the same results/scores path."""
    monkeypatch.chdir(tmp_path)
    LOSSES.clear()
    cfg = _config("trainer.steps=0", algo="tests.test_contracts.MinimalRegression",
                  model="tests.test_contracts.CountingBackbone")
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 0 and results["best_step"] is None and LOSSES == []
    assert (tmp_path / "scores.json").is_file()


def test_a_class_that_does_not_declare_its_contract_is_refused_in_one_line() -> None:
    cfg = _config(algo="tests.test_contracts.Undeclared")
    with pytest.raises(UserInputError, match=r"^algo._target_ tests.test_contracts.Undeclared does not subclass "
                                             r"metarun.algorithms.base.MetaAlgorithm"):
        build(cfg, {"algo": "undeclared", "model": "mlp", "benchmark": "sine"})


def test_the_protocol_defaults_are_what_the_trainer_gets() -> None:
    spec = TaskSpec(name="t", kind="regression", input_shape=(1,), output_size=1, ways=1, shots=2, queries=2)
    algorithm = MinimalRegression(CountingBackbone((1,)), spec)
    assert algorithm.train_episode() == {}
    assert algorithm.parameter_groups() is None
    assert algorithm.visualize(TaskBatch(*(torch.zeros(1, 2, 1) for _ in range(4)))) == {}
    assert algorithm.supports == {"classification", "regression"} and not algorithm.draws_randomness
    assert CountingBackbone.accepts == {"vector", "image"}
    batch = TaskBatch(*(torch.zeros(2, 2, 1) for _ in range(4)))
    assert list(algorithm.updates(batch)) == [batch]  # one optimizer step on the step's batch
    assert MinimalRegression.backbone_input_shape(spec) == (1,)
    assert Backbone.set_progress(CountingBackbone((1,)), 5) is None  # the Protocol's default: nothing
