"""matplotlib is an optional extra: without it, asking for a figure is one line naming what to install
(exit 2), and nothing else needs it; with it, it is imported only when a figure is asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Run the CLI with `import matplotlib` failing, as on an install without the plot extra.
WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # any `import matplotlib...` now raises ImportError
from metarun.cli import main
sys.argv = ["metarun", *sys.argv[1:]]
main()
"""


def _without_matplotlib(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (run / "results.json").write_text(json.dumps({"metric": "mse", "split": "test", "mean": 0.3, "ci95": 0.01,
                                                  "tasks": 10, "algo": "maml", "model": "mlp", "benchmark": "sine",
                                                  "seed": 0}))
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 1, "val/mse": 0.9}\n')
    (run / "scores.json").write_text(json.dumps({"pool": {"tasks": 2}, "scores": {"mse": [0.3, 0.4]}}))
    return run


@pytest.mark.parametrize("command", [["report", "{runs}", "--plot", "{tmp}/figs"],
                                     ["report", "{runs}", "--format", "html", "-o", "{tmp}/r.html"],
                                     ["compare", "{run}", "{run}", "--plot", "{tmp}/figs"]])
def test_without_matplotlib_a_figure_request_is_one_line_naming_the_extra(run_dir: Path, tmp_path: Path,
                                                                          command: list[str]) -> None:
    args = [c.format(runs=run_dir.parent, run=run_dir, tmp=tmp_path) for c in command]
    proc = _without_matplotlib(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun: error:") and 'pip install ".[plot]"' in lines[0]
    assert not (tmp_path / "figs").exists() and not (tmp_path / "r.html").exists()


def test_without_matplotlib_tables_and_comparisons_still_work(run_dir: Path) -> None:
    proc = _without_matplotlib("report", str(run_dir.parent), "--format", "md")
    assert proc.returncode == 0 and "| maml/mlp/sine (test) |" in proc.stdout, proc.stderr
    proc = _without_matplotlib("compare", str(run_dir), str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr


def test_matplotlib_is_imported_only_when_a_figure_is_asked_for(run_dir: Path) -> None:
    """Neither training nor the plain report imports it (the training hot path never pays for it)."""
    pytest.importorskip("matplotlib")
    script = f"""
import sys
import metarun.cli, metarun.run, metarun.trainer, metarun.evaluation, metarun.report, metarun.compare, metarun.figures
from metarun import report
report.main([{str(run_dir.parent)!r}, "--format", "csv"])
assert "matplotlib" not in sys.modules, "imported too early"
report.main([{str(run_dir.parent)!r}, "--plot", {str(run_dir.parent.parent / "figs")!r}])
assert "matplotlib" in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
