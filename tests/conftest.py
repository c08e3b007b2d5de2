"""Shared test helpers: run the installed `metarun` command as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The same floating-point results on every x86 CPU the suite meets (the golden trajectories are compared at rtol
# 1e-4): PyTorch's own kernels, oneDNN's convolutions and MKL's BLAS all pick their code path by the CPU's
# instruction set, and AVX-512 and AVX2 paths round differently (measured: ProtoNet's Conv-4 golden case moved by
# 1.5e-4 at step 2 and 4e-3 at step 6 between two machines with the same wheels). Capped at AVX2, which every
# machine here has, before torch is imported; subprocesses inherit them. A user's own environment wins.
for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_CBWR", "AVX2")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402


def metarun_command() -> list[str]:
    """The console script beside this interpreter (what `pip install .` puts on PATH), else `python -m metarun`."""
    script = Path(sys.executable).parent / "metarun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "metarun"]


def run_metarun(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None):
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*metarun_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread (a second only adds synchronisation, and on the shared 2-core machine
    PyTorch's threads spin against other jobs'). Opted into per file: `pytestmark = usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `metarun train debug=smoke` run shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_metarun("train", "debug=smoke", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir
