"""The CLI as a user runs it: train, eval, help, sweeps, and the run directory it writes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import read_results, run_metarun

RESULT_KEYS = {"metric", "split", "mean", "ci95", "tasks", "steps", "algo", "model", "benchmark", "seed"}


def test_smoke_train_writes_the_run_directory(smoke_run: Path) -> None:
    for path in (".hydra/config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", "results.json"):
        assert (smoke_run / path).is_file(), path
    results = read_results(smoke_run)
    assert RESULT_KEYS <= results.keys()
    assert results["metric"] == "mse" and results["split"] == "test" and results["tasks"] == 6
    assert (results["algo"], results["model"], results["benchmark"], results["steps"]) == ("maml", "mlp", "sine", 2)
    lines = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss" in line] == [1, 2]
    assert any("val/mse" in line for line in lines)


def test_tensorboard_events_read_back(smoke_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(smoke_run / "tb"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/mse", "hparam/test_mse"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    # the adapted sine curve of a fixed validation episode, drawn as a picture
    image = events.Images("val/adaptation")[-1]
    assert image.step == 2 and image.width > 100 and image.height > 100


def test_eval_scores_a_checkpoint_with_the_same_keys(smoke_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = run_metarun("eval", f"ckpt_path={smoke_run / 'checkpoints/best.pt'}", "trainer.eval_tasks=6",
                       f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    results = read_results(out)
    assert RESULT_KEYS <= results.keys()
    # same checkpoint, same fixed test pool: the same figure as the training run's final test
    assert results["mean"] == read_results(smoke_run)["mean"]


def test_eval_override_changes_inner_steps(smoke_run: Path, tmp_path: Path) -> None:
    proc = run_metarun("eval", f"ckpt_path={smoke_run / 'checkpoints/best.pt'}", "algo.eval_inner_steps=2",
                       f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert set(read_results(tmp_path)["metrics"]) == {"mse@0", "mse@1", "mse@2", "mse"}


def test_help_lists_commands_and_groups() -> None:
    top = run_metarun("--help")
    assert top.returncode == 0 and "train" in top.stdout and "eval" in top.stdout
    train_help = run_metarun("train", "--help")
    assert train_help.returncode == 0
    assert "algo: " in train_help.stdout and "fomaml" in train_help.stdout and "benchmark: " in train_help.stdout


def test_cfg_job_prints_the_composed_config() -> None:
    proc = run_metarun("train", "algo=fomaml", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "first_order: true" in proc.stdout and "meta_batch_size: 25" in proc.stdout


def test_multirun_sweep_one_directory_per_job(tmp_path: Path) -> None:
    proc = run_metarun("train", "-m", "seed=0,1", "debug=smoke", "logger.console=false",
                       f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "multirun.yaml").is_file()
    seeds = sorted(read_results(tmp_path / str(i))["seed"] for i in (0, 1))
    assert seeds == [0, 1]


def test_runs_from_any_directory(tmp_path: Path) -> None:
    """Configs ship with the package: a run works outside the source tree and writes under the cwd."""
    proc = run_metarun("train", "debug=smoke", "logger.console=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "outputs" / "train").glob("*/*/results.json"))
