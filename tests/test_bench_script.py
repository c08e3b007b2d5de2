"""scripts/bench.py refuses to time variants that compute different meta-gradients: its float64 check must
pass for every variant it would time (metarun's chunkings, the textbook torch.func form, higher if installed).
Its convex-head table is scripts/bench_convex.py's, imported, and runs without qpth (saying so in qpth's row)."""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("setup", ["sine", "conv4"])
def test_every_timed_variant_computes_the_loops_meta_gradient(setup: str) -> None:
    bench = load_bench()
    chosen = bench.SETUPS[setup](argparse.Namespace(omniglot_root=None))
    steps = bench.variants(chosen, torch.device("cpu"))
    assert "per-task loop" in steps and any(name.startswith("metarun") for name in steps)
    errors = bench.gradient_errors(chosen, steps, torch.device("cpu"))
    assert errors.keys() == steps.keys()
    assert all(error <= bench.GRADIENT_TOLERANCE for error in errors.values()), errors


def test_a_wrong_variant_is_caught() -> None:
    """Guards the check itself: first-order MAML passed off as second order must fail it."""
    bench = load_bench()
    chosen = bench.SETUPS["sine"](argparse.Namespace(omniglot_root=None))

    def first_order(maml, batch) -> None:  # type: ignore[no-untyped-def]
        maml.first_order = True
        bench.metarun_step(None)(maml, batch)
        maml.first_order = False

    errors = bench.gradient_errors(chosen, {"wrong": first_order}, torch.device("cpu"))
    assert errors["wrong"] > 1e-4


def test_the_convex_table_is_bench_convex_imported() -> None:
    """One implementation: bench.py's convex heads are bench_convex's functions, and its setups exist there."""
    bench = load_bench()
    convex = bench.convex_module()
    assert convex.__file__ == str(ROOT / "scripts" / "bench_convex.py")
    assert set(bench.CONVEX_SETUPS) <= set(convex.SETUPS)
    assert not any(hasattr(bench, name) for name in ("run_setup_convex", "qpth_svm", "metarun_svm", "r2d2_ridge"))


def test_the_convex_table_runs_without_qpth(monkeypatch: pytest.MonkeyPatch) -> None:
    """qpth absent (import refused here, whether or not it is installed): its row names the fix, the SVM and
    ridge heads are still checked and timed."""
    bench = load_bench()
    for name in ("qpth", "qpth.qp", "cvxpylayers"):
        monkeypatch.setitem(sys.modules, name, None)  # `import qpth` raises ImportError
    out = io.StringIO()
    console = Console(file=out, width=400)
    args = argparse.Namespace(rounds=1, seconds=0.01, qpth_max_variables=500)
    bench.convex_table(["omniglot-5w1s"], torch.device("cpu"), args, console)
    rows = {line.split("│")[1].strip(): line for line in out.getvalue().splitlines() if line.count("│") > 2}
    qpth = [row for name, row in rows.items() if name.startswith("qpth SVM")]
    assert len(qpth) == 1 and "qpth not installed: pip install qpth in the benchmark's environment" in qpth[0]
    for name in ("metarun SVM (15 it)", "metarun ridge (MetaOptNet-RR)", "metarun ridge (R2-D2)",
                 "test: metarun SVM (3 it)"):
        assert name in rows, out.getvalue()
    assert "FD " in rows["metarun SVM (15 it)"], "the gradient is checked before it is timed"
