"""Every experiment preset (configs/experiment/*.yaml) composes, validates, states its launching command and
its reference figure, and trains and tests a few steps (debug=smoke) on generated data in the real formats.

The smoke runs change only what a fixture cannot provide: the Omniglot fixture is split by alphabet (lake;
the presets' Vinyals and random splits name characters of the real set), and images are small (28x28 Omniglot,
16x16 miniImageNet) with 2 queries, so that ~30 runs take a minute or two. One Hydra multirun per benchmark, the three side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from metarun.config import config_dir, validate
from tests.image_fixtures import finish, mini_cache_pickles, mini_classes, omniglot_tree, start_metarun

PRESETS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
# Enough classes for the presets' episodes: 20-way validation and testing, 60-way ProtoNet training
# (lake split: one background alphabet validates), 30-way ProtoNet training on miniImageNet.
OMNIGLOT_BACKGROUND = {f"Alphabet_{c}": 5 for c in "ABCDEF"}  # 5 x 4 rotations = 20 classes per alphabet
OMNIGLOT_EVALUATION = {"Script_X": 3, "Script_Y": 3}  # 24 test classes
MINI = mini_classes(train=30, val=20, test=20)
TINY = ["benchmark.image_size=16", "benchmark.queries=2"]
OMNIGLOT_TINY = ["benchmark.image_size=28", "benchmark.queries=2"]  # 28: the ViT preset's 7x7 patches must fit
COMMON = ["debug=smoke", "logger.tensorboard=false", "logger.console=false"]


def composed(preset: str) -> OmegaConf:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={preset}"])
    GlobalHydra.instance().clear()
    return cfg


def benchmark_of(preset: str) -> str:
    return str(composed(preset).benchmark._target_).rsplit(".", 1)[-1].removesuffix("Benchmark").lower()


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_states_its_command_and_reference(preset: str) -> None:
    cfg = composed(preset)
    validate(cfg)
    header = (config_dir() / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_"
    assert header[1].startswith(f"# metarun train experiment={preset}"), header[1]
    paper = cfg.get("paper")
    assert paper is not None and {"source", "metric", "mean"} <= set(paper), f"{preset}: no paper: field"
    assert paper.metric in ("accuracy", "mse")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    work = tmp_path_factory.mktemp("presets")
    data = {
        "sine": [],
        "omniglot": [f"benchmark.root={omniglot_tree(work / 'omniglot', OMNIGLOT_BACKGROUND, OMNIGLOT_EVALUATION)}",
                     "benchmark.split_scheme=lake", *OMNIGLOT_TINY],
        "miniimagenet": [f"benchmark.root={mini_cache_pickles(work / 'miniimagenet', classes=MINI)}", *TINY],
    }
    groups: dict[str, list[str]] = {}
    for preset in PRESETS:
        groups.setdefault(benchmark_of(preset), []).append(preset)
    env = {"METARUN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    # benchmark= given too: the sweep's overrides (benchmark.image_size) must fit before an experiment is chosen
    procs = {bench: start_metarun("train", "-m", f"benchmark={bench}", f"experiment={','.join(presets)}", *COMMON,
                                  *data[bench],
                                  f"hydra.sweep.dir={work / bench}", "hydra.sweep.subdir=${hydra.job.num}",
                                  cwd=work, env=env)
             for bench, presets in groups.items()}
    out: dict[str, tuple[int, str, Path]] = {}
    deadline = time.monotonic() + 900
    for bench, proc in procs.items():
        done = finish(proc, timeout=max(1.0, deadline - time.monotonic()))
        for number, preset in enumerate(groups[bench]):
            out[preset] = (done.returncode, done.stderr[-2000:], work / bench / str(number))
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_and_tests_on_a_fixture(preset: str, smoke_runs: dict[str, tuple[int, str, Path]]) -> None:
    returncode, stderr, run_dir = smoke_runs[preset]
    results = run_dir / "results.json"
    assert results.is_file(), f"{preset}: no results.json (exit {returncode}): {stderr}"
    report = json.loads(results.read_text())
    assert report["split"] == "test" and report["tasks"] == 6 and report["nonfinite_tasks"] == 0
    assert 0.0 <= report["mean"] < float("inf")
    assert returncode == 0, stderr
