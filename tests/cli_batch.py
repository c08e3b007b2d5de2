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
from tests.image_fixtures import metarun_env


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


def start_in_one_process(argvs: list[list[str]], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start this driver on the command lines without waiting (so it can run beside other processes); the
    environment is `metarun`'s in the tests (tests/image_fixtures.metarun_env) with the project root importable."""
    root = str(Path(__file__).resolve().parent.parent)
    full_env = metarun_env(env)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "tests.cli_batch"], cwd=cwd, env=full_env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(argvs))  # read whole by the driver before it runs anything
    proc.stdin.close()
    proc.stdin = None  # written and closed: communicate() must not flush it
    return proc


def finish_in_one_process(proc: subprocess.Popen[str], argvs: list[list[str]],
                          timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """Wait for a started driver: each command line's outcome, as if it had run as a process of its own."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"tests/cli_batch.py exited {proc.returncode}:\n{stderr[-3000:]}"
    return [subprocess.CompletedProcess(["metarun", *argv], r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(argvs, json.loads(stdout), strict=True)]


def run_in_one_process(argvs: list[list[str]], cwd: Path, env: dict[str, str] | None = None,
                       timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """The command lines run by this driver in one fresh interpreter, each as a CompletedProcess."""
    return finish_in_one_process(start_in_one_process(argvs, cwd, env), argvs, timeout)


if __name__ == "__main__":
    results = [run(argv) for argv in json.load(sys.stdin)]
    sys.__stdout__.write(json.dumps(results))
