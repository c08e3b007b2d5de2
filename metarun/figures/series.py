"""Learning curves as numbers: one run's values of a metrics.jsonl key, and their mean and spread over the
seeds of a setting. Nothing is drawn here, so what a figure shows is testable without matplotlib."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metarun.checkpoint import checkpoint_run_dir
from metarun.errors import UserInputError

METRICS_FILE = "metrics.jsonl"
# Wall time of a logged line, in seconds since the run started (either spelling is read).
TIME_KEYS = ("time", "wall_time")


@dataclass(frozen=True)
class Series:
    """One run's values of one key, in step order; `seconds` when every point recorded its wall time."""

    steps: np.ndarray
    values: np.ndarray
    seconds: np.ndarray | None


@dataclass(frozen=True)
class SeedBand:
    """A key over the seeds of a setting, at the steps every seed logged: x (steps, or mean seconds over
    seeds), the mean, and the sample standard deviation across seeds (0 for one seed)."""

    x: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    seeds: int


def metrics_path(results_path: Path, results: dict[str, Any]) -> Path | None:
    """The run's metrics.jsonl; for a `metarun eval` result (no training of its own), that of the training
    run that wrote its checkpoint. None when there is none."""
    own = results_path.parent / METRICS_FILE
    if own.is_file():
        return own
    checkpoint = results.get("checkpoint")
    trained = checkpoint_run_dir(checkpoint) / METRICS_FILE if checkpoint else None
    return trained if trained is not None and trained.is_file() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The logged lines. A cut-off last line (a run killed while writing it) is dropped; any other line that
    is not a JSON object is an error naming it."""
    try:
        lines = path.read_text().splitlines()
    except OSError as ex:
        raise UserInputError(f"cannot read {path}: {ex}") from None
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserInputError(f"{path} line {number} is not JSON; a metarun metrics.jsonl has one object "
                                 f"per line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserInputError(f"{path} line {number} has no step; a metarun metrics.jsonl logs one per line")
        rows.append(row)
    return rows


def has_time(rows: list[dict[str, Any]]) -> bool:
    return any(key in row for row in rows for key in TIME_KEYS)


def series_of(rows: list[dict[str, Any]], key: str) -> Series | None:
    """The values of `key` by step (a step logged twice keeps its last value); None if never logged."""
    by_step: dict[int, tuple[float, float | None]] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = next((float(row[k]) for k in TIME_KEYS if k in row), None)
            by_step[int(row["step"])] = (float(value), seconds)
    if not by_step:
        return None
    steps = sorted(by_step)
    seconds = [by_step[s][1] for s in steps]
    return Series(np.array(steps), np.array([by_step[s][0] for s in steps]),
                  None if any(t is None for t in seconds) else np.array(seconds, dtype=float))


def across_seeds(runs: list[Series], x: str = "step") -> SeedBand | None:
    """Mean and spread over seeds at the steps all of them logged; x = "time" places each point at the mean
    wall time of the seeds there. None when the seeds share no step (or, for time, one has no wall time)."""
    common = set(runs[0].steps.tolist())
    for run in runs[1:]:
        common &= set(run.steps.tolist())
    if not common or (x == "time" and any(r.seconds is None for r in runs)):
        return None
    steps = np.array(sorted(common))
    picks = [np.searchsorted(r.steps, steps) for r in runs]
    values = np.stack([r.values[i] for r, i in zip(runs, picks)])
    positions = steps.astype(float) if x == "step" else \
        np.stack([r.seconds[i] for r, i in zip(runs, picks) if r.seconds is not None]).mean(axis=0)
    sd = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
    return SeedBand(positions, values.mean(axis=0), sd, len(runs))
