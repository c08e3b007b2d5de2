"""Per-task scores (`scores.json`) and `metarun compare`: paired differences on the same task pool."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from metarun.compare import paired_difference
from metarun.errors import UserInputError
from tests.conftest import read_results, run_metarun


def test_a_consistent_small_gain_is_detected_when_the_unpaired_cis_overlap() -> None:
    rng = random.Random(0)
    difficulty = [rng.uniform(0.5, 1.0) for _ in range(400)]  # tasks vary far more than the methods do
    baseline = [d + rng.gauss(0, 0.01) for d in difficulty]
    run = [d + 0.01 + rng.gauss(0, 0.01) for d in difficulty]
    unpaired_ci = 1.96 * _std(baseline) / math.sqrt(len(baseline))
    assert abs(_mean(run) - _mean(baseline)) < 2 * unpaired_ci  # side by side: the CIs overlap
    diff = paired_difference("accuracy", baseline, run)
    assert diff.verdict == "better" and diff.difference == pytest.approx(_mean(run) - _mean(baseline))
    assert diff.ci95 < unpaired_ci / 10
    assert diff.run_better + diff.baseline_better == 400 and diff.run_better > 300


def test_direction_follows_the_metric_and_non_finite_tasks_are_left_out() -> None:
    lower = paired_difference("mse@3", [1.0, 2.0, 3.0, float("nan")], [0.5, 1.5, 2.5, 0.1])
    assert lower.verdict == "better" and lower.difference == pytest.approx(-0.5) and lower.tasks == 3
    assert (lower.run_better, lower.baseline_better) == (3, 0)
    worse = paired_difference("accuracy", [0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert worse.verdict == "worse" and worse.baseline_better == 3
    same = paired_difference("accuracy", [0.9, 0.8, 0.7, 0.6], [0.95, 0.75, 0.7, 0.6])
    assert same.verdict == "no difference detected"
    with pytest.raises(UserInputError, match="pools differ"):
        paired_difference("accuracy", [0.9], [0.9, 0.8])


def test_train_and_eval_write_scores_that_compare_on_the_same_pool(smoke_run: Path, tmp_path: Path) -> None:
    scores = json.loads((smoke_run / "scores.json").read_text())
    results = read_results(smoke_run)
    values = scores["scores"][results["metric"]]
    assert len(values) == results["tasks"] == scores["pool"]["tasks"]
    assert _mean(values) == pytest.approx(results["mean"], rel=1e-12)
    assert "root" not in scores["pool"]["settings"] and scores["pool"]["split"] == "test"

    ckpt = smoke_run / "checkpoints" / "best.pt"
    more_steps = tmp_path / "eval_more_steps"
    proc = run_metarun("eval", f"ckpt_path={ckpt}", "algo.eval_inner_steps=3", f"hydra.run.dir={more_steps}")
    assert proc.returncode == 0, proc.stderr
    proc = run_metarun("compare", str(smoke_run), str(more_steps), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {d["metric"]: d for d in json.loads(proc.stdout)[str(more_steps)]}
    assert rows["mse@0"]["difference"] == 0.0 and rows["mse@0"]["verdict"] == "no difference detected"
    assert rows["mse"]["tasks"] == results["tasks"]

    other_pool = tmp_path / "eval_5_shots"
    proc = run_metarun("eval", f"ckpt_path={ckpt}", "benchmark.shots=5", f"hydra.run.dir={other_pool}")
    assert proc.returncode == 0, proc.stderr
    proc = run_metarun("compare", str(smoke_run), str(other_pool))
    assert proc.returncode == 2 and "different task pools" in proc.stderr and "benchmark.shots: 5 vs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_runs_without_per_task_scores_get_a_one_line_hint(tmp_path: Path) -> None:
    old = tmp_path / "old_run"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "best.pt").write_bytes(b"")
    proc = run_metarun("compare", str(old), str(old))
    assert proc.returncode == 2 and "no scores.json" in proc.stderr and "metarun eval ckpt_path=" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
