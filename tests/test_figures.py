"""`metarun report --plot DIR` and `--format html`: the files are read back (PNG size, the SVG's axis labels,
every setting of the table in the HTML, the figures embedded), and bad input is one line, exit 2."""

from __future__ import annotations

import base64
import html
import json
import re
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_metarun

pytest.importorskip("matplotlib")

COLUMN_PX = 660  # 3.3 in at 200 dpi


def fake_run(root: Path, name: str, *, algo: str, benchmark: str, seed: int, mean: float, metric: str,
             steps: int = 400, extra: tuple[str, ...] = (), adaptation_steps: int = 0, log: bool = True,
             wall_time: bool = False, config: str = "") -> Path:
    """A run directory as metarun train leaves it: overrides, results.json, and (log=True) metrics.jsonl with
    training lines every 50 steps and validation every 100; values improve with the step and differ by seed."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    overrides = [f"algo={algo}", f"benchmark={benchmark}", f"seed={seed}", f"trainer.steps={steps}", *extra]
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if config:
        (run / ".hydra" / "config.yaml").write_text(config)
    per_step = {f"{metric}@{k}": {"mean": mean * (1 + 2 / (k + 1)), "ci95": 0.01 * mean, "tasks": 600,
                                  "nonfinite_tasks": 0} for k in range(adaptation_steps + 1 if adaptation_steps else 0)}
    results = {"metric": metric, "split": "test", "mean": mean, "ci95": 0.02 * mean, "tasks": 600, "steps": steps,
               "algo": algo, "model": "cnn" if benchmark == "omniglot" else "mlp", "benchmark": benchmark,
               "seed": seed, "metrics": {**per_step, metric: {"mean": mean, "ci95": 0.02 * mean}}}
    (run / "results.json").write_text(json.dumps(results))
    if log:
        lines = []
        for step in range(50, steps + 1, 50):
            progress = step / steps
            value = mean * progress + (0.5 if metric == "accuracy" else 3.0) * (1 - progress) + 0.01 * seed
            train = {"train/loss": value} if metric == "mse" else {"train/loss": 1 - value, f"train/{metric}": value}
            lines.append({"step": step, **train, "train/lr": 1e-3, **({"time": 0.5 * step} if wall_time else {})})
            if step % 100 == 0:
                lines.append({"step": step, f"val/{metric}": value * 0.98,
                              **({"time": 0.5 * step + 0.2} if wall_time else {})})
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


PAPER = 'paper:\n  source: "Snell et al. 2017, Table 1"\n  metric: accuracy\n  mean: 0.988\n  ci95: null\n'


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """MAML on sine (3 seeds, mse@0..5), ProtoNet (2 seeds, a paper figure) and Matching (2 seeds) on Omniglot."""
    root = tmp_path / "outputs"
    for seed in range(3):
        fake_run(root, f"maml{seed}", algo="maml", benchmark="sine", seed=seed, mean=0.2 + 0.01 * seed, metric="mse",
                 adaptation_steps=5)
    for seed in range(2):
        fake_run(root, f"proto{seed}", algo="protonet", benchmark="omniglot", seed=seed, mean=0.96 + 0.005 * seed,
                 metric="accuracy", config=PAPER)
        fake_run(root, f"match{seed}", algo="matching", benchmark="omniglot", seed=seed, mean=0.93 + 0.01 * seed,
                 metric="accuracy")
    return root


def index_of(folder: Path) -> list[dict]:
    return json.loads((folder / "figures.json").read_text())


def one(entries: list[dict], kind: str, metric: str | None = None, setting_part: str = "") -> dict:
    found = [e for e in entries if e["kind"] == kind and metric in (None, e["metric"])
             and any(setting_part in s for s in e["settings"])]
    assert len(found) == 1, (kind, metric, setting_part, [e["png"] for e in entries])
    return found[0]


def svg_text(folder: Path, entry: dict) -> str:
    return html.unescape((folder / entry["svg"]).read_text())


def test_plot_writes_a_png_and_an_svg_of_every_figure_one_column_wide(runs: Path, tmp_path: Path) -> None:
    figs = tmp_path / "figs"
    proc = run_metarun("report", str(runs), "--plot", str(figs))
    assert proc.returncode == 0, proc.stderr
    entries = index_of(figs)
    kinds = sorted((e["kind"], e["metric"]) for e in entries)
    assert kinds == [("adaptation", "mse"), ("learning_curves", "accuracy"), ("learning_curves", "accuracy"),
                     ("learning_curves", "mse"), ("results", "accuracy"), ("results", "mse")]
    for entry in entries:
        with Image.open(figs / entry["png"]) as image:
            width, height = image.size
        assert width == COLUMN_PX and 300 <= height <= 1000, (entry["png"], image.size)
        assert (figs / entry["svg"]).read_text().lstrip().startswith("<?xml")
    assert len({e["png"] for e in entries}) == len(entries)


def test_svgs_name_their_axes_and_say_what_the_band_and_markers_are(runs: Path, tmp_path: Path) -> None:
    figs = tmp_path / "figs"
    assert run_metarun("report", str(runs), "--plot", str(figs)).returncode == 0
    entries = index_of(figs)
    curves = svg_text(figs, one(entries, "learning_curves", "mse"))
    for text in ("meta-iteration (outer step)", "MSE", "training", "validation", "mean of 3 seeds ± 1 s.d."):
        assert text in curves, text
    protonet_curves = svg_text(figs, one(entries, "learning_curves", "accuracy", "protonet"))
    assert "accuracy (%)" in protonet_curves and "mean of 2 seeds ± 1 s.d." in protonet_curves
    bars = svg_text(figs, one(entries, "results", "accuracy"))
    for text in ("test accuracy (%)", "ours: mean over seeds, 95% CI", "paper (published)", "protonet", "matching"):
        assert text in bars, text
    assert "ours (reference)" not in bars  # only ProtoNet's preset has a figure, and it is published
    steps = svg_text(figs, one(entries, "adaptation", "mse"))
    assert "adaptation steps at test time" in steps and "test MSE" in steps and "95% CI" in steps


def test_bars_show_the_pooled_mean_of_each_setting(runs: Path, tmp_path: Path) -> None:
    """The value printed beside each bar is the table's mean over seeds (ProtoNet 96.25 %, Matching 93.50 %)."""
    figs = tmp_path / "figs"
    assert run_metarun("report", str(runs), "--plot", str(figs)).returncode == 0
    bars = svg_text(figs, one(index_of(figs), "results", "accuracy"))
    assert "96.25" in bars and "93.50" in bars


def test_figure_files_are_deterministic(runs: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_metarun("report", str(runs), "--plot", str(first)).returncode == 0
    assert run_metarun("report", str(runs), "--plot", str(second)).returncode == 0
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_html_page_holds_every_setting_of_the_table_and_embeds_every_figure(runs: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    proc = run_metarun("report", str(runs), "--format", "html", "-o", str(page))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    settings = [r["setting"] for r in json.loads(run_metarun("report", str(runs), "--format", "json").stdout)]
    assert len(settings) == 3
    for setting in settings:
        assert f"<td class=\"text\">{html.escape(setting)}</td>" in text, setting
    embedded = re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == 6
    decoded = [base64.b64decode(data).decode() for data in embedded]
    assert all("<svg" in svg for svg in decoded)
    assert any("meta-iteration (outer step)" in svg for svg in decoded)
    # readable offline: nothing to fetch, nothing to run
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<script" not in text and "<link" not in text


def test_html_and_plot_together_embed_the_files_written(runs: Path, tmp_path: Path) -> None:
    page, figs = tmp_path / "report.html", tmp_path / "figs"
    proc = run_metarun("report", str(runs), "--format", "html", "-o", str(page), "--plot", str(figs))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    for entry in index_of(figs):
        svg = (figs / entry["svg"]).read_bytes()
        assert base64.b64encode(svg).decode() in text, entry["svg"]


def test_html_to_stdout_keeps_notes_out_of_the_page(runs: Path, tmp_path: Path) -> None:
    fake_run(runs, "unlogged", algo="reptile", benchmark="omniglot", seed=0, mean=0.8, metric="accuracy", log=False)
    proc = run_metarun("report", str(runs), "--format", "html")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("<!DOCTYPE html>") and proc.stdout.rstrip().endswith("</html>")
    assert "note:" in proc.stderr and str(runs / "unlogged") in proc.stderr


def test_x_time_plots_against_the_logged_wall_time(tmp_path: Path) -> None:
    root, figs = tmp_path / "runs", tmp_path / "figs"
    for seed in range(2):
        fake_run(root, f"timed{seed}", algo="maml", benchmark="sine", seed=seed, mean=0.3, metric="mse",
                 wall_time=True)
    proc = run_metarun("report", str(root), "--plot", str(figs), "--x", "time")
    assert proc.returncode == 0, proc.stderr
    curves = svg_text(figs, one(index_of(figs), "learning_curves"))
    assert "wall time (min)" in curves and "meta-iteration" not in curves  # 200 s of logged time: minutes


def test_x_time_without_a_time_field_is_one_line_exit_2(runs: Path, tmp_path: Path) -> None:
    proc = run_metarun("report", str(runs), "--plot", str(tmp_path / "figs"), "--x", "time")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "time" in proc.stderr and "--x step" in proc.stderr


def test_runs_without_metrics_jsonl_are_named_in_a_note(runs: Path, tmp_path: Path) -> None:
    unlogged = fake_run(runs, "unlogged", algo="reptile", benchmark="omniglot", seed=0, mean=0.8, metric="accuracy",
                        log=False)
    figs = tmp_path / "figs"
    proc = run_metarun("report", str(runs), "--plot", str(figs))
    assert proc.returncode == 0, proc.stderr
    assert "no learning curve from 1 run(s) without metrics.jsonl" in proc.stderr and str(unlogged) in proc.stderr
    entries = index_of(figs)
    assert len([e for e in entries if e["kind"] == "learning_curves"]) == 3
    assert any("reptile" in s for s in one(entries, "results", "accuracy")["settings"])  # still a bar


def test_an_evaluation_draws_the_curves_of_the_run_that_trained_its_checkpoint(tmp_path: Path) -> None:
    trained = fake_run(tmp_path / "train", "run", algo="protonet", benchmark="omniglot", seed=0, mean=0.95,
                       metric="accuracy")
    evaluated = fake_run(tmp_path / "eval", "scored", algo="protonet", benchmark="omniglot", seed=0, mean=0.95,
                         metric="accuracy", log=False)
    results = json.loads((evaluated / "results.json").read_text())
    (evaluated / "results.json").write_text(json.dumps({**results, "checkpoint": f"{trained}/checkpoints/best.pt"}))
    figs = tmp_path / "figs"
    proc = run_metarun("report", str(tmp_path / "eval"), "--plot", str(figs))
    assert proc.returncode == 0, proc.stderr
    assert one(index_of(figs), "learning_curves") and "note:" not in proc.stderr


@pytest.mark.parametrize("flags", [["--plot", "{figs}"], ["--format", "html", "-o", "{figs}/report.html"]])
def test_no_runs_is_one_line_exit_2(tmp_path: Path, flags: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_metarun("report", str(tmp_path / "empty"), *(f.format(figs=tmp_path / "figs") for f in flags))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "no results.json" in proc.stderr


def test_runs_without_any_metrics_jsonl_are_one_line_exit_2(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "runs", "r", algo="maml", benchmark="sine", seed=0, mean=0.3, metric="mse", log=False)
    proc = run_metarun("report", str(tmp_path / "runs"), "--plot", str(tmp_path / "figs"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "metrics.jsonl" in proc.stderr and str(run) in proc.stderr


def test_an_unwritable_output_folder_is_one_line_exit_2(runs: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_metarun("report", str(runs), "--plot", str(blocker / "figs"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot write figures to" in proc.stderr and str(blocker) in proc.stderr
    proc = run_metarun("report", str(runs), "--format", "html", "-o", str(blocker / "report.html"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "cannot write" in proc.stderr


def test_a_corrupt_metrics_line_is_one_line_exit_2_but_a_cut_off_last_line_is_dropped(runs: Path,
                                                                                      tmp_path: Path) -> None:
    log = runs / "maml0" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 450, "train/lo')  # killed while writing its last line
    assert run_metarun("report", str(runs), "--plot", str(tmp_path / "a")).returncode == 0
    log.write_text('{"step": 1\n' + log.read_text())
    proc = run_metarun("report", str(runs), "--plot", str(tmp_path / "b"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "line 1" in proc.stderr


def test_png_reads_back_as_an_rgba_image_at_200_dpi(runs: Path, tmp_path: Path) -> None:
    figs = tmp_path / "figs"
    assert run_metarun("report", str(runs), "--plot", str(figs)).returncode == 0
    data = (figs / one(index_of(figs), "results", "mse")["png"]).read_bytes()
    with Image.open(BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "RGBA"
        dpi = image.info.get("dpi", (0, 0))
    assert round(dpi[0]) == 200
