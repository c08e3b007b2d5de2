"""`metarun compare BASELINE RUN...`: is a method better than another on the same tasks?

Two runs scored on the same task pool (same benchmark settings, split, pool seed and number of tasks)
are compared task by task: the mean of the per-task differences with its 95% CI, and how many tasks each
side wins. Pairing removes the spread of task difficulty that both runs share, so the difference's CI is
narrower than the two runs' CIs side by side, which overlap long before the difference is insignificant.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from metarun.console import console
from metarun.errors import UserInputError
from metarun.scores import load_scores
from metarun.stats import higher_is_better, mean_ci95


@dataclass(frozen=True)
class PairedDifference:
    """run - baseline over the tasks where both are finite, with its 95% CI and the tasks each side wins."""

    metric: str
    baseline: float
    run: float
    difference: float
    ci95: float
    tasks: int
    run_better: int
    baseline_better: int
    verdict: str


def paired_difference(metric: str, baseline: list[float], run: list[float]) -> PairedDifference:
    if len(baseline) != len(run):
        raise UserInputError(f"{metric}: {len(baseline)} vs {len(run)} per-task values; the pools differ")
    pairs = [(b, r) for b, r in zip(baseline, run) if math.isfinite(b) and math.isfinite(r)]
    if not pairs:
        raise UserInputError(f"{metric}: no task has finite values in both runs")
    sign = 1.0 if higher_is_better(metric) else -1.0
    estimate = mean_ci95(torch.tensor([r - b for b, r in pairs], dtype=torch.float64))
    run_better = sum(sign * (r - b) > 0 for b, r in pairs)
    baseline_better = sum(sign * (r - b) < 0 for b, r in pairs)
    improvement = sign * estimate.mean
    if improvement > estimate.ci95:
        verdict = "better"
    elif -improvement > estimate.ci95:
        verdict = "worse"
    else:
        verdict = "no difference detected"
    return PairedDifference(metric, statistics.fmean(b for b, _ in pairs), statistics.fmean(r for _, r in pairs),
                            estimate.mean, estimate.ci95, len(pairs), run_better, baseline_better, verdict)


def compare_runs(baseline: Path, run: Path) -> list[PairedDifference]:
    """Paired differences for every metric both runs scored; refuses runs scored on different pools."""
    base, other = load_scores(baseline), load_scores(run)
    if base["pool"] != other["pool"]:
        differing = "; ".join(_differences(base["pool"], other["pool"]))
        raise UserInputError(f"{run} and {baseline} were scored on different task pools ({differing}); re-score one "
                             f"with the other's settings: metarun eval ckpt_path=<run>/checkpoints/best.pt key=value")
    metrics = [m for m in base["scores"] if m in other["scores"]]
    return [paired_difference(m, base["scores"][m], other["scores"][m]) for m in metrics]


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metarun compare", description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="run directory (or its scores.json) to compare against")
    parser.add_argument("runs", nargs="+", help="run directories (or scores.json files) scored on the same pool")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(args)
    results = {run: compare_runs(Path(ns.baseline), Path(run)) for run in ns.runs}
    if ns.json:
        print(json.dumps({run: [asdict(d) for d in diffs] for run, diffs in results.items()}, indent=2))
        return
    table = Table(title=f"paired comparison with {ns.baseline} (run - baseline, same tasks)")
    for name in ("run", "metric", "baseline", "run mean", "difference", "95% CI", "tasks", "run / baseline wins",
                 "verdict"):
        table.add_column(name, justify="left" if name in ("run", "verdict") else "right")
    for run, diffs in results.items():
        for d in diffs:
            percent = d.metric.startswith("accuracy")
            scale, digits = (100.0, 2) if percent else (1.0, 4)
            table.add_row(run, d.metric + (" %" if percent else ""), f"{scale * d.baseline:.{digits}f}",
                          f"{scale * d.run:.{digits}f}", f"{scale * d.difference:+.{digits}f}",
                          f"±{scale * d.ci95:.{digits}f}", str(d.tasks), f"{d.run_better} / {d.baseline_better}",
                          d.verdict)
    console.print(table)


# Pool identity keys as the config keys a user sets.
_CONFIG_KEY = {"tasks": "trainer.eval_tasks or val_tasks", "pool_seed": "trainer.pool_seed", "settings": "benchmark"}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """`key: a vs b` for every leaf where the pools differ, named as config keys."""
    out = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        name = _CONFIG_KEY.get(key, key) if not prefix else f"{prefix}{key}"
        if isinstance(left, dict) and isinstance(right, dict):
            out += _differences(left, right, f"{name}.")
        elif left != right:
            out.append(f"{name}: {right} vs {left}")
    return out

