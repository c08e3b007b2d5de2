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
    """The logged rows without their wall-clock `time`, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


def _refuses(path: str) -> bool:
    """Whether the directory `path` cannot be made here even by root (it is made and removed if it can)."""
    try:
        os.mkdir(path)
    except OSError:
        return True
    os.rmdir(path)
    return False


# Directories that cannot be made for a reason other than permissions (root passes permission checks):
# each must be the same one line and exit 2 as an unwritable directory, never Hydra's traceback.
UNMAKEABLE = {  # case: (the run directory asked for, a directory that must refuse to be made here, if any)
    "parent refuses new entries (/proc)": (lambda tmp: "/proc/metarun-test/run", "/proc/metarun-test"),
    "read-only location (/sys)": (lambda tmp: "/sys/metarun-test", "/sys/metarun-test"),
    "name too long": (lambda tmp: str(tmp / ("x" * 300) / "run"), None),
    "the directory is a file": (lambda tmp: str(tmp / "a-file"), None),
    "${now:...} under a file": (lambda tmp: str(tmp / "a-file" / "${now:%Y-%m-%d}" / "${now:%H-%M-%S}"), None),
}


@pytest.mark.parametrize("case", UNMAKEABLE)
def test_an_output_directory_that_cannot_be_made_is_one_line(case: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    make, probe = UNMAKEABLE[case]
    if probe and not _refuses(probe):
        pytest.skip(f"{probe} can be made on this machine")
    target = make(tmp_path)
    proc = run_metarun("train", "debug=smoke", f"hydra.run.dir={target}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cannot write the output directory" in proc.stderr, proc.stderr
    assert "hydra.run.dir=PATH" in proc.stderr


def test_unmakeable_sweep_eval_and_working_directories_are_one_line(smoke_run: Path) -> None:
    """The same check for a multirun's sweep directory, for eval's run directory, and for the default
    outputs/ under a working directory that refuses new entries."""
    if not _refuses("/proc/metarun-test"):
        pytest.skip("/proc accepts new entries on this machine")
    sweep = run_metarun("train", "-m", "seed=0,1", "debug=smoke", "hydra.sweep.dir=/proc/metarun-test/sweep")
    evaluation = run_metarun("eval", f"ckpt_path={smoke_run / 'checkpoints/best.pt'}",
                             "hydra.run.dir=/proc/metarun-test")
    default = run_metarun("train", "debug=smoke", cwd=Path("/proc"))
    for proc, expected in ((sweep, "hydra.sweep.dir=PATH"), (evaluation, "/proc/metarun-test ("),
                           (default, "/proc/outputs/train (")):
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "cannot write the output directory" in proc.stderr, proc.stderr
        assert expected in proc.stderr, proc.stderr


def test_the_output_directory_check_leaves_nothing_behind(tmp_path: Path) -> None:
    """The check makes the directory to prove it can be made, then removes what it made."""
    proc = run_metarun("train", "debug=smoke", "trainer.steps=abc", f"hydra.run.dir={tmp_path / 'a' / 'b'}")
    assert proc.returncode == 2 and "trainer.steps" in proc.stderr
    assert not (tmp_path / "a").exists()
