"""`metarun report` groups and aggregates over seeds; `metarun check` passes, fails and updates baselines."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.conftest import run_metarun


def _fake_run(root: Path, name: str, seed: int, mean: float, algo: str = "maml", metric: str = "accuracy",
              ci95: float = 0.01) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- algo={algo}\n- seed={seed}\n- trainer.steps=100\n")
    results = {"metric": metric, "split": "test", "mean": mean, "ci95": ci95, "tasks": 600, "steps": 100,
               "algo": algo, "model": "cnn", "benchmark": "omniglot", "seed": seed}
    (run / "results.json").write_text(json.dumps(results))
    return run / "results.json"


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for i, (algo, seed, mean) in enumerate([("maml", 0, 0.90), ("maml", 1, 0.92), ("maml", 2, 0.94),
                                            ("protonet", 0, 0.96), ("protonet", 1, 0.97), ("protonet", 2, 0.98)]):
        _fake_run(tmp_path / "multirun", str(i), seed, mean, algo)
    return tmp_path / "multirun"


def test_report_aggregates_over_seeds(sweep: Path) -> None:
    proc = run_metarun("report", str(sweep), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["setting"].split("/")[0]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"maml", "protonet"}
    assert rows["maml"]["runs"] == 3 and rows["maml"]["seeds"] == [0, 1, 2]
    assert rows["maml"]["mean"] == pytest.approx(0.92)
    assert rows["maml"]["seed_std"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.94]))
    assert "trainer.steps=100" in rows["maml"]["setting"]


@pytest.mark.parametrize("fmt,marker", [("md", "| setting |"), ("csv", "setting,metric,runs")])
def test_report_writes_md_and_csv(sweep: Path, tmp_path: Path, fmt: str, marker: str) -> None:
    out = tmp_path / f"table.{fmt}"
    proc = run_metarun("report", str(sweep), "--format", fmt, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith(marker) and "92.00" in out.read_text()


def test_check_passes_then_fails_on_a_regression(tmp_path: Path) -> None:
    good = _fake_run(tmp_path, "good", 0, 0.95)
    baseline = tmp_path / "baseline.json"
    assert run_metarun("check", str(good), "--baseline", str(baseline), "--update").returncode == 0
    assert run_metarun("check", str(good), "--baseline", str(baseline)).returncode == 0
    slightly = _fake_run(tmp_path, "slightly", 0, 0.945)  # 0.5 points down: within tolerance and CI
    assert run_metarun("check", str(slightly), "--baseline", str(baseline)).returncode == 0
    bad = _fake_run(tmp_path, "bad", 0, 0.90)
    proc = run_metarun("check", str(bad), "--baseline", str(baseline))
    assert proc.returncode == 1 and "FAIL" in proc.stdout


def test_check_direction_follows_the_metric(tmp_path: Path) -> None:
    """For MSE lower is better: a drop passes, a rise beyond the CI fails."""
    base = _fake_run(tmp_path, "base", 0, 0.40, metric="mse", ci95=0.01)
    baseline = tmp_path / "b.json"
    run_metarun("check", str(base), "--baseline", str(baseline), "--update")
    assert run_metarun("check", str(_fake_run(tmp_path, "lower", 0, 0.30, metric="mse")), "--baseline",
                       str(baseline)).returncode == 0
    assert run_metarun("check", str(_fake_run(tmp_path, "higher", 0, 0.43, metric="mse")), "--tolerance", "1",
                       "--baseline", str(baseline)).returncode == 1


def test_check_without_baseline_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_metarun("check", str(_fake_run(tmp_path, "r", 0, 0.9)), "--baseline", str(tmp_path / "none.json"))
    assert proc.returncode == 2 and "--update" in proc.stderr


def test_report_sets_our_figure_beside_the_paper(tmp_path: Path) -> None:
    path = _fake_run(tmp_path, "preset", 0, 0.950, ci95=0.005)
    (path.parent / ".hydra" / "config.yaml").write_text("paper:\n  mean: 0.988\n  ci95: null\n")
    proc = run_metarun("report", str(tmp_path), "--format", "json")
    row = json.loads(proc.stdout)[0]
    assert row["paper_mean"] == 0.988 and row["paper_verdict"] == "below"
    assert row["paper_diff"] == pytest.approx(-0.038)


def test_report_paper_keeps_only_runs_with_a_published_figure(tmp_path: Path) -> None:
    preset = _fake_run(tmp_path, "preset", 0, 0.950, ci95=0.005)
    (preset.parent / ".hydra" / "config.yaml").write_text("paper:\n  mean: 0.988\n  ci95: 0.004\n")
    _fake_run(tmp_path, "plain", 0, 0.90, algo="protonet")
    evaluated = _fake_run(tmp_path, "eval", 0, 0.84, algo="reptile")  # `metarun eval` writes the figure itself
    evaluated.write_text(json.dumps({**json.loads(evaluated.read_text()), "paper": {"mean": 0.9768, "ci95": None}}))
    rows = json.loads(run_metarun("report", str(tmp_path), "--paper", "--format", "json").stdout)
    assert sorted(r["paper_mean"] for r in rows) == [0.9768, 0.988]
    assert {r["paper_verdict"] for r in rows} == {"below"}
    proc = run_metarun("report", str(tmp_path / "plain"), "--paper")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "paper" in proc.stderr


def test_report_keeps_evaluations_of_different_presets_apart(tmp_path: Path) -> None:
    """`metarun eval` results carry only the eval's own overrides; the setting comes from the training run
    that wrote the checkpoint, so two presets' checkpoints are two rows, not two seeds of one."""
    scored = {}
    for preset, mean in (("maml_omniglot_5w1s", 0.975), ("maml_omniglot_20w1s", 0.80)):
        train = tmp_path / "train" / preset
        (train / ".hydra").mkdir(parents=True)
        (train / ".hydra" / "overrides.yaml").write_text(f"- experiment={preset}\n- trainer.eval_tasks=200\n")
        evaluated = _fake_run(tmp_path / "eval", preset, 0, mean)
        (evaluated.parent / ".hydra" / "overrides.yaml").write_text(
            f"- ckpt_path={train}/checkpoints/best.pt\n- trainer.eval_tasks=600\n")
        results = json.loads(evaluated.read_text())
        evaluated.write_text(json.dumps({**results, "checkpoint": f"{train}/checkpoints/best.pt"}))
        scored[preset] = mean
    orphan = _fake_run(tmp_path / "eval", "orphan", 0, 0.5)  # its training run directory was deleted
    orphan.write_text(json.dumps({**json.loads(orphan.read_text()), "checkpoint": "/gone/checkpoints/best.pt"}))
    rows = json.loads(run_metarun("report", str(tmp_path / "eval"), "--format", "json").stdout)
    assert len(rows) == 3 and all(r["runs"] == 1 for r in rows)
    for preset, mean in scored.items():
        row = next(r for r in rows if f"experiment={preset}" in r["setting"])
        assert row["mean"] == pytest.approx(mean)
        assert "trainer.eval_tasks=600" in row["setting"] and "eval_tasks=200" not in row["setting"]
    assert any("checkpoint=/gone/checkpoints/best.pt" in r["setting"] for r in rows)
