"""RL runs go through report, compare and check like supervised ones: `return` is higher-is-better, two policies
scored on the same pool pair task by task, and the CI guard fails a run that got worse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_metarun

POOL = ["benchmark=bandit", "benchmark.pulls=10", "trainer.eval_tasks=300", "logger.tensorboard=false",
        "logger.console=false"]


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The random and the Gittins-index policies scored on the same 300 test tasks (one multirun)."""
    work = tmp_path_factory.mktemp("rl_reports")
    proc = run_metarun("train", "-m", "algo=baseline", "algo.policy=random,gittins", *POOL,
                       f"hydra.sweep.dir={work}", "hydra.sweep.subdir=${algo.policy}", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"random": work / "random", "gittins": work / "gittins"}


def test_results_carry_the_return_with_its_ci_and_per_episode_returns(policies: dict[str, Path]) -> None:
    results = json.loads((policies["gittins"] / "results.json").read_text())
    assert results["metric"] == "return" and results["steps"] == 0 and results["tasks"] == 300
    assert {f"return@{k}" for k in range(1, 11)} | {"return", "regret"} == set(results["metrics"])
    episodes = sum(results["metrics"][f"return@{k}"]["mean"] for k in range(1, 11))
    assert episodes == pytest.approx(results["mean"])  # the trial's return is its episodes' returns summed


def test_compare_pairs_two_policies_on_the_same_tasks_higher_is_better(policies: dict[str, Path]) -> None:
    proc = run_metarun("compare", str(policies["random"]), str(policies["gittins"]), "--json")
    assert proc.returncode == 0, proc.stderr
    (rows,) = json.loads(proc.stdout).values()
    headline = next(r for r in rows if r["metric"] == "return")
    assert headline["difference"] > 0 and headline["verdict"] == "better"  # Gittins earns more than random
    regret = next(r for r in rows if r["metric"] == "regret")
    assert regret["difference"] < 0 and regret["verdict"] == "better"  # and regrets less: lower is better


def test_check_fails_a_policy_that_got_worse(policies: dict[str, Path], tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    update = run_metarun("check", str(policies["gittins"]), "--baseline", str(baseline), "--update")
    assert update.returncode == 0, update.stderr
    assert run_metarun("check", str(policies["gittins"]), "--baseline", str(baseline)).returncode == 0
    # the random policy's run, labelled as the same setting, is a regression of ~1.5 in return
    worse = tmp_path / "worse"
    worse.mkdir()
    gittins = json.loads((policies["gittins"] / "results.json").read_text())
    random = json.loads((policies["random"] / "results.json").read_text())
    (worse / "results.json").write_text(json.dumps({**gittins, "mean": random["mean"], "ci95": random["ci95"]}))
    (worse / ".hydra").mkdir()
    for name in ("overrides.yaml", "config.yaml"):
        (worse / ".hydra" / name).write_text((policies["gittins"] / ".hydra" / name).read_text())
    proc = run_metarun("check", str(worse), "--baseline", str(baseline))
    assert proc.returncode == 1, proc.stdout + proc.stderr
