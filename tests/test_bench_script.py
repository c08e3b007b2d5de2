"""scripts/bench.py refuses to time variants that compute different meta-gradients: its float64 check must
pass for every variant it would time (metarun's chunkings, the textbook torch.func form, higher if installed)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

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
