"""`metarun check RESULTS.json... --baseline BASELINE.json`: the CI regression guard.

The baseline has one entry per setting, the setting `metarun report` groups by (`report.setting_of`: the
run's overrides minus the keys in `report.NOT_A_SETTING`: seed, data roots and caches, output paths,
logging, device, threads), and metric. Runs that differ in anything else (ways, shots, preset, a learning
rate, `algo.init_from`) are separate entries, each checked against its own figure.

Seeds of one setting pool, as in `report`: an entry holds the mean over the seeds given to `--update` and
the 95% CI of that mean (`report.pooled_figure`: the mean per-run CI, which more seeds scored on the same
fixed task pool do not shrink, combined with the seeds' spread 1.96 * std / sqrt(n); one run: its own CI),
with the seeds and per-run figures it came from. A check pools the given runs of each setting the same way
and compares that mean with the entry's. It fails when worse than the entry by more than the tolerance, or
worse by more than the combined CI sqrt(ci_new^2 + ci_baseline^2); a setting without an entry fails too.
The seeds need not be the baseline's (the table shows both); the same seeds on an unchanged program
reproduce the entry exactly on CPU. Exit 1 when anything fails, 2 on bad input.

`--update` writes the entries of the given runs' settings (all their given seeds, replacing that setting's
entry) and keeps every other setting's entry. A baseline of the old format (entries keyed by
algo/model/benchmark/split/metric, which mixed settings) is refused with one line: re-create it with
`--update`, which then starts a new file.
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
from metarun.report import Group, find_results, group_runs, load_run
from metarun.stats import higher_is_better

FORMAT = "metarun-baseline-v2"


def entry_key(group: Group) -> str:
    """`<setting> [<metric>]`: report's setting, so that no two settings share an entry."""
    return f"{group.setting} [{group.metric}]"


def entry(group: Group) -> dict[str, Any]:
    mean, ci95 = group.pooled()
    runs = [{k: r.results.get(k) for k in ("seed", "mean", "ci95", "tasks", "steps")} for r in group.runs]
    runs.sort(key=lambda r: _seed_order(r["seed"]))
    return {"setting": group.setting, "metric": group.metric, "mean": mean, "ci95": ci95,
            "seeds": sorted({r["seed"] for r in runs}, key=_seed_order), "runs": runs}


def _seed_order(seed: Any) -> tuple[bool, float, str]:
    return (not isinstance(seed, int), seed if isinstance(seed, int) else 0, str(seed))


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


def read_baseline(path: Path, updating: bool = False) -> dict[str, Any]:
    """The entries of a baseline file. An old-format file is refused with one line, or, when `updating`,
    replaced (its entries cannot be told apart by setting)."""
    if not path.is_file():
        if updating:
            return {}
        raise UserInputError(f"baseline not found: {path} (create it with --update)")
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserInputError(f"{path} is not a metarun baseline (write one with --update)") from None
    if data.get("format") != FORMAT:
        if updating:
            console.print(f"[yellow]{path}: old-format baseline (keyed by algo/model/benchmark/split/metric); "
                          f"its {len(entries)} entries are dropped and the file re-created by setting")
            return {}
        raise UserInputError(f"{path} is an old-format baseline keyed by algo/model/benchmark/split/metric, which "
                             f"mixes settings; re-create it: metarun check RESULTS... --baseline {path} --update")
    return entries


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metarun check", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files or directories holding them")
    parser.add_argument("--baseline", required=True, help="baseline JSON (written by --update)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="allowed absolute degradation (accuracy as a fraction, or MSE); default 0.01")
    parser.add_argument("--update", action="store_true",
                        help="write the given runs' settings into the baseline (other settings' entries kept), exit 0")
    ns = parser.parse_args(args)
    groups = group_runs([load_run(p) for p in find_results(ns.results)])
    baseline_path = Path(ns.baseline)
    entries = read_baseline(baseline_path, updating=ns.update)
    if ns.update:
        written = {entry_key(g): entry(g) for g in groups}
        entries.update(written)
        try:
            text = json.dumps({"format": FORMAT, "entries": entries}, indent=2, sort_keys=True)
            baseline_path.write_text(text + "\n")
        except OSError as ex:
            raise UserInputError(f"cannot write baseline {baseline_path}: {ex.strerror or ex}") from None
        console.print(f"baseline {baseline_path}: {len(written)} settings written, {len(entries)} entries in all")
        return
    table = Table(title=f"metarun check against {baseline_path} (tolerance {ns.tolerance:g}; mean over seeds)")
    for col in ("setting", "metric", "seeds: new / baseline", "baseline", "new", "difference", "verdict"):
        table.add_column(col, justify="left" if col in ("setting", "verdict") else "right")
    failed = 0
    for group in groups:
        new = entry(group)
        old = entries.get(entry_key(group))
        seeds = ",".join(map(str, new["seeds"]))
        shown = f"{new['mean']:.4f} ± {new['ci95']:.4f}"
        if old is None:
            table.add_row(group.setting, group.metric, f"{seeds} / -", "-", shown, "-",
                          "[red]FAIL: no baseline entry (add it with --update)")
            failed += 1
            continue
        _, word = verdict(new, old, ns.tolerance)
        failed += word.startswith("FAIL")
        style = "red" if word.startswith("FAIL") else "green"
        table.add_row(group.setting, group.metric, f"{seeds} / {','.join(map(str, old.get('seeds', [])))}",
                      f"{old['mean']:.4f} ± {old['ci95']:.4f}", shown, f"{new['mean'] - old['mean']:+.4f}",
                      f"[{style}]{word}")
    console.print(table)
    if failed:
        console.print(f"[red]{failed} of {len(groups)} settings regressed or have no baseline entry")
        sys.exit(1)
    console.print(f"[green]all {len(groups)} settings within tolerance")
