"""`metarun report` groups and aggregates over seeds; `metarun check` passes, fails and updates baselines,
one entry per setting."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.conftest import run_metarun


def _fake_run(root: Path, name: str, seed: int, mean: float, algo: str = "maml", metric: str = "accuracy",
              ci95: float = 0.01, extra: tuple[str, ...] = ()) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    overrides = [f"algo={algo}", f"seed={seed}", "trainer.steps=100", *extra]
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
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
    assert row["figure"] == "paper" and row["figure_mean"] == 0.988 and row["verdict"] == "below"
    assert row["difference"] == pytest.approx(-0.038)


def test_report_paper_keeps_only_runs_with_a_published_figure(tmp_path: Path) -> None:
    preset = _fake_run(tmp_path, "preset", 0, 0.950, ci95=0.005)
    (preset.parent / ".hydra" / "config.yaml").write_text("paper:\n  mean: 0.988\n  ci95: 0.004\n")
    _fake_run(tmp_path, "plain", 0, 0.90, algo="protonet")
    evaluated = _fake_run(tmp_path, "eval", 0, 0.84, algo="reptile")  # `metarun eval` writes the figure itself
    evaluated.write_text(json.dumps({**json.loads(evaluated.read_text()), "paper": {"mean": 0.9768, "ci95": None}}))
    rows = json.loads(run_metarun("report", str(tmp_path), "--paper", "--format", "json").stdout)
    assert sorted(r["figure_mean"] for r in rows) == [0.9768, 0.988]
    assert {r["verdict"] for r in rows} == {"below"}
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


# Overrides that name where a run read its data, wrote its outputs or how it logged: not part of a setting.
_PLUMBING = ("benchmark.root={root}", "benchmark.cache_dir={root}/cache", "benchmark.decode_workers=4",
             "hydra.run.dir={root}/run", "hydra/launcher=joblib", "logger.console=false", "+logger.tensorboard=false",
             "device=cpu", "threads=1", "trainer.log_every=10", "trainer.eval_batch_size=50", "ckpt_path={root}/last.pt",
             "+paper.mean=0.96")


def test_report_leaves_data_roots_and_output_paths_out_of_the_setting(tmp_path: Path) -> None:
    """Two seeds that read the data from different roots and wrote to different places are one setting;
    algo.init_from (other starting weights) is a setting of its own, shown in full."""
    for seed, root in ((0, "/data/a/omniglot"), (1, "/mnt/b/omniglot")):
        _fake_run(tmp_path, f"s{seed}", seed, 0.90 + seed / 100, extra=tuple(o.format(root=root) for o in _PLUMBING))
    _fake_run(tmp_path, "init", 0, 0.97, extra=("benchmark.root=/data/a/omniglot",
                                                  "algo.init_from=/runs/protonet/checkpoints/best.pt"))
    rows = json.loads(run_metarun("report", str(tmp_path), "--format", "json").stdout)
    assert len(rows) == 2, [r["setting"] for r in rows]
    pooled = next(r for r in rows if r["runs"] == 2)
    assert pooled["setting"] == "maml/cnn/omniglot (test) trainer.steps=100" and pooled["seeds"] == [0, 1]
    init = next(r for r in rows if r["runs"] == 1)
    assert init["setting"] == "maml/cnn/omniglot (test) algo.init_from=/runs/protonet/checkpoints/best.pt trainer.steps=100"


def test_not_a_setting_is_one_list_of_keys_and_their_subkeys() -> None:
    from metarun.report import NOT_A_SETTING, is_setting

    assert {"seed", "hydra", "benchmark.root", "benchmark.cache_dir", "logger", "device", "threads"} <= set(NOT_A_SETTING)
    for override in ("seed=3", "hydra.sweep.dir=/x", "hydra/launcher=joblib", "+benchmark.root=/x", "logger=default",
                     "benchmark.cache_dir=/c", "~paper", "threads=1"):
        assert not is_setting(override), override
    for override in ("benchmark.shots=5", "benchmark.ways=20", "experiment=maml_sine", "trainer.pool_seed=1",
                     "algo.init_from=/r/checkpoints/best.pt", "seeds_per_task=2", "benchmark.roots_of_unity=1"):
        assert is_setting(override), override


def _shots_run(root: Path, name: str, shots: int, mean: float, seed: int = 0) -> Path:
    return _fake_run(root, name, seed, mean, extra=(f"benchmark.shots={shots}", f"benchmark.root={root}/data"))


def _baseline_entries(path: Path) -> dict:
    return json.loads(path.read_text())["entries"]


def test_check_keeps_settings_apart(tmp_path: Path) -> None:
    """Runs that differ only in benchmark.shots are two entries; a regression in one is caught while the other passes."""
    baseline = tmp_path / "baseline.json"
    one, five = _shots_run(tmp_path / "base", "1shot", 1, 0.95), _shots_run(tmp_path / "base", "5shot", 5, 0.99)
    assert run_metarun("check", str(one), str(five), "--baseline", str(baseline), "--update").returncode == 0
    entries = _baseline_entries(baseline)
    assert len(entries) == 2
    assert sorted(e["mean"] for e in entries.values()) == [0.95, 0.99]
    assert all("benchmark.root" not in key for key in entries)
    regressed = _shots_run(tmp_path / "new", "1shot", 1, 0.90)  # 5 points down in 1-shot
    unchanged = _shots_run(tmp_path / "new", "5shot", 5, 0.99)
    assert run_metarun("check", str(unchanged), "--baseline", str(baseline)).returncode == 0
    proc = run_metarun("check", str(regressed), "--baseline", str(baseline))
    assert proc.returncode == 1 and "FAIL" in proc.stdout
    proc = run_metarun("check", str(regressed), str(unchanged), "--baseline", str(baseline))
    assert proc.returncode == 1 and "1 of 2 settings" in proc.stdout
    # 5-shot at 0.95 is a regression against 5-shot's 0.99, though it equals 1-shot's baseline
    assert run_metarun("check", str(_shots_run(tmp_path / "worse", "5shot", 5, 0.95)), "--baseline",
                       str(baseline)).returncode == 1


def test_check_update_of_one_setting_keeps_the_others(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    assert run_metarun("check", str(_shots_run(tmp_path / "a", "r", 1, 0.95)), "--baseline", str(baseline),
                       "--update").returncode == 0
    assert run_metarun("check", str(_shots_run(tmp_path / "b", "r", 5, 0.99)), "--baseline", str(baseline),
                       "--update").returncode == 0
    entries = _baseline_entries(baseline)
    assert len(entries) == 2
    assert run_metarun("check", str(_shots_run(tmp_path / "c", "r", 1, 0.80)), "--baseline", str(baseline),
                       "--update").returncode == 0  # a deliberate refresh of 1-shot
    after = _baseline_entries(baseline)
    five = next(k for k in entries if "benchmark.shots=5" in k)
    one = next(k for k in entries if "benchmark.shots=1" in k)
    assert after[five] == entries[five] and after[one]["mean"] == 0.80 and len(after) == 2


def test_check_pools_the_seeds_of_a_setting(tmp_path: Path) -> None:
    """The entry of a setting is the mean over its seeds, its CI the mean per-run CI combined with the seeds'
    spread; new seeds are pooled the same way and their mean is compared with the entry's."""
    baseline = tmp_path / "baseline.json"
    base = [_shots_run(tmp_path / "base", f"s{s}", 1, m, seed=s) for s, m in ((0, 0.94), (1, 0.95), (2, 0.96))]
    assert run_metarun("check", *map(str, base), "--baseline", str(baseline), "--update").returncode == 0
    (only,) = _baseline_entries(baseline).values()
    assert only["seeds"] == [0, 1, 2] and len(only["runs"]) == 3 and only["mean"] == pytest.approx(0.95)
    spread = 1.96 * statistics.stdev([0.94, 0.95, 0.96]) / 3**0.5
    assert only["ci95"] == pytest.approx((0.01**2 + spread**2) ** 0.5)
    # one new seed lower than the baseline mean, but within the CIs; two seeds whose mean is far below: fail
    assert run_metarun("check", str(_shots_run(tmp_path / "new", "s3", 1, 0.945, seed=3)), "--baseline",
                       str(baseline)).returncode == 0
    low = [_shots_run(tmp_path / "low", f"s{s}", 1, 0.90, seed=s) for s in (0, 1)]
    assert run_metarun("check", *map(str, low), "--baseline", str(baseline)).returncode == 1


def test_check_refuses_an_old_format_baseline_and_update_recreates_it(tmp_path: Path) -> None:
    run = _shots_run(tmp_path, "r", 1, 0.95)
    baseline = tmp_path / "old.json"
    baseline.write_text(json.dumps({"entries": {"maml/cnn/omniglot/test/accuracy": {
        "metric": "accuracy", "mean": 0.95, "ci95": 0.01, "tasks": 600, "steps": 100, "seed": 0}}}))
    proc = run_metarun("check", str(run), "--baseline", str(baseline))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--update" in proc.stderr
    assert run_metarun("check", str(run), "--baseline", str(baseline), "--update").returncode == 0
    assert list(_baseline_entries(baseline)) == ["maml/cnn/omniglot (test) benchmark.shots=1 trainer.steps=100 [accuracy]"]
    assert run_metarun("check", str(run), "--baseline", str(baseline)).returncode == 0


def test_report_labels_published_figures_and_our_references(tmp_path: Path) -> None:
    """`paper:` rows say which paper; `reference:` rows say they are ours; a reference on a per-step metric
    (mse@1) is compared with that metric of ours."""
    published = _fake_run(tmp_path, "published", 0, 0.987, ci95=0.002)
    (published.parent / ".hydra" / "config.yaml").write_text(
        'paper:\n  source: "Snell et al. 2017, Table 1"\n  metric: accuracy\n  mean: 0.988\n  ci95: null\n')
    ours = _fake_run(tmp_path, "ours", 0, 0.60, algo="protonet", ci95=0.01)
    (ours.parent / ".hydra" / "config.yaml").write_text(
        'reference:\n  source: "metarun"\n  metric: accuracy\n  mean: 0.674\n  ci95: 0.0097\n  note: "measured"\n')
    sine = _fake_run(tmp_path, "sine", 0, 0.096, algo="reptile", metric="mse", ci95=0.014)
    results = json.loads(sine.read_text())  # `metarun eval` writes the figure into results.json
    sine.write_text(json.dumps({**results, "metrics": {"mse@1": {"mean": 0.315, "ci95": 0.031}},
                                "reference": {"metric": "mse@1", "mean": 0.34, "ci95": 0.03}}))
    rows = {r["setting"].split("/")[0]: r for r in
            json.loads(run_metarun("report", str(tmp_path), "--paper", "--format", "json").stdout)}
    assert rows["maml"]["figure"] == "paper" and rows["maml"]["source"] == "paper (Snell et al. 2017, Table 1)"
    assert rows["maml"]["verdict"] == "within CIs"
    assert rows["protonet"]["figure"] == "reference" and rows["protonet"]["source"] == "ours (reference)"
    assert rows["protonet"]["verdict"] == "below"
    assert rows["reptile"]["source"] == "ours (reference) on mse@1" and rows["reptile"]["verdict"] == "within CIs"
    assert rows["reptile"]["difference"] == pytest.approx(-0.025)
    table = run_metarun("report", str(tmp_path), "--paper", "--format", "md").stdout
    assert "| source |" in table and "paper (Snell et al. 2017, Table 1)" in table and "ours (reference)" in table
