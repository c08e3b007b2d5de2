"""scripts/gpu_check.sh --cpu: the GPU check of issue 22 runs every one of its sections on the CPU (smallest sizes),
writes its JSON schema and one Markdown table, and exits 0 when every result agrees with its CPU reference and 1
when a reference is perturbed, so the first minutes of a lent GPU are not spent on a typo."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ROW_KEYS = {"section", "name", "value", "unit", "peak_gpu_mib", "target", "target_met", "check", "status", "note",
            "details"}
TOP_KEYS = {"schema", "tool", "command", "complete", "mode", "size", "sections_run", "started_utc", "wall_s", "budget_s",
            "perturbed_reference", "environment", "data", "tolerances", "sections", "rows", "summary"}


def load_check() -> ModuleType:
    """scripts/gpu_check.py by path (scripts/ is no package); its top level imports the standard library only."""
    spec = importlib.util.spec_from_file_location("gpu_check_script", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_check(out: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("METARUN_DATA", None)
    return subprocess.run(["bash", str(SCRIPT), "--cpu", "--size", "tiny", "--out", str(out), "--work", str(work),
                           *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, dict]:
    """One whole --cpu run at the smallest sizes, shared by the tests that read its outputs."""
    base = tmp_path_factory.mktemp("gpu_check")
    proc = run_check(base / "out", base / "work")
    report_file = base / "out" / "gpu_check.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return proc, base / "out", report


def test_the_cpu_run_passes_and_writes_three_files(tiny: tuple[subprocess.CompletedProcess[str], Path, dict]) -> None:
    proc, out, report = tiny
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the device tool brings back at most 8 files from $OUT: the check writes three, none in subfolders
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert report["summary"]["exit_code"] == 0 and not report["summary"]["failed"]


def test_the_json_schema(tiny: tuple[subprocess.CompletedProcess[str], Path, dict]) -> None:
    check = load_check()
    _, _, report = tiny
    assert set(report) == TOP_KEYS
    assert report["schema"] == check.SCHEMA and report["mode"] == "cpu" and report["size"] == "tiny"
    assert report["complete"]
    assert report["data"]["kind"] == "fixture" and Path(report["data"]["root"]).name == "fixture-omniglot"
    assert report["sections_run"] == list(check.SECTIONS)
    assert {k: v["status"] for k, v in report["sections"].items()} == {s: "ok" for s in check.SECTIONS}
    for row in report["rows"]:
        assert set(row) == ROW_KEYS, row
        assert row["status"] in check.STATUSES and row["status"] not in ("failed", "error", "skipped"), row
        if row["check"] is not None:
            assert set(row["check"]) == {"what", "error", "tolerance", "passed"} and row["check"]["passed"], row
    by_section = {s: [r for r in report["rows"] if r["section"] == s] for s in check.SECTIONS}
    assert all(by_section.values()), {s: len(r) for s, r in by_section.items()}
    # every figure the issue asks for has its row
    names = [r["name"] for r in report["rows"]]
    for wanted in ("sine: per-task loop", "sine: metarun", "conv4: per-task loop", "conv4: metarun chunk"):
        assert any(n.startswith(wanted) for n in names), wanted
    train = next(r for r in by_section["train"] if r["unit"] == "it/s")
    assert train["value"] > 0 and train["details"]["projected_60k_min"] > 0
    assert train["name"].startswith("metarun train experiment=maml_omniglot_5w1s ")
    assert any(r["unit"] == "episodes/s" and r["value"] > 0 for r in by_section["episodes"])
    modes = {m for m in check.PRECISIONS.values() if any(m in r["name"] for r in by_section["precision"])}
    assert modes == set(check.PRECISIONS.values())
    checks = [r for r in report["rows"] if r["check"]]
    assert report["summary"]["checks"] == len(checks) >= 10


def test_compile_refusing_double_backward_is_a_result(tiny: tuple[subprocess.CompletedProcess[str], Path, dict]) -> None:
    """torch.compile through AOTAutograd refuses double backward: recorded as `unsupported` with the reason."""
    _, _, report = tiny
    (row,) = [r for r in report["rows"] if r["section"] == "compile"]
    assert row["status"] == "unsupported" and "double backward" in row["note"], row
    assert row["details"]["eager_it_per_s"] > 0


def test_the_markdown_table_has_a_line_per_row(tiny: tuple[subprocess.CompletedProcess[str], Path, dict]) -> None:
    _, out, report = tiny
    text = (out / "gpu_check.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| section | measurement | value |")
    assert len(table) == len(report["rows"]) + 2  # the header, its --- line, a line per row
    assert sum(line.startswith("| --- ") for line in text.splitlines()) == 1
    assert all(line.count(" | ") == table[0].count(" | ") for line in table), "a cell broke the table"
    assert "Data: generated fixture" in text and "exit 0" in text


def test_a_perturbed_reference_exits_one(tmp_path: Path) -> None:
    """Guards the check itself: CPU references scaled by 1.05 must fail the float64 and float32 comparisons."""
    proc = run_check(tmp_path / "out", tmp_path / "work", "--sections", "reference", "--perturb-reference")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = report["rows"]
    assert report["perturbed_reference"] and report["sections_run"] == ["reference"]
    assert rows and all(r["section"] == "reference" and r["status"] == "failed" for r in rows), rows
    assert report["summary"]["failed"] == [r["name"] for r in rows]
    assert "exit 1" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_unknown_section_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_check(tmp_path / "out", tmp_path / "work", "--sections", "bench,warp")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown warp" in lines[0], proc.stderr


def test_exit_status_precedence() -> None:
    check = load_check()
    row = check.make_row
    ok, unsupported = row("a", "x", 1.0), row("compile", "y", status="unsupported")
    error, skipped = row("b", "z", status="error"), row("c", "w", status="skipped")
    failed = row("d", "v", 1.0, check=check.check("e", 2.0, 1.0))
    assert failed["status"] == "failed" and ok["status"] == "ok"
    assert check.exit_status([ok, unsupported]) == 0
    assert check.exit_status([ok, error]) == check.exit_status([skipped]) == 3
    assert check.exit_status([error, failed, ok]) == 1
    assert not check.check("nan", float("nan"), 1.0)["passed"]


def test_a_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """hydra-core absent (the device image has torch only): one line with the pip command and the offline way."""
    check = load_check()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hydra" else real(name, *a))
    monkeypatch.setattr(check, "CARRIED_SITE", tmp_path / "absent")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    message = check.bootstrap()
    assert message is not None and "\n" not in message
    assert "python3 -m pip install 'hydra-core>=1.3,<1.4'" in message and "--prepare" in message


def test_the_rate_comes_from_the_time_column(tmp_path: Path) -> None:
    """it/s between the first and last training lines (start-up, validation and test left out); the projection
    adds one validation per eval_every steps at the measured validation cost."""
    check = load_check()
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("trainer:\n  eval_every: 2000\n")
    lines = [{"step": 50, "time": 10.0, "train/loss": 1.0}, {"step": 100, "time": 11.0, "train/loss": 0.9},
             {"step": 1000, "time": 29.0, "train/loss": 0.5}, {"step": 1000, "time": 31.0, "val/accuracy": 0.9}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "results.json").write_text(json.dumps({"mean": 0.95, "ci95": 0.01, "tasks": 600}))
    run = object.__new__(check.Run)
    run.device = "cuda"
    row = run._train_row(run_dir, "metarun train experiment=maml_omniglot_5w1s", 1234.0, 60.0)
    assert row["value"] == pytest.approx(950 / 19)  # steps 50 -> 1000 in 19 s
    assert row["details"]["validation_s"] == pytest.approx(2.0)
    assert row["details"]["projected_60k_min"] == pytest.approx((60000 / (950 / 19) + 30 * 2.0) / 60, rel=1e-3)
    assert row["target_met"] is False and row["peak_gpu_mib"] == 1234.0
    assert row["details"]["test_accuracy"] == 0.95
