"""`metarun compare BASELINE RUN...`: is a method better than another on the same tasks?

Two runs scored on the same task pool (same benchmark settings, split, pool seed and number of tasks)
are compared task by task: the mean of the per-task differences with its 95% CI, and how many tasks each
side wins. Pairing removes the spread of task difficulty that both runs share, so the difference's CI is
narrower than the two runs' CIs side by side, which overlap long before the difference is insignificant.
`--plot DIR` draws the per-task differences as a histogram with their mean and its CI (metarun.figures).
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
from metarun.scores import comparable_pool, load_scores
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


def finite_pairs(metric: str, baseline: list[float], run: list[float]) -> list[tuple[float, float]]:
    """(baseline, run) per task, leaving out tasks where either is not finite (a diverged adaptation)."""
    if len(baseline) != len(run):
        raise UserInputError(f"{metric}: {len(baseline)} vs {len(run)} per-task values; the pools differ")
    pairs = [(b, r) for b, r in zip(baseline, run) if math.isfinite(b) and math.isfinite(r)]
    if not pairs:
        raise UserInputError(f"{metric}: no task has finite values in both runs")
    return pairs


def paired_difference(metric: str, baseline: list[float], run: list[float]) -> PairedDifference:
    pairs = finite_pairs(metric, baseline, run)
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
    base, other = paired_scores(baseline, run)
    metrics = [m for m in base["scores"] if m in other["scores"]]
    return [paired_difference(m, base["scores"][m], other["scores"][m]) for m in metrics]


def paired_scores(baseline: Path, run: Path) -> tuple[dict, dict]:
    """Both runs' scores.json, refused unless they were scored on the same task pool."""
    base, other = load_scores(baseline), load_scores(run)
    base_pool, other_pool = comparable_pool(base["pool"]), comparable_pool(other["pool"])
    if base_pool != other_pool:
        differing = "; ".join(_differences(base_pool, other_pool))
        raise UserInputError(f"{run} and {baseline} were scored on different task pools ({differing}); re-score one "
                             f"with the other's settings: metarun eval ckpt_path=<run>/checkpoints/best.pt key=value")
    return base, other


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metarun compare", description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="run directory (or its scores.json) to compare against")
    parser.add_argument("runs", nargs="+", help="run directories (or scores.json files) scored on the same pool")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="DIR",
                        help="write a histogram of the per-task differences (PNG and SVG) per run and headline "
                             "metric into DIR (needs matplotlib: pip install \".[plot]\")")
    ns = parser.parse_args(args)
    results = {run: compare_runs(Path(ns.baseline), Path(run)) for run in ns.runs}
    if ns.plot:
        _plot(Path(ns.baseline), results, ns.plot)
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


def _plot(baseline: Path, results: dict[str, list[PairedDifference]], folder: str) -> None:
    """Histograms of run - baseline per task, for the headline metrics (`accuracy`, `mse`; not each `mse@k`).
    matplotlib is imported here, only when asked for."""
    from metarun.figures.backend import load_matplotlib

    load_matplotlib()
    from metarun.console import error_console
    from metarun.figures import paired
    from metarun.figures.labels import figure_stem
    from metarun.figures.output import prepare_folder, render, write_figures

    out = prepare_folder(folder)
    figures = []
    for run, diffs in results.items():
        base, other = paired_scores(baseline, Path(run))
        for summary in (d for d in diffs if "@" not in d.metric):
            pairs = finite_pairs(summary.metric, base["scores"][summary.metric], other["scores"][summary.metric])
            title = f"{_short(Path(run))} − {_short(baseline)}"
            caption = (f"{summary.metric} of {run} minus {baseline}, task by task on the same {summary.tasks} tasks: "
                       f"the mean difference with its 95% CI (shaded) and zero; verdict: {summary.verdict}.")
            figure = paired.draw(title, [r - b for b, r in pairs], summary)
            figures.append(render(figure, figure_stem("paired", f"{Path(run).name} {summary.metric} {run} {baseline}"),
                                  "paired_difference", summary.metric, (str(baseline), run), caption))
    index = write_figures(out, figures)
    error_console.print(f"wrote {len(figures)} figures (PNG and SVG) to {out}; which is which: {index}", markup=False)


def _short(path: Path) -> str:
    """The last two parts of a run's path, enough to tell runs apart in a title (captions keep the whole)."""
    return "/".join(path.resolve().parts[-2:]) if path.is_dir() else "/".join(path.resolve().parts[-3:-1])


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

