"""`metarun report DIR...`: every results.json under the given directories, grouped by the swept
settings, aggregated over seeds, printed as a table and optionally written as md, csv or json.
`--paper` keeps the runs of presets with a published figure: the paper-reproduction table.

A group is the run's command-line overrides minus the seed (and minus settings that do not change
the result: output paths, logging, device); a `metarun eval` result adds the overrides of the training
run that wrote its checkpoint. Per group: the mean over seeds, the spread across seeds
(sample std), the mean of the per-run 95% CIs, and the number of runs. When the run's config carries
a published figure (`paper:` in an experiment preset), it is shown beside ours.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.table import Table

from metarun.checkpoint import checkpoint_run_dir, run_overrides
from metarun.console import console
from metarun.errors import UserInputError

# Overrides that name where or how a run was recorded, not what it computed.
_NOT_A_SETTING = ("seed=", "hydra.", "ckpt_path=", "logger.", "device=", "trainer.log_every=", "trainer.eval_batch_size=")


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    setting: str
    paper: dict[str, Any] | None = None


@dataclass
class Group:
    setting: str
    metric: str
    runs: list[Run] = field(default_factory=list)

    @property
    def means(self) -> list[float]:
        return [r.results["mean"] for r in self.runs]

    def row(self) -> dict[str, Any]:
        means = self.means
        paper = next((r.paper for r in self.runs if r.paper), None)
        mean_ci = statistics.fmean(r.results["ci95"] for r in self.runs)
        return {
            "setting": self.setting, "metric": self.metric, "runs": len(means),
            "seeds": sorted({r.results.get("seed") for r in self.runs}),
            "mean": statistics.fmean(means),
            "seed_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "mean_ci95": statistics.fmean(r.results["ci95"] for r in self.runs),
            "tasks": self.runs[0].results.get("tasks"),
            "paper_mean": None if not paper else paper.get("mean"),
            "paper_ci95": None if not paper else paper.get("ci95"),
            **paper_verdict(statistics.fmean(means), mean_ci, paper),
        }


def paper_verdict(mean: float, ci95: float, paper: dict[str, Any] | None) -> dict[str, Any]:
    """Our figure against the published one: within the combined 95% CIs, above, or below."""
    if not paper or paper.get("mean") is None:
        return {"paper_diff": None, "paper_verdict": None}
    diff = mean - float(paper["mean"])
    combined = (ci95**2 + float(paper.get("ci95") or 0.0) ** 2) ** 0.5
    verdict = "within CIs" if abs(diff) <= combined else ("above" if diff > 0 else "below")
    return {"paper_diff": diff, "paper_verdict": verdict}


def find_results(paths: list[str]) -> list[Path]:
    """results.json files: the paths themselves when they are files, else everything below them."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("results.json")))
        else:
            raise UserInputError(f"no such file or directory: {path}")
    if not found:
        raise UserInputError(f"no results.json under {', '.join(paths)}; train first (metarun train ...)")
    return found


def load_run(path: Path) -> Run:
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as ex:
        raise UserInputError(f"cannot read {path}: {ex}") from None
    if not isinstance(results, dict) or not {"metric", "mean", "ci95"} <= results.keys():
        raise UserInputError(f"{path} is not a metarun results.json (needs metric, mean, ci95)")
    hydra_dir = path.parent / ".hydra"
    overrides = _training_overrides(results) + run_overrides(path.parent)
    paper = None
    if isinstance(results.get("paper"), dict) and "mean" in results["paper"]:
        paper = results["paper"]
    elif (hydra_dir / "config.yaml").exists():
        cfg = OmegaConf.load(hydra_dir / "config.yaml")
        paper_node = cfg.get("paper")
        if paper_node is not None and "mean" in paper_node:
            paper = OmegaConf.to_container(paper_node)
    by_key = {o.split("=", 1)[0].lstrip("+"): o for o in overrides}  # the eval's own overrides win
    kept = sorted(o for o in by_key.values() if not o.startswith(_NOT_A_SETTING))
    base = f"{results.get('algo')}/{results.get('model')}/{results.get('benchmark')} ({results.get('split', 'test')})"
    setting = base + (" " + " ".join(o for o in kept if not o.split("=")[0] in ("algo", "model", "benchmark"))
                      if kept else "")
    return Run(path, results, setting.strip(), paper)


def _training_overrides(results: dict[str, Any]) -> list[str]:
    """For a `metarun eval` result: the overrides of the run that wrote the checkpoint, so that scores of
    different presets' checkpoints never pool as seeds of one setting. If that run's directory is gone,
    the checkpoint itself names the setting (such runs only group with evaluations of the same file)."""
    checkpoint = results.get("checkpoint")
    if not checkpoint:
        return []
    training_run = checkpoint_run_dir(checkpoint)
    if (training_run / ".hydra").is_dir():
        return run_overrides(training_run)
    return [f"checkpoint={checkpoint}"]


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[tuple[str, str], Group] = {}
    for run in runs:
        key = (run.setting, run.results["metric"])
        groups.setdefault(key, Group(run.setting, run.results["metric"])).runs.append(run)
    return list(groups.values())


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}" if metric == "accuracy" else f"{value:.4f}"


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    headers = ["setting", "metric", "runs", "mean", "seed std", "mean 95% CI", "paper", "difference", "verdict"]
    lines = []
    for r in rows:
        paper = "-" if r["paper_mean"] is None else f"{_fmt(r['paper_mean'], r['metric'])} ± {_fmt(r['paper_ci95'], r['metric'])}"
        lines.append([r["setting"], r["metric"] + (" %" if r["metric"] == "accuracy" else ""), str(r["runs"]),
                      _fmt(r["mean"], r["metric"]), _fmt(r["seed_std"], r["metric"]), _fmt(r["mean_ci95"], r["metric"]),
                      paper, "-" if r["paper_diff"] is None else _fmt(r["paper_diff"], r["metric"]),
                      r["paper_verdict"] or "-"])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(headers)
        writer.writerows(lines)
        return buffer.getvalue()
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="metarun report: mean over seeds, spread across seeds, mean per-run 95% CI")
    for col in ("setting", "metric", "runs", "mean", "seed std", "mean 95% CI", "paper", "difference", "verdict"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for line in render(rows, "csv").splitlines()[1:]:
        table.add_row(*next(csv.reader([line])))
    console.print(table)


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metarun report", description="Tabulate results.json files over seeds.")
    parser.add_argument("paths", nargs="+", help="run directories, multirun directories or results.json files")
    parser.add_argument("--format", choices=("md", "csv", "json"), help="also write the table in this format")
    parser.add_argument("--output", "-o", help="file to write (default: stdout)")
    parser.add_argument("--paper", action="store_true",
                        help="only runs of presets with a published figure: ours beside the paper's, with a verdict")
    ns = parser.parse_args(args)
    rows = [g.row() for g in group_runs([load_run(p) for p in find_results(ns.paths)])]
    if ns.paper:
        rows = [r for r in rows if r["paper_mean"] is not None]
        if not rows:
            raise UserInputError("no run under the given paths has a published figure (a `paper:` mean in its "
                                 "preset); run an experiment preset, e.g. metarun train experiment=maml_sine")
    rows.sort(key=lambda r: r["setting"])
    if ns.format and not ns.output:
        sys.stdout.write(render(rows, ns.format))
        return
    print_table(rows)
    if ns.format:
        Path(ns.output).write_text(render(rows, ns.format))
        console.print(f"wrote {ns.output}")
