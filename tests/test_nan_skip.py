"""trainer.on_nan: batches with non-finite losses are skipped and counted (skip), or stop the run with one
line naming the step (stop, the default).

The run is in-process (hydra's compose API, then metarun.run.train in a temporary working directory,
which run.py uses as the run directory without Hydra) on sine MAML, with the benchmark's `sample` wrapped
so that every third training batch has NaN query targets; validation and test pools stay clean.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from metarun.benchmarks.sine import SineBenchmark
from metarun.config import config_dir
from metarun.episodes import TaskBatch
from metarun.run import train
from metarun.trainer import NonFiniteLoss

STEPS = 8
POISON_EVERY = 3  # training batches 3, 6, 9, ... carry NaN
OVERRIDES = ["algo=maml", "benchmark=sine", "model=mlp", "device=cpu", "threads=1", "logger.tensorboard=false",
             "logger.console=false", f"trainer.steps={STEPS}", "trainer.meta_batch_size=2", "trainer.log_every=1",
             "trainer.eval_every=4", "trainer.checkpoint_every=1", "trainer.val_tasks=4", "trainer.eval_tasks=6"]


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Every POISON_EVERY-th training batch gets NaN query targets; returns the log of batches ('ok'/'nan')."""
    drawn: list[str] = []
    original = SineBenchmark.sample

    def sample(self: SineBenchmark, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        batch = original(self, split, num_tasks, generator)
        if split != "train":
            return batch
        drawn.append("nan" if (len(drawn) + 1) % POISON_EVERY == 0 else "ok")
        if drawn[-1] == "ok":
            return batch
        query_y = batch.query_y.clone()
        query_y[0, 0] = float("nan")
        return TaskBatch(batch.support_x, batch.support_y, batch.query_x, query_y)

    monkeypatch.setattr(SineBenchmark, "sample", sample)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # no Hydra run: the working directory is the run's
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            yield drawn
    finally:
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()


def _train(*extra: str) -> float:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*OVERRIDES, *extra])
    GlobalHydra.instance().clear()
    return train(cfg)


def _expected_skips_by_step() -> dict[int, int]:
    """Skipped batches before each step completes: batches are drawn until STEPS of them were finite."""
    skips, step, expected, drawn = 0, 0, {}, 0
    while step < STEPS:
        drawn += 1
        if drawn % POISON_EVERY == 0:
            skips += 1
            continue
        step += 1
        expected[step] = skips
    return expected


@pytest.mark.parametrize("mode", ["skip", "fallback"])  # MAML has no fallback loss: fallback skips as skip does
def test_skip_trains_to_the_end_and_counts_the_skipped_batches(poisoned: list[str], tmp_path: Path, mode: str) -> None:
    _train(f"trainer.on_nan={mode}")
    expected = _expected_skips_by_step()
    assert poisoned.count("ok") == STEPS and poisoned.count("nan") == expected[STEPS] == 3, poisoned
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = {line["step"]: line for line in lines if "train/loss" in line}
    assert sorted(train_lines) == list(range(1, STEPS + 1))
    for step, line in train_lines.items():
        # logged from the first skip on; the count is cumulative
        assert line.get("train/nan_skips", 0) == expected[step], (step, line)
        assert math.isfinite(line["train/loss"]) and math.isfinite(line["train/grad_norm"]), line
    assert "train/nan_skips" not in train_lines[1] and train_lines[STEPS]["train/nan_skips"] == 3
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == STEPS and math.isfinite(results["mean"]) and math.isfinite(results["val_best"])
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == STEPS and last["nan_skips"] == 3
    assert all(bool(torch.isfinite(value).all()) for value in last["model"].values() if value.is_floating_point())


def test_stop_fails_with_one_line_naming_the_step(poisoned: list[str], tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLoss) as raised:
        _train()  # on_nan=stop is the default
    message = str(raised.value)
    assert "\n" not in message, message
    # batches 1 and 2 trained steps 1 and 2 (each checkpointed); the third batch would have been step 3
    assert "meta-loss nan at step 3;" in message, message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'last.pt'}" in message, message
    assert "trainer.on_nan=skip" in message, message
    assert poisoned == ["ok", "ok", "nan"]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "results.json").exists()
