"""`metarun report DIR...`: every results.json under the given directories, grouped by the swept
settings, aggregated over seeds, printed as a table and optionally written as md, csv or json.
`--paper` keeps the runs of presets with a figure to compare with: the paper-reproduction table.

A setting (a group) is the run's command-line overrides minus the keys in NOT_A_SETTING: the seed (seeds
of one setting pool) and what does not change the result (data roots and caches, output paths, logging,
device, threads, a figure typed as `paper.*`). A `metarun eval` result adds the overrides of the training
run that wrote its checkpoint. `setting_of` is the one rule; `metarun check` keys its baseline by it.
`algo.init_from=PATH` stays, in full: the starting weights change the result, and a shortened path could
name two different checkpoints alike. Per group: the mean over seeds, the spread across seeds (sample
std), the mean of the per-run 95% CIs, the number of runs, and `pooled_figure`'s 95% CI of the mean.

A preset's figure is shown beside ours with its kind in the `source` column: `paper:` holds a published
figure ("paper (Snell et al. 2017, Table 1)"), `reference:` one we measured ourselves ("ours (reference)").
When a preset has both, the published one is compared. A figure whose `metric` names a per-step metric of
the result (`mse@1`) is compared with that metric of ours, not the headline. Verdict: within the combined
95% CIs, above, or below.

`--plot DIR` and `--format html` add figures (metarun.figures; matplotlib, the `plot` extra, imported only
then): a results chart per metric, metric against adaptation step, learning curves from each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from rich.table import Table

from metarun.checkpoint import checkpoint_run_dir, run_overrides
from metarun.console import console
from metarun.errors import UserInputError

if TYPE_CHECKING:
    from metarun.figures.report_figures import ReportFigures

# Override keys that are not part of a setting (a key, or everything below it: `hydra.run.dir`, `hydra/launcher`).
# The one list: report groups by it, check keys its baseline by it.
NOT_A_SETTING = (
    "seed",  # seeds of one setting pool: mean and spread over seeds
    # where or how a run was recorded or ran, not what it computed
    "hydra", "ckpt_path", "logger", "device", "threads", "trainer.log_every", "trainer.eval_batch_size",
    "benchmark.root", "benchmark.cache_dir", "benchmark.decode_workers", "benchmark.memory_map", "benchmark.ram_share",  # where the data is read and cached
    "paper", "reference",  # a figure to compare with, typed on the command line, computes nothing
)
# Shown in a setting's first part (algo/model/benchmark (split)), not repeated among its overrides.
_IN_BASE = ("algo", "model", "benchmark", "split")


def override_key(override: str) -> str:
    """`+benchmark.root=/x` -> `benchmark.root`."""
    return override.split("=", 1)[0].lstrip("+~")


def is_setting(override: str) -> bool:
    key = override_key(override)
    return not any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in NOT_A_SETTING)


def setting_of(results: dict[str, Any], overrides: list[str]) -> str:
    """A run's setting: `algo/model/benchmark (split)` and its overrides that change the result, sorted.
    Later overrides of a key win (an eval's own over its training run's)."""
    by_key = {override_key(o): o for o in overrides}
    kept = sorted(o for key, o in by_key.items() if is_setting(o) and key not in _IN_BASE)
    return " ".join([setting_base(results), *kept])


def setting_base(results: dict[str, Any]) -> str:
    """A setting's first part, `algo/model/benchmark (split)`; its overrides follow it."""
    return f"{results.get('algo')}/{results.get('model')}/{results.get('benchmark')} ({results.get('split', 'test')})"


def pooled_figure(means: list[float], ci95s: list[float]) -> tuple[float, float]:
    """A setting's figure over its seeds: (mean of the seeds' means, 95% CI of that mean). The CI combines
    the task-pool CI, the mean of the per-run CIs (every seed is scored on the same fixed pool, so this part
    does not shrink with more seeds), and the seeds' spread, 1.96 * std / sqrt(n) (normal approximation; 0
    for one run): sqrt(task^2 + spread^2). For one run it is that run's mean and CI."""
    mean = statistics.fmean(means)
    spread = 1.96 * statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else 0.0
    return mean, math.hypot(statistics.fmean(ci95s), spread)


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    setting: str
    paper: dict[str, Any] | None = None  # a published figure (preset `paper:`)
    reference: dict[str, Any] | None = None  # our own measured figure (preset `reference:`)

    def figure(self) -> tuple[str, dict[str, Any]] | None:
        """("paper" | "reference", figure) to compare with: the published one first."""
        if self.paper:
            return "paper", self.paper
        return ("reference", self.reference) if self.reference else None

    def value(self, metric: str | None) -> tuple[float, float] | None:
        """(mean, ci95) of `metric`: the headline, or a per-step metric of the result (`mse@1`); None if absent."""
        if metric in (None, self.results["metric"]):
            return self.results["mean"], self.results["ci95"]
        found = (self.results.get("metrics") or {}).get(metric)
        return (found["mean"], found["ci95"]) if isinstance(found, dict) and "mean" in found else None


@dataclass
class Group:
    setting: str
    metric: str
    runs: list[Run] = field(default_factory=list)

    @property
    def means(self) -> list[float]:
        return [r.results["mean"] for r in self.runs]

    def pooled(self) -> tuple[float, float]:
        """(mean over seeds, 95% CI of that mean): what `metarun check` stores and compares."""
        return pooled_figure(self.means, [r.results["ci95"] for r in self.runs])

    def row(self) -> dict[str, Any]:
        means = self.means
        figure = next((f for f in (r.figure() for r in self.runs) if f), None)
        return {
            "setting": self.setting, "metric": self.metric, "runs": len(means),
            "seeds": sorted({r.results.get("seed") for r in self.runs}),
            "mean": statistics.fmean(means),
            "seed_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "mean_ci95": statistics.fmean(r.results["ci95"] for r in self.runs),
            "ci95": self.pooled()[1],
            "tasks": self.runs[0].results.get("tasks"),
            **self._against(figure),
        }

    def _against(self, figure: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
        """The preset's figure, labelled by kind, and ours against it (on the figure's metric)."""
        if figure is None:
            return {"figure": None, "source": None, "figure_metric": None, "figure_mean": None,
                    "figure_ci95": None, "difference": None, "verdict": None}
        kind, fig = figure
        metric = fig.get("metric") if fig.get("metric") not in (None, self.metric) else None
        label = f"paper ({fig.get('source') or 'source not given'})" if kind == "paper" else "ours (reference)"
        values = [r.value(metric) for r in self.runs]
        out = {"figure": kind, "source": label + (f" on {metric}" if metric else ""),
               "figure_metric": metric or self.metric, "figure_mean": fig["mean"], "figure_ci95": fig.get("ci95"),
               "difference": None, "verdict": None}
        if all(values):
            mean, ci95 = pooled_figure([v[0] for v in values], [v[1] for v in values])
            out.update(figure_verdict(mean, ci95, fig))
        return out


def figure_verdict(mean: float, ci95: float, figure: dict[str, Any]) -> dict[str, Any]:
    """Our figure against the preset's (published or our reference): within the combined 95% CIs, above, or below."""
    diff = mean - float(figure["mean"])
    combined = math.hypot(ci95, float(figure.get("ci95") or 0.0))
    verdict = "within CIs" if abs(diff) <= combined else ("above" if diff > 0 else "below")
    return {"difference": diff, "verdict": verdict}


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
    overrides = _training_overrides(results) + run_overrides(path.parent)  # the eval's own overrides win
    config = path.parent / ".hydra" / "config.yaml"
    saved = OmegaConf.to_container(OmegaConf.load(config)) if config.exists() else {}
    saved = saved if isinstance(saved, dict) else {}
    return Run(path, results, setting_of(results, overrides), _figure(results, saved, "paper"),
               _figure(results, saved, "reference"))


def _figure(results: dict[str, Any], saved: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The run's `paper:` or `reference:` figure, from results.json (eval writes it) or the run's config;
    None unless it has a mean."""
    for node in (results.get(kind), saved.get(kind)):
        if isinstance(node, dict) and node.get("mean") is not None:
            return node
    return None


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


HEADERS = ("setting", "metric", "runs", "mean", "seed std", "mean 95% CI", "source", "figure", "difference", "verdict")


def table_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The table's cells as printed (accuracy in %): what md, csv, the terminal and the HTML page show."""
    lines = []
    for r in rows:
        figure = "-" if r["figure_mean"] is None else \
            f"{_fmt(r['figure_mean'], r['metric'])} ± {_fmt(r['figure_ci95'], r['metric'])}"
        lines.append([r["setting"], r["metric"] + (" %" if r["metric"] == "accuracy" else ""), str(r["runs"]),
                      _fmt(r["mean"], r["metric"]), _fmt(r["seed_std"], r["metric"]), _fmt(r["mean_ci95"], r["metric"]),
                      r["source"] or "-", figure, _fmt(r["difference"], r["metric"]), r["verdict"] or "-"])
    return lines


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    headers = list(HEADERS)
    lines = table_cells(rows)
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
    for col in HEADERS:
        table.add_column(col, justify="left" if col in ("setting", "source") else "right")
    for line in table_cells(rows):
        table.add_row(*line)
    console.print(table)


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metarun report", description="Tabulate results.json files over seeds.")
    parser.add_argument("paths", nargs="+", help="run directories, multirun directories or results.json files")
    parser.add_argument("--format", choices=("md", "csv", "json", "html"),
                        help="also write the table in this format (html: one self-contained page with the figures)")
    parser.add_argument("--output", "-o", help="file to write (default: stdout)")
    parser.add_argument("--paper", action="store_true",
                        help="only runs of presets with a figure (published `paper:`, or our `reference:`): ours "
                             "beside it, labelled by source, with a verdict")
    parser.add_argument("--plot", metavar="DIR",
                        help="write the figures (PNG and SVG, one column wide) and figures.json into DIR "
                             "(needs matplotlib: pip install \".[plot]\")")
    parser.add_argument("--x", choices=("step", "time"), default="step",
                        help="learning curves against meta-iterations (default) or wall time (needs a `time` key "
                             "in metrics.jsonl)")
    ns = parser.parse_args(args)
    groups = group_runs([load_run(p) for p in find_results(ns.paths)])
    if ns.paper:
        groups = [g for g in groups if g.row()["figure_mean"] is not None]
        if not groups:
            raise UserInputError("no run under the given paths has a figure to compare with (a `paper:` or "
                                 "`reference:` mean in its preset); run an experiment preset, e.g. "
                                 "metarun train experiment=maml_sine")
    groups.sort(key=lambda g: g.setting)
    rows = [g.row() for g in groups]
    drawn = _draw_figures(groups, ns) if ns.plot or ns.format == "html" else None
    text = None
    if ns.format == "html" and drawn is not None:
        from metarun.figures.html_page import build_page

        text = build_page(f"metarun report: {' '.join(ns.paths)}", HEADERS, table_cells(rows), drawn.figures,
                          drawn.notes)
    elif ns.format:
        text = render(rows, ns.format)
    if text is not None and not ns.output:
        sys.stdout.write(text)
        return
    print_table(rows)
    if text is not None:
        _write(Path(ns.output), text)
        console.print(f"wrote {ns.output}")


def _draw_figures(groups: list[Group], ns: argparse.Namespace) -> ReportFigures:
    """Figures for --plot and the HTML page. matplotlib is imported here, never at import time, and the
    output folder is checked before anything is drawn."""
    from metarun.console import error_console
    from metarun.figures.backend import load_matplotlib

    load_matplotlib()
    from metarun.figures.output import prepare_folder, write_figures
    from metarun.figures.report_figures import report_figures

    folder = prepare_folder(ns.plot) if ns.plot else None
    drawn = report_figures(groups, ns.x)
    for note in drawn.notes:  # stderr: the HTML page may be going to stdout
        error_console.print(f"note: {note}", markup=False)
    if folder is not None:
        index = write_figures(folder, drawn.figures)
        error_console.print(f"wrote {len(drawn.figures)} figures (PNG and SVG) to {folder}; which is which: {index}",
                            markup=False)
    return drawn


def _write(path: Path, text: str) -> None:
    try:
        path.expanduser().write_text(text)
    except OSError as ex:
        raise UserInputError(f"cannot write {path}: {ex.strerror or ex}; give a file you can write to "
                             f"(-o FILE)") from None
