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
import sys

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


if __name__ == "__main__":
    results = [run(argv) for argv in json.load(sys.stdin)]
    sys.__stdout__.write(json.dumps(results))
