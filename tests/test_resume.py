"""A run stopped and resumed from last.pt ends with the same results and metrics as one that never stopped."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import read_results, run_metarun

COMMON = ["debug=smoke", "trainer.meta_batch_size=3", "trainer.eval_every=3", "trainer.checkpoint_every=3",
          "logger.console=false"]
TIMING_KEYS = {"train_seconds"}


def _metrics(run_dir: Path) -> list[dict]:
    """The logged rows without their wall-clock `time`, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_metarun("train", *COMMON, "trainer.steps=6", f"hydra.run.dir={whole}").returncode == 0
    assert run_metarun("train", *COMMON, "trainer.steps=3", f"hydra.run.dir={part}").returncode == 0
    resumed = run_metarun("train", *COMMON, "trainer.steps=6", f"ckpt_path={part / 'checkpoints/last.pt'}")
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_results(whole), read_results(part)  # resuming continues in the checkpoint's run directory
    assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {k: v for k, v in b.items() if k not in TIMING_KEYS}
    assert _metrics(whole) == _metrics(part)
    # the resumed run's clock continues from the last line kept: wall time never runs backwards
    times = [json.loads(line)["time"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert times == sorted(times)


def test_resume_with_a_different_config_names_the_difference(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_metarun("train", *COMMON, f"hydra.run.dir={run}").returncode == 0
    proc = run_metarun("train", *COMMON, "algo.inner_lr=0.5", f"ckpt_path={run / 'checkpoints/last.pt'}")
    assert proc.returncode == 2
    assert "algo.inner_lr" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_task_chunks_give_the_same_training(tmp_path: Path) -> None:
    """Accumulating the meta-gradient over chunks of tasks changes memory, not results (up to float sums)."""
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert run_metarun("train", *COMMON, "trainer.meta_batch_size=4", f"hydra.run.dir={whole}").returncode == 0
    proc = run_metarun("train", *COMMON, "trainer.meta_batch_size=4", "trainer.task_chunk=1", f"hydra.run.dir={chunked}")
    assert proc.returncode == 0, proc.stderr
    a, b = read_results(whole), read_results(chunked)
    assert abs(a["mean"] - b["mean"]) < 1e-5 * abs(a["mean"])
