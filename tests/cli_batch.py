"""Run many `metarun` command lines in one interpreter, torch and Hydra imported once.

A process spends seconds importing torch before it does anything; a test that checks dozens of start-up refusals
(each exits 2 before training) would spend minutes on imports alone. This driver reads a JSON list of argument
lists on stdin, runs each through `metarun.cli.main` exactly as the `metarun` script does, and writes a JSON list
of {"returncode", "stdout", "stderr"} on stdout. Meant for commands that stop at start-up: a run that trains
would leave its state (logging handlers, torch settings) to the next one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from metarun.cli import main


def run(argv: list[str]) -> dict[str, object]:
    """One command line: its exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as ex:
            returncode = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    return {"returncode": returncode, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run_in_one_process(argvs: list[list[str]], cwd: Path, timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """The command lines run by this driver in one fresh interpreter, each as a CompletedProcess."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "tests.cli_batch"], input=json.dumps(argvs), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"tests/cli_batch.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return [subprocess.CompletedProcess(["metarun", *argv], r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(argvs, json.loads(proc.stdout), strict=True)]


if __name__ == "__main__":
    results = [run(argv) for argv in json.load(sys.stdin)]
    sys.__stdout__.write(json.dumps(results))
