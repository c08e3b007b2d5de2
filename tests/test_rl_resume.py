"""RL^2 resumed after kill -9 ends exactly as a run that never stopped: metrics.jsonl and results.json (return,
every return@k, regret) identical.

RL is where resume is easiest to get subtly wrong: a training step draws tasks (the trainer's generator), rolls the
policy out (counter-based noise keyed by the task seeds), then shuffles PPO's minibatches (the algorithm's own
generator) and takes several Adam steps. A run of a handful of tiny steps ends in a second or two, far too fast to
aim a `kill -9` from outside at a known step, so the killed run is the real CLI started through a small driver that
SIGKILLs its own process in the middle of step 4 (PPO's third minibatch update), after step 3's last.pt was written:
nothing is flushed, closed or saved, the situation a crashed or OOM-killed job leaves. Every first run (uninterrupted
and killed, both models) starts at once, threads=1 each: they are mostly start-up (~35 s in all on a loaded
2-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from metarun.checkpoint import load_checkpoint
from tests.conftest import metarun_command, read_results

KILL_AFTER = 3  # the step whose last.pt the killed run leaves behind

COMMON = ["algo=rl2", "benchmark=bandit", "benchmark.pulls=5", "trainer.meta_batch_size=8", "trainer.steps=6",
          "trainer.checkpoint_every=1", "trainer.log_every=1", "trainer.eval_every=2", "trainer.val_tasks=8",
          "trainer.eval_tasks=8", "logger.console=false", "logger.tensorboard=false", "threads=1"]
MODELS = {"gru": ["model=gru", "model.hidden=16"],
          "transformer": ["model=transformer", "model.width=16", "model.depth=1", "model.heads=2"]}

# The killed run: `metarun train` in-process, with the trainer's checkpoint writer and RL^2's loss wrapped so that
# the process SIGKILLs itself at PPO's third update of the step after `kill_after` (mid-step: rollouts collected,
# two optimizer steps taken and lost). Runs as `python -c DRIVER kill_after overrides...`.
DRIVER = """
import os, signal, sys
import metarun.trainer as trainer
from metarun.algorithms.rl2 import RL2
from metarun.cli import main

kill_after, calls = int(sys.argv[1]), []
save = trainer.save_checkpoint

def save_and_arm(state, path):
    save(state, path)
    if path.name == "last.pt" and state["step"] == kill_after:
        calls.append("armed")

loss = RL2.meta_loss

def loss_or_die(self, batch):
    if calls:
        calls.append("update")
        if len(calls) == 4:  # the third minibatch update of the step after kill_after
            os.kill(os.getpid(), signal.SIGKILL)
    return loss(self, batch)

trainer.save_checkpoint, RL2.meta_loss = save_and_arm, loss_or_die
main(["train", *sys.argv[2:]])
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _metrics(run_dir: Path) -> list[dict]:
    """The logged rows without their wall-clock `time`, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _results(run_dir: Path) -> dict:
    results = read_results(run_dir)
    results.pop("train_seconds")
    return results


@dataclass
class Launched:
    """One model's uninterrupted run and killed run, started together."""

    whole: Path
    killed: Path
    overrides: list[str]
    runs: list[subprocess.Popen]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Launched]]:
    """Every model's two first runs at once (each is mostly start-up: imports, Hydra), so the module's wall time
    is about one model's runs plus the resumes, not the sum."""
    started: dict[str, Launched] = {}
    for model, extra in MODELS.items():
        root = tmp_path_factory.mktemp(model)
        whole, killed, overrides = root / "whole", root / "killed", [*COMMON, *extra]
        runs = [subprocess.Popen([*metarun_command(), "train", *overrides, f"hydra.run.dir={whole}"], env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                subprocess.Popen([sys.executable, "-c", DRIVER, str(KILL_AFTER), *overrides,
                                  f"hydra.run.dir={killed}"], env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)]
        started[model] = Launched(whole, killed, overrides, runs)
    yield started
    for launch in started.values():
        for run in launch.runs:
            if run.poll() is None:
                run.kill()
                run.communicate()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_rl2_kill_9_then_resume_is_exact(launched: dict[str, Launched], model: str) -> None:
    launch = launched[model]
    whole, killed = launch.whole, launch.killed
    (_, whole_err), (_, killed_err) = (run.communicate(timeout=240) for run in launch.runs)
    assert launch.runs[0].returncode == 0, whole_err
    assert launch.runs[1].returncode == -signal.SIGKILL, f"the driver was not killed mid-run: {killed_err}"
    last = killed / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["step"] == KILL_AFTER
    assert max(row["step"] for row in _metrics(killed)) == KILL_AFTER, "killed during step 4: nothing of it logged"
    assert not (killed / "results.json").exists()

    resumed = subprocess.run([*metarun_command(), "train", *launch.overrides, f"ckpt_path={last}"], env=_env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _results(whole), _results(killed)  # resuming continues in the checkpoint's run directory
    assert {"return", "regret", *(f"return@{k}" for k in range(1, 6))} <= set(a["metrics"])
    assert a == b
    rows_a, rows_b = _metrics(whole), _metrics(killed)
    assert [r["step"] for r in rows_a if "train/return" in r] == list(range(1, 7))
    assert rows_a == rows_b
    assert (whole / "scores.json").read_text() == (killed / "scores.json").read_text()  # per-task test values
