"""Crash safety: kill -9 then resume, signals, NaN handling, full disk, unwritable output directory."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.errors import UserInputError
from tests.conftest import metarun_command, read_results, run_metarun

LONG = ["trainer.steps=300", "trainer.meta_batch_size=4", "trainer.eval_every=50", "trainer.checkpoint_every=50",
        "trainer.log_every=20", "trainer.val_tasks=8", "trainer.eval_tasks=8", "logger.console=false"]


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "COLUMNS": "80"}
    return subprocess.Popen([*metarun_command(), "train", *LONG, *extra, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_then_resume_is_bit_identical(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_metarun("train", *LONG, f"hydra.run.dir={whole}").returncode == 0
    proc = _start(killed)
    _wait_for_checkpoint(killed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(killed / "checkpoints" / "last.pt")["step"]
    assert 0 < step < 300, "the kill must land mid-run for this test to mean anything"
    resumed = run_metarun("train", *LONG, f"ckpt_path={killed / 'checkpoints' / 'last.pt'}")
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_results(whole), read_results(killed)
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b
    assert _metrics(whole) == _metrics(killed)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_prints_the_resume_command(tmp_path: Path, sig: int, code: int) -> None:
    proc = _start(tmp_path, "trainer.steps=100000")
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "resume with: metarun train" in out and f"ckpt_path={tmp_path / 'checkpoints' / 'last.pt'}" in out
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] >= 50


def test_nan_loss_stops_with_one_line_naming_the_step(tmp_path: Path) -> None:
    proc = run_metarun("train", "debug=smoke", "algo.inner_lr=1e30", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "at step 1" in proc.stderr and "last good checkpoint" in proc.stderr


def test_nan_skip_counts_skipped_batches(tmp_path: Path) -> None:
    """With a learning rate that overflows only some tasks, skip mode keeps training and counts skips."""
    proc = run_metarun("train", "debug=smoke", "trainer.steps=20", "trainer.on_nan=skip", "algo.inner_lr=1e30",
                       f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "batches skipped for NaN/inf" in proc.stderr


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserInputError, match="No space left on device"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file left behind"


def test_checkpoint_loads_with_weights_only(smoke_run: Path) -> None:
    state = torch.load(smoke_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and isinstance(state["config"], str)


def test_unwritable_output_directory(tmp_path: Path) -> None:
    """A path under a regular file cannot be created, even by root (CI runs as root, so chmod proves nothing)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_metarun("train", "debug=smoke", f"hydra.run.dir={blocker / 'run'}")
    assert proc.returncode == 2 and "cannot write the output directory" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
