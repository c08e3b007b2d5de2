"""`metarun compare BASELINE RUN --plot DIR`: a histogram of the per-task differences with their mean and its
95% CI, read back from the files."""

from __future__ import annotations

import html
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_metarun

pytest.importorskip("matplotlib")

POOL = {"benchmark": "omniglot", "split": "test", "pool_seed": 0, "tasks": 300,
        "settings": {"ways": 5, "shots": 1, "queries": 15}}


def scored_run(path: Path, scores: dict[str, list[float]], pool: dict = POOL) -> Path:
    path.mkdir(parents=True)
    (path / "scores.json").write_text(json.dumps({"pool": pool, "scores": scores}))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """ProtoNet-like baseline and a run better by about 2 points, accuracies of 75 queries (steps of 1/75)."""
    rng = random.Random(0)
    base = [min(75, max(0, round(rng.gauss(70, 3)))) / 75 for _ in range(300)]
    run = [min(1.0, b + rng.choice([0, 0, 1, 2, 3]) / 75) for b in base]
    return (scored_run(tmp_path / "protonet", {"accuracy": base}),
            scored_run(tmp_path / "feat", {"accuracy": run, "accuracy@0": run}))


def test_compare_plot_draws_the_paired_differences_with_their_mean_and_ci(pair: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    baseline, run = pair
    figs = tmp_path / "figs"
    proc = run_metarun("compare", str(baseline), str(run), "--plot", str(figs), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)[str(run)]
    accuracy = next(d for d in summary if d["metric"] == "accuracy")
    entries = json.loads((figs / "figures.json").read_text())
    assert [(e["kind"], e["metric"]) for e in entries] == [("paired_difference", "accuracy")]  # not accuracy@0
    assert entries[0]["settings"] == [str(baseline), str(run)]
    with Image.open(figs / entries[0]["png"]) as image:
        assert image.size[0] == 660
    svg = html.unescape((figs / entries[0]["svg"]).read_text())
    mean, ci = 100 * accuracy["difference"], 100 * accuracy["ci95"]
    assert f"mean {mean:+.2f} ± {ci:.2f} (95% CI)" in svg
    assert "per-task accuracy, run − baseline (% points)" in svg and "no difference" in svg and "tasks" in svg
    assert accuracy["verdict"] in svg


def test_compare_plot_and_report_plot_share_a_folder_index(pair: tuple[Path, Path], tmp_path: Path) -> None:
    baseline, run = pair
    figs = tmp_path / "figs"
    (figs).mkdir()
    (figs / "figures.json").write_text(json.dumps([{"png": "kept.png", "svg": "kept.svg", "kind": "results"},
                                                   {"png": "gone.png", "svg": "gone.svg", "kind": "results"}]))
    (figs / "kept.png").write_bytes(b"")
    assert run_metarun("compare", str(baseline), str(run), "--plot", str(figs)).returncode == 0
    names = [e["png"] for e in json.loads((figs / "figures.json").read_text())]
    assert "kept.png" in names and "gone.png" not in names and len(names) == 2


def test_compare_plot_into_an_unwritable_folder_is_one_line_exit_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    baseline, run = pair
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_metarun("compare", str(baseline), str(run), "--plot", str(blocker / "figs"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "cannot write figures" in proc.stderr
