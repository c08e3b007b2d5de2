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
    times = [line["time"] for line in lines]  # wall-clock seconds since the run started, for curves against time
    assert times == sorted(times) and times[0] >= 0
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


# -- eval composes through Hydra: the checkpoint's training overrides, then the command line's -------------

def _eval(smoke_run: Path, out: Path, *overrides: str, ckpt: Path | None = None):
    return run_metarun("eval", f"ckpt_path={ckpt or smoke_run / 'checkpoints/best.pt'}", *overrides,
                       f"hydra.run.dir={out}")


def test_eval_takes_a_group_override_such_as_debug_smoke(smoke_run: Path, tmp_path: Path) -> None:
    proc = _eval(smoke_run, tmp_path, "debug=smoke")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    assert results["tasks"] == 6 and results["mean"] == read_results(smoke_run)["mean"]


def test_eval_takes_the_checkpoints_own_benchmark_option(smoke_run: Path, tmp_path: Path) -> None:
    proc = _eval(smoke_run, tmp_path, "benchmark=sine")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    assert results["benchmark"] == "sine" and results["mean"] == read_results(smoke_run)["mean"]


def test_eval_group_override_changes_the_pool_shape(smoke_run: Path, tmp_path: Path) -> None:
    """A preset (here a user's, via --config-dir) that reshapes the episodes: the new shape is what is scored
    and what the pool identity says, so `metarun compare` never pairs it with the training run's pool."""
    configs = tmp_path / "configs"
    (configs / "experiment").mkdir(parents=True)
    preset = "# @package _global_\nbenchmark:\n  shots: 5\n  queries: 7\n"
    (configs / "experiment" / "five_shot.yaml").write_text(preset)
    out = tmp_path / "eval"
    proc = run_metarun("eval", "--config-dir", str(configs), f"ckpt_path={smoke_run / 'checkpoints/best.pt'}",
                       "experiment=five_shot", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    pool = json.loads((out / "scores.json").read_text())["pool"]
    assert (pool["settings"]["shots"], pool["settings"]["queries"], pool["tasks"]) == (5, 7, 6)
    assert read_results(out)["benchmark"] == "sine"
    assert json.loads((smoke_run / "scores.json").read_text())["pool"]["settings"]["shots"] == 10


def test_eval_takes_a_paper_preset(smoke_run: Path, tmp_path: Path) -> None:
    """experiment=maml_sine tests after 10 inner steps; the checkpoint's own debug=smoke keeps the pool small."""
    proc = _eval(smoke_run, tmp_path, "experiment=maml_sine")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    assert "mse@10" in results["metrics"] and results["tasks"] == 6


def _copy_checkpoint(smoke_run: Path, dest: Path, **changes) -> Path:  # type: ignore[no-untyped-def]
    """The smoke checkpoint moved away from its run directory, with parts of its state replaced (None: removed)."""
    import torch

    state = torch.load(smoke_run / "checkpoints" / "best.pt", weights_only=True)
    for key, value in changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    path = dest / "moved" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def test_eval_composes_from_the_overrides_a_checkpoint_records(smoke_run: Path, tmp_path: Path) -> None:
    """Away from its run directory, the checkpoint's own record of its overrides composes the config, and the
    group options in results.json are the composed ones (not class names)."""
    ckpt = _copy_checkpoint(smoke_run, tmp_path, overrides=["debug=smoke", "logger.console=false"])
    proc = _eval(smoke_run, tmp_path / "eval", "benchmark=sine", ckpt=ckpt)
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "eval")
    assert (results["algo"], results["model"], results["benchmark"]) == ("maml", "mlp", "sine")


def test_the_checkpoints_config_wins_where_the_command_line_changes_nothing(smoke_run: Path, tmp_path: Path) -> None:
    """A checkpoint whose saved config differs from what its overrides compose today (a default edited since):
    keys the new overrides leave alone keep the checkpoint's value; a key the command line names is the new one."""
    from omegaconf import OmegaConf

    import torch

    saved = OmegaConf.create(torch.load(smoke_run / "checkpoints" / "best.pt", weights_only=True)["config"])
    saved.algo.eval_inner_steps = 3
    ckpt = _copy_checkpoint(smoke_run, tmp_path, config=OmegaConf.to_yaml(saved), overrides=["debug=smoke"])
    assert _eval(smoke_run, tmp_path / "a", "debug=smoke", "trainer.eval_tasks=5", ckpt=ckpt).returncode == 0
    results = read_results(tmp_path / "a")
    assert "mse@3" in results["metrics"] and "mse@4" not in results["metrics"] and results["tasks"] == 5
    assert _eval(smoke_run, tmp_path / "b", "algo.eval_inner_steps=10", ckpt=ckpt).returncode == 0
    assert "mse@10" in read_results(tmp_path / "b")["metrics"]


def test_eval_composes_from_the_run_directorys_overrides(smoke_run: Path, tmp_path: Path) -> None:
    """A checkpoint saved before checkpoints recorded their overrides: its run's .hydra/overrides.yaml serves."""
    import shutil

    ckpt = _copy_checkpoint(smoke_run, tmp_path, overrides=None)
    shutil.copytree(smoke_run / ".hydra", ckpt.parent.parent / ".hydra")
    proc = _eval(smoke_run, tmp_path / "eval", "debug=smoke", "benchmark=sine", ckpt=ckpt)
    assert proc.returncode == 0, proc.stderr
    assert read_results(tmp_path / "eval")["mean"] == read_results(smoke_run)["mean"]


def test_eval_of_a_checkpoint_without_recorded_overrides(smoke_run: Path, tmp_path: Path) -> None:
    """No record and no run directory: keys still override its saved config; a group override is one line."""
    ckpt = _copy_checkpoint(smoke_run, tmp_path, overrides=None)
    proc = _eval(smoke_run, tmp_path / "eval", "algo.eval_inner_steps=1", ckpt=ckpt)
    assert proc.returncode == 0, proc.stderr
    assert set(read_results(tmp_path / "eval")["metrics"]) == {"mse@0", "mse@1", "mse"}
    proc = _eval(smoke_run, tmp_path / "eval2", "debug=smoke", ckpt=ckpt)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "'debug=smoke'" in proc.stderr and "records no training overrides" in proc.stderr


def test_combined_overrides_replace_by_key() -> None:
    from metarun.eval_config import _combine_overrides

    recorded = ["benchmark=omniglot", "benchmark.root=/o", "benchmark.ways=20", "+algo.extra=1", "seed=3", "~logger.x"]
    new = ["benchmark.ways=5", "algo.extra=2", "~seed", "~logger.x"]
    assert _combine_overrides(recorded, new) == [
        "benchmark=omniglot", "benchmark.root=/o", "seed=3", "benchmark.ways=5", "++algo.extra=2", "~seed", "~logger.x"]
    # another benchmark: the recorded benchmark.* overrides were the old benchmark's
    assert _combine_overrides(recorded, ["benchmark=miniimagenet"], {"benchmark"}) == [
        "+algo.extra=1", "seed=3", "~logger.x", "benchmark=miniimagenet"]


def test_three_way_merge_keeps_the_checkpoints_values() -> None:
    from metarun.eval_config import _three_way

    saved = {"a": 1, "b": {"x": 1, "y": 1}, "only_saved": 7, "g": {"k": 1}}
    base = {"a": 2, "b": {"x": 2, "y": 2}, "gone": 0, "g": {"k": 2}}
    new = {"a": 2, "b": {"x": 3, "y": 2}, "added": 5, "g": {"k": 2, "j": 1}}
    assert _three_way(saved, base, new, set()) == {"a": 1, "b": {"x": 3, "y": 1}, "added": 5, "g": {"k": 1, "j": 1},
                                                   "only_saved": 7}
    assert _three_way(saved, base, new, {"a", "g"}) == {"a": 2, "b": {"x": 3, "y": 1}, "added": 5,
                                                        "g": {"k": 2, "j": 1}, "only_saved": 7}
    # a key the command line names is new even where it equals what the overrides compose anyway
    assert _three_way({"a": {"x": 1}}, {"a": {"x": 2}}, {"a": {"x": 2}}, {"a.x"}) == {"a": {"x": 2}}
