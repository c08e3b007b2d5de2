"""torchrun with 2 CPU processes (gloo) gives the single-process metrics within float tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_results, run_metarun

ARGS = ["debug=smoke", "trainer.steps=6", "trainer.meta_batch_size=4", "trainer.eval_every=3", "logger.console=false"]


def _metrics(run_dir: Path) -> list[dict]:
    """The logged rows without their wall-clock `time`, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    assert run_metarun("train", *ARGS, f"hydra.run.dir={single}").returncode == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
         "-m", "metarun", "train", *ARGS, f"hydra.run.dir={double}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = read_results(single), read_results(double)
    assert b["world_size"] == 2
    assert b["mean"] == pytest.approx(a["mean"], rel=1e-5)
    rows_a, rows_b = _metrics(single), _metrics(double)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ra.keys() - {"step"}:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), key


def test_meta_batch_must_divide_across_processes() -> None:
    import torch

    from metarun.distributed import Distributed
    from metarun.errors import UserInputError

    two_ranks = Distributed(torch.device("cpu"))
    two_ranks.world_size = 2  # the check alone, without spawning processes
    with pytest.raises(UserInputError, match="divisible"):
        two_ranks.check_divides(3)
