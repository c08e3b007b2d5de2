"""benchmark=multimodal (Vuorio et al. 2019): each family against its formula, the paper's ranges and noise, balanced
seeded modes, the mode carried through slicing and moving, per-mode metrics, and bad input as one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metarun.benchmarks.base import task_pool
from metarun.benchmarks.multimodal import FAMILIES, ModalTaskBatch, MultimodalBenchmark, per_mode
from tests.conftest import run_metarun

pytestmark = pytest.mark.usefixtures("one_thread")


def by_hand(family: str, c: list[float], x: float) -> float:
    """The paper's formulas, one point at a time (the benchmark computes them batched)."""
    a, b, d = c
    if family == "sinusoid":
        return a * math.sin(x - b)
    if family == "linear":
        return a * x + b
    if family == "quadratic":
        return a * (x - b) ** 2 + d
    if family == "tanh":
        return a * math.tanh(x - b) + d
    return a * abs(x - b) + d  # l1_norm


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_follows_its_formula_within_the_papers_ranges(family: str) -> None:
    bench = MultimodalBenchmark(modes=[family], noise_std=0.0, shots=4, queries=3)
    batch = bench.sample("train", 40, torch.Generator().manual_seed(1))
    assert isinstance(batch, ModalTaskBatch)
    assert (batch.mode == FAMILIES.index(family)).all()
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    assert x.shape == (40, 7, 1) and y.shape == (40, 7, 1)
    assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
    for t in range(40):
        c = batch.coefficients[t].tolist()
        for n in range(7):
            assert y[t, n, 0].item() == pytest.approx(by_hand(family, c, x[t, n, 0].item()), abs=1e-5)
    c = batch.coefficients
    ranges = {"sinusoid": [(0.1, 5.0), (0.0, math.pi)], "linear": [(-3, 3), (-3, 3)],
              "quadratic": [(-0.15, 0.15), (-3, 3), (-3, 3)], "tanh": [(-3, 3)] * 3, "l1_norm": [(-3, 3)] * 3}
    for j, (low, high) in enumerate(ranges[family]):
        assert float(c[:, j].min()) >= low - 1e-6 and float(c[:, j].max()) <= high + 1e-6, (family, j)
    if family == "quadratic":  # s q with q ~ U[0.02, 0.15] and a random sign: both signs, never near 0
        assert (c[:, 0].abs() >= 0.02 - 1e-6).all() and (c[:, 0] > 0).any() and (c[:, 0] < 0).any()
    if family in ("sinusoid", "linear"):
        assert (c[:, 2] == 0).all()


def test_targets_carry_gaussian_noise_of_the_papers_scale() -> None:
    clean = MultimodalBenchmark(noise_std=0.0).sample("train", 2000, torch.Generator().manual_seed(3))
    noisy = MultimodalBenchmark().sample("train", 2000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy.support_x, clean.support_x)
    residual = torch.cat([noisy.support_y - clean.support_y, noisy.query_y - clean.query_y]).flatten()
    assert abs(float(residual.mean())) < 0.01 and abs(float(residual.std()) - 0.3) < 0.01


@pytest.mark.parametrize("modes,tasks", [(["sinusoid", "linear"], 50), (["sinusoid", "linear", "quadratic"], 75),
                                         (list(FAMILIES), 125), (["tanh", "linear"], 7)])
def test_modes_are_balanced_within_a_batch_in_a_random_order(modes: list[str], tasks: int) -> None:
    batch = MultimodalBenchmark(modes=modes).sample("train", tasks, torch.Generator().manual_seed(0))
    counts = torch.bincount(batch.mode, minlength=len(FAMILIES))
    chosen = [FAMILIES.index(m) for m in modes]
    assert counts.sum() == tasks and all(counts[i] == 0 for i in range(len(FAMILIES)) if i not in chosen)
    assert int(counts[chosen].max() - counts[chosen].min()) <= 1
    assert not torch.equal(batch.mode, batch.mode.sort().values)  # not blocks of one mode


def test_pools_are_fixed_and_splits_differ() -> None:
    bench = MultimodalBenchmark()
    first = next(task_pool(bench, "test", 20, base_seed=0))
    again = next(task_pool(bench, "test", 20, base_seed=0))
    other = next(task_pool(bench, "val", 20, base_seed=0))
    for field in ("support_x", "support_y", "query_y", "mode", "coefficients"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert not torch.equal(first.support_y, other.support_y)


def test_slicing_and_moving_keep_each_tasks_mode_and_coefficients() -> None:
    batch = MultimodalBenchmark().sample("train", 10, torch.Generator().manual_seed(5))
    part = batch.slice(3, 7).to("cpu", torch.float64)
    assert isinstance(part, ModalTaskBatch) and part.num_tasks == 4
    assert torch.equal(part.mode, batch.mode[3:7]) and part.mode.dtype == torch.int64
    assert part.coefficients.dtype == torch.float64 and part.support_x.dtype == torch.float64
    torch.testing.assert_close(part.coefficients, batch.coefficients[3:7].double())


def test_per_mode_metrics_keep_each_modes_tasks() -> None:
    batch = MultimodalBenchmark(modes=["sinusoid", "tanh"]).sample("val", 9, torch.Generator().manual_seed(2))
    values = torch.arange(9.0)
    split = per_mode(batch, {"mse": values})
    assert set(split) == {"mse/sinusoid", "mse/tanh"}
    assert torch.equal(split["mse/sinusoid"], values[batch.mode == 0])
    assert torch.equal(split["mse/tanh"], values[batch.mode == FAMILIES.index("tanh")])
    plain = MultimodalBenchmark().sample("val", 3, torch.Generator())
    assert per_mode(type("Plain", (), {})(), {"mse": values}) == {} and per_mode(plain, {}) == {}


def test_bad_input_is_one_line_exit_2_through_the_cli(tmp_path: Path) -> None:
    proc = run_metarun("train", "benchmark=multimodal", "benchmark.modes=[sinusoid,cubic]", "debug=smoke",
                       "logger.tensorboard=false", f"hydra.run.dir={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown mode 'cubic'" in lines[0], lines[0]


@pytest.mark.parametrize("args,expected", [
    (["benchmark=multimodal", "benchmark.modes=[sinsoid]"], "did you mean 'sinusoid'"),
    (["benchmark=multimodal", "benchmark.modes=[]"], "benchmark.modes is empty"),
    (["algo=mmaml", "benchmark=bandit"], "algo=mmaml supports only classification/regression"),
    (["algo=mmaml", "algo.oracle=true", "benchmark=sine"], "only benchmark=multimodal gives"),
])
def test_bad_input_is_one_line(args: list[str], expected: str) -> None:
    """In-process (run.build, where the CLI's line comes from): a process per case costs seconds of imports."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metarun.config import config_dir, validate
    from metarun.errors import UserInputError
    from metarun.run import build

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=[*args, "debug=smoke"]))
    GlobalHydra.instance().clear()
    names = {"algo": cfg.algo._target_.rsplit(".", 1)[-1].lower(), "model": "mlp",
             "benchmark": cfg.benchmark._target_.rsplit(".", 1)[-1].lower()}
    names["algo"] = "mmaml" if "mmaml" in cfg.algo._target_ else names["algo"]
    with pytest.raises(UserInputError) as raised:
        build(cfg, names)
    assert "\n" not in str(raised.value) and expected in str(raised.value), str(raised.value)
