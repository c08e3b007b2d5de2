"""Which figures `metarun report` draws from its groups, in the order the HTML page shows them: a results
chart per metric, metric against adaptation step for groups that scored each step, and one learning-curve
figure per group. Runs without metrics.jsonl get no curve (a note names them); none having one is an error."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from metarun.errors import UserInputError
from metarun.figures import adaptation, learning_curves, results_chart
from metarun.figures.labels import figure_stem, short_labels
from metarun.figures.output import RenderedFigure, render
from metarun.figures.series import SeedBand, across_seeds, has_time, metrics_path, read_metrics, series_of
from metarun.report import Group, pooled_figure


@dataclass
class ReportFigures:
    figures: list[RenderedFigure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out and why, one line each


def report_figures(groups: list[Group], x: str = "step") -> ReportFigures:
    out = ReportFigures()
    for metric, of_metric in _by_metric(groups):
        out.figures.append(_results_figure(metric, of_metric))
        stepped = [g for g in of_metric if _adaptation_steps(g)]
        if stepped:
            out.figures.append(_adaptation_figure(metric, stepped))
    _learning_curves(groups, x, out)
    return out


def _by_metric(groups: list[Group]) -> Iterable[tuple[str, list[Group]]]:
    metrics = sorted({g.metric for g in groups})
    return [(m, [g for g in groups if g.metric == m]) for m in metrics]


def _split(groups: list[Group]) -> str:
    splits = {g.runs[0].results.get("split", "test") for g in groups}
    return splits.pop() if len(splits) == 1 else ""


def _legend_key(labels: list[str], groups: list[Group]) -> str:
    return "; ".join(f"{label} = {g.setting}" for label, g in zip(labels, groups) if label != g.setting)


def _results_figure(metric: str, groups: list[Group]) -> RenderedFigure:
    labels = short_labels(groups)
    bars = []
    for label, group in zip(labels, groups):
        row = group.row()
        same_metric = row["figure_metric"] == metric
        bars.append(results_chart.Bar(label, row["mean"], row["ci95"], row["figure"] if same_metric else None,
                                      row["figure_mean"] if same_metric else None,
                                      row["figure_ci95"] if same_metric else None))
    kinds = {b.figure_kind for b in bars}
    legend = (("paper", " Diamond: the preset's published figure."),
              ("reference", " Open circle: our own reference figure."))
    markers = "".join(text for kind, text in legend if kind in kinds)
    caption = (f"{_split(groups)} {metric} per setting: mean over seeds with its 95% CI (the task pool's CI and the "
               f"seeds' spread combined, as metarun check pools seeds; the table's mean 95% CI is the task-pool part "
               f"alone).{markers} {_legend_key(labels, groups)}").strip()
    figure = results_chart.draw(metric, bars, _split(groups) or "")
    return render(figure, figure_stem("results", metric), "results", metric, tuple(g.setting for g in groups),
                  caption)


_STEP = re.compile(r"^(?P<metric>[^@]+)@(?P<step>\d+)$")


def _adaptation_steps(group: Group) -> list[int]:
    """The steps k with `metric@k` in every run of the group ([] for learners without adaptation steps)."""
    per_run = []
    for run in group.runs:
        keys = (run.results.get("metrics") or {}).keys()
        per_run.append({int(m["step"]) for m in map(_STEP.match, keys) if m and m["metric"] == group.metric})
    common = set.intersection(*per_run) if per_run else set()
    return sorted(common) if len(common) > 1 else []


def _adaptation_figure(metric: str, groups: list[Group]) -> RenderedFigure:
    labels = short_labels(groups)
    lines = []
    for label, group in zip(labels, groups):
        steps = _adaptation_steps(group)
        pooled = [pooled_figure([r.results["metrics"][f"{metric}@{k}"]["mean"] for r in group.runs],
                                [r.results["metrics"][f"{metric}@{k}"]["ci95"] for r in group.runs]) for k in steps]
        row = group.row()
        at_step = _STEP.match(row["figure_metric"] or "")
        marked = at_step is not None and at_step["metric"] == metric and int(at_step["step"]) in steps
        lines.append(adaptation.StepLine(label, steps, [p[0] for p in pooled], [p[1] for p in pooled],
                                         row["figure"] if marked else None,
                                         int(at_step["step"]) if marked and at_step else None,
                                         row["figure_mean"] if marked else None,
                                         row["figure_ci95"] if marked else None))
    marked = " The preset's figure at its step." if any(line.figure_kind for line in lines) else ""
    caption = (f"{_split(groups)} {metric} after each adaptation step ({metric}@0 is before adapting): mean over "
               f"seeds with its 95% CI.{marked} {_legend_key(labels, groups)}").strip()
    figure = adaptation.draw(metric, lines, _split(groups) or "")
    return render(figure, figure_stem("adaptation", metric), "adaptation", metric, tuple(g.setting for g in groups),
                  caption)


def _learning_curves(groups: list[Group], x: str, out: ReportFigures) -> None:
    logged: dict[Path, list[dict]] = {}
    missing: list[str] = []
    for group in groups:
        for run in group.runs:
            path = metrics_path(run.path, run.results)
            if path is None:
                missing.append(str(run.path.parent))
            else:
                logged[run.path] = read_metrics(path)
    if not logged:
        raise UserInputError(f"no run has a metrics.jsonl (e.g. {missing[0]}): learning curves are read from the "
                             f"metrics.jsonl that metarun train writes into its run directory")
    if missing:
        out.notes.append(f"no learning curve from {len(missing)} run(s) without metrics.jsonl: {', '.join(missing)}")
    if x == "time":
        untimed = [p for p, rows in logged.items() if not has_time(rows)]
        if len(untimed) == len(logged):
            raise UserInputError("--x time: no metrics.jsonl records wall time (a `time` key, seconds since the run "
                                 "started, on each line); plot against meta-iterations instead (--x step)")
        if untimed:
            out.notes.append(f"--x time: left out {len(untimed)} run(s) whose metrics.jsonl records no wall time: "
                             f"{', '.join(str(p.parent) for p in untimed)}")
        logged = {p: rows for p, rows in logged.items() if p not in untimed}
    for group in groups:
        runs = [logged[r.path] for r in group.runs if r.path in logged]
        if not runs:
            continue
        train, val = (_band(runs, key, x) for key in _curve_keys(group.metric, runs))
        if train is None and val is None:
            out.notes.append(f"no learning curve for {group.setting}: its seeds share no logged step of {group.metric}")
            continue
        figure = learning_curves.draw(group.setting, group.metric, train, val, x)
        band = f"mean of {len(runs)} seeds, band ±1 s.d. across seeds" if len(runs) > 1 else "1 seed"
        caption = (f"{group.setting}: training and validation {group.metric} against "
                   f"{'meta-iterations' if x == 'step' else 'wall time'}, {band}. Training: the meta-batch's query "
                   f"{group.metric} after the training adaptation, averaged over each logging window; validation: the "
                   f"fixed validation pool, adapted as at test time (MAML family: algo.eval_inner_steps, which may be "
                   f"more steps than training takes).")
        stem = figure_stem("curves", f"{group.setting} {group.metric} {x}")
        out.figures.append(render(figure, stem, "learning_curves", group.metric, (group.setting,), caption))


def _curve_keys(metric: str, runs: list[list[dict]]) -> tuple[str, str]:
    """(training key, validation key). A regression's training metric is its loss, logged once as train/loss."""
    logged = {key for rows in runs for row in rows for key in row}
    train = f"train/{metric}" if f"train/{metric}" in logged or metric != "mse" else "train/loss"
    return train, f"val/{metric}"


def _band(runs: list[list[dict]], key: str, x: str) -> SeedBand | None:
    found = [s for s in (series_of(rows, key) for rows in runs) if s is not None]
    return across_seeds(found, x) if found else None
