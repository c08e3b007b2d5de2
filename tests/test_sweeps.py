"""Sweeps through Hydra's plugins: Optuna (in-memory and sqlite storage), joblib, submitit (local)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import read_results, run_metarun

TINY = ["debug=smoke", "trainer.steps=4", "trainer.eval_every=2", "logger.console=false"]


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_optuna_search_minimises_validation_mse(tmp_path: Path, storage: str) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    extra = [f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}"] if storage == "sqlite" else []
    proc = run_metarun("train", "-m", "hparams_search=maml_sine", *TINY, "hydra.sweeper.n_trials=3",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra)
    assert proc.returncode == 0, proc.stderr
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    trials = [read_results(tmp_path / "sweep" / str(i)) for i in range(3)]
    assert set(best.best_params) == {"algo.inner_lr", "trainer.optimizer.lr"}
    assert all(r["metric"] == "mse" for r in trials)
    # the value returned to the sweeper is each run's own best validation MSE, not a constant
    values = [r["val_best"] for r in trials]
    assert all(math.isfinite(v) for v in values) and len(set(values)) > 1, values
    assert best.best_value == pytest.approx(min(values), rel=1e-9), (best.best_value, values)
    winner = values.index(min(values))
    chosen = dict(str(o).split("=", 1) for o in OmegaConf.load(tmp_path / "sweep" / str(winner) / ".hydra" /
                                                                "overrides.yaml"))
    assert {k: float(v) for k, v in best.best_params.items()} == pytest.approx(
        {k: float(chosen[k]) for k in best.best_params}, rel=1e-9), (best.best_params, chosen)
    if storage == "sqlite":
        with sqlite3.connect(tmp_path / "study.db") as db:
            assert db.execute("select count(*) from trials").fetchone()[0] == 3


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_metarun("train", "-m", "seed=0,1", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                       f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(read_results(tmp_path / str(i))["seed"] for i in (0, 1)) == [0, 1]


def test_submitit_local_launcher(tmp_path: Path) -> None:
    """The same launcher family as SLURM (hydra/launcher=submitit_slurm), run on this machine."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_metarun("train", "-m", "seed=3", *TINY, "hydra/launcher=submitit_local",
                       "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert read_results(tmp_path / "0")["seed"] == 3
