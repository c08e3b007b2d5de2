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
        losses, metric = self._per_task(batch)
        return losses.mean(), batch_metrics(self.spec, losses, metric)

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        return {self.spec.metric: self._per_task(batch)[1]}


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
