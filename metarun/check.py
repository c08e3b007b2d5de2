"""`metarun check RESULTS.json... --baseline BASELINE.json`: the CI regression guard.

Each result is matched to its baseline entry by algo/model/benchmark/split/metric. A result fails
when it is worse than the baseline by more than the tolerance, or worse by more than the combined
95% confidence interval sqrt(ci_new^2 + ci_old^2). Exit 1 when anything fails, 2 on bad input.
`--update` writes the given results as the new baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from metarun.console import console
from metarun.errors import UserInputError
from metarun.report import find_results, load_run
from metarun.stats import higher_is_better


def entry_key(results: dict[str, Any]) -> str:
    return "/".join(str(results.get(k)) for k in ("algo", "model", "benchmark", "split", "metric"))


def verdict(new: dict[str, Any], old: dict[str, Any], tolerance: float) -> tuple[float, str]:
    """(signed improvement, verdict) where verdict is 'pass', 'better' or a failure reason starting 'FAIL'."""
    sign = 1.0 if higher_is_better(new["metric"]) else -1.0
    improvement = sign * (new["mean"] - old["mean"])
    if not math.isfinite(new["mean"]):
        return improvement, "FAIL: not finite"
    combined = math.hypot(new.get("ci95", 0.0), old.get("ci95", 0.0))
    if -improvement > tolerance:
        return improvement, f"FAIL: worse by more than the tolerance {tolerance:g}"
    if -improvement > combined:
        return improvement, f"FAIL: worse beyond the combined 95% CI {combined:.4g}"
    return improvement, "better" if improvement > combined else "pass"


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metarun check", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files or directories holding them")
    parser.add_argument("--baseline", required=True, help="baseline JSON (written by --update)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="allowed absolute degradation (accuracy as a fraction, or MSE); default 0.01")
    parser.add_argument("--update", action="store_true", help="write these results as the baseline and exit 0")
    ns = parser.parse_args(args)
    runs = [load_run(p) for p in find_results(ns.results)]
    baseline_path = Path(ns.baseline)
    if ns.update:
        entries = json.loads(baseline_path.read_text())["entries"] if baseline_path.exists() else {}
        for run in runs:
            r = run.results
            entries[entry_key(r)] = {k: r.get(k) for k in ("metric", "mean", "ci95", "tasks", "steps", "seed")}
        baseline_path.write_text(json.dumps({"entries": entries}, indent=2, sort_keys=True) + "\n")
        console.print(f"baseline {baseline_path}: {len(entries)} entries written")
        return
    if not baseline_path.is_file():
        raise UserInputError(f"baseline not found: {baseline_path} (create it with --update)")
    try:
        entries = json.loads(baseline_path.read_text())["entries"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserInputError(f"{baseline_path} is not a metarun baseline (write one with --update)") from None
    table = Table(title=f"metarun check against {baseline_path} (tolerance {ns.tolerance:g})")
    for col in ("result", "metric", "baseline", "new", "difference", "verdict"):
        table.add_column(col, justify="left" if col in ("result", "verdict") else "right")
    failed = 0
    for run in runs:
        r = run.results
        key = entry_key(r)
        old = entries.get(key)
        if old is None:
            table.add_row(key, r["metric"], "-", f"{r['mean']:.4f} ± {r['ci95']:.4f}", "-", "FAIL: no baseline entry")
            failed += 1
            continue
        improvement, word = verdict(r, old, ns.tolerance)
        failed += word.startswith("FAIL")
        style = "red" if word.startswith("FAIL") else "green"
        table.add_row(key, r["metric"], f"{old['mean']:.4f} ± {old['ci95']:.4f}", f"{r['mean']:.4f} ± {r['ci95']:.4f}",
                      f"{r['mean'] - old['mean']:+.4f}", f"[{style}]{word}")
    console.print(table)
    if failed:
        console.print(f"[red]{failed} of {len(runs)} results regressed")
        sys.exit(1)
    console.print(f"[green]all {len(runs)} results within tolerance")
