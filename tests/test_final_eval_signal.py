"""A signal during the final test evaluation (after the last training step) prints the resume line and names
the phase; resuming from last.pt re-runs only the evaluation, to the results an uninterrupted run writes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import metarun_command, read_results, run_metarun

# two training steps, then a test pool big enough that the evaluation takes seconds (the signal lands in it)
RUN = ["trainer.steps=2", "trainer.meta_batch_size=2", "trainer.eval_every=2", "trainer.val_tasks=4",
       "trainer.eval_tasks=20000", "algo.eval_inner_steps=20", "logger.console=false", "logger.tensorboard=false",
       "threads=1"]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_in_the_final_evaluation_prints_the_resume_command(tmp_path: Path, sig: int, code: int) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([*metarun_command(), "train", *RUN, f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists():  # written after the last training step, just before the test evaluation
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted during final test evaluation after step 2" in out, out
    resume = next(line for line in out.splitlines() if line.startswith("resume with: "))
    assert resume.endswith(f"ckpt_path={last}")
    assert not (run_dir / "results.json").exists()
    if sig != signal.SIGTERM:
        return
    # the printed command finishes the run: the evaluation again, nothing trained twice
    logged = (run_dir / "metrics.jsonl").read_text()
    resumed = run_metarun(*shlex.split(resume.removeprefix("resume with: "))[1:])
    assert resumed.returncode == 0, resumed.stderr
    results = read_results(run_dir)
    assert results["steps"] == 2 and results["tasks"] == 20000
    assert (run_dir / "metrics.jsonl").read_text() == logged
