"""Every experiment preset (configs/experiment/*.yaml) composes, validates, states its launching command and
its figure (`paper:` a published one with its source, or `reference:` our own with how it was measured), and
trains and tests a few steps (debug=smoke) on generated data in the real formats.

The smoke runs change only what a fixture cannot provide: the Omniglot fixture is split by alphabet (lake;
the presets' Vinyals and random splits name characters of the real set), and images are small (28x28 Omniglot,
16x16 miniImageNet) with 2 queries, so that the runs take a minute or two; presets differing only in their episode shape smoke-run
one of each (SMOKE_PRESETS). One Hydra multirun per benchmark, the three side by side.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from metarun.config import config_dir, validate
from tests.conftest import run_metarun
from tests.image_fixtures import (cifar100_python, finish, mini_cache_pickles, mini_classes, omniglot_tree,
                                  start_metarun)

PRESETS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
# Enough classes for the presets' episodes: 20-way validation and testing, 60-way ProtoNet training
# (lake split: one background alphabet validates), 30-way ProtoNet training on miniImageNet.
OMNIGLOT_BACKGROUND = {f"Alphabet_{c}": 5 for c in "ABCDEF"}  # 5 x 4 rotations = 20 classes per alphabet
OMNIGLOT_EVALUATION = {"Script_X": 3, "Script_Y": 3}  # 24 test classes
MINI = mini_classes(train=30, val=20, test=20)
MINI_PER_CLASS = 21  # MetaOptNet meta-trains with 15 shots + 6 queries per class (the real set has 600)
TINY = ["benchmark.image_size=16", "benchmark.queries=2"]
OMNIGLOT_TINY = ["benchmark.image_size=28", "benchmark.queries=2"]  # 28: the ViT preset's 7x7 patches must fit
COMMON = ["debug=smoke", "logger.tensorboard=false", "logger.console=false"]
# Presets without a published figure: our own settings, or a protocol whose paper prints no number (maml_sine:
# Finn et al.'s sine results are a plot). They carry `reference:`, never `paper:`.
WITHOUT_PUBLISHED_FIGURE = {*(f"{a}_multimodal_{m}modes" for a in ("maml", "mmaml") for m in (2, 3, 5)),
                            "incontext_sine", "maml_sine", "maml_transformer_omniglot", "maml_transformer_sine",
                            "siamese_omniglot_5w1s"}
# A published figure's source: authors, year, table (or figure), e.g. "Snell et al. 2017, Table 1".
# Presets whose episodes the shared tiny fixture cannot give (Koch's: 105x105 images, 20-way tasks within one
# alphabet): each runs on a fixture of its own in its algorithm's tests (tests/test_siamese.py).
OWN_FIXTURE = {"siamese_omniglot_koch"}
# Finn et al.'s HalfCheetah tasks need MuJoCo (pip install "gymnasium[mujoco]"): run where it installs, else the
# one line the run stops with is checked and the smoke run is skipped with that reason
NEEDS_MUJOCO = {"maml_halfcheetah_vel", "maml_halfcheetah_dir"}
# Smoke runs: one preset per algorithm and benchmark. Presets that differ only in their episode shape
# (`_5w1s`, `_5w5s`, `_20w1s`, `_20w5s`) compose and validate each (above); the 5-way 1-shot one (else the first)
# trains, since the rest run the same code on other numbers and their runs made this file CI's slowest.
EPISODE_SHAPE = re.compile(r"_\d+w\d+s$")
PAPER_SOURCE = re.compile(r"^[A-Z][A-Za-z&. ]+ (et al\. )?\d{4}, (Table|Figure) \d+\b")


def has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def composed(preset: str) -> OmegaConf:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={preset}"])
    GlobalHydra.instance().clear()
    return cfg


def benchmark_of(preset: str) -> str:
    name = str(composed(preset).benchmark._target_).rsplit(".", 1)[-1].removesuffix("Benchmark").lower()
    return {"tabularmdp": "tabular_mdp"}.get(name, name)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_states_its_command_and_reference(preset: str) -> None:
    cfg = composed(preset)
    validate(cfg)
    header = (config_dir() / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_"
    assert header[1].startswith(f"# metarun train experiment={preset}"), header[1]
    paper, reference = cfg.get("paper"), cfg.get("reference")
    assert (paper is None) != (reference is None), f"{preset}: needs exactly one of paper: and reference:"
    figure = paper if paper is not None else reference
    assert {"source", "metric", "mean"} <= set(figure) and figure.mean is not None, f"{preset}: {figure}"
    assert re.fullmatch(r"(accuracy|mse|return)(@\d+)?", figure.metric), figure.metric
    if preset in WITHOUT_PUBLISHED_FIGURE:
        assert paper is None, f"{preset} has no published figure: its own figure goes under reference:"
    if paper is not None:
        assert PAPER_SOURCE.match(paper.source), f"{preset}: paper.source names no authors, year, table: {paper.source}"
        assert not re.search(r"\b(metarun|ours?|we)\b", paper.source, re.I), f"{preset}: our own figure under paper:"
    else:
        assert reference.get("note"), f"{preset}: reference: needs a note saying how it was measured"


@pytest.mark.parametrize("preset", ["protonet_omniglot_20w1s", "maml_transformer_omniglot", "maml_sine"])
def test_report_labels_a_preset_figure_by_its_kind(preset: str, tmp_path: Path) -> None:
    """A run of the preset (its saved config) is reported beside the preset's figure, labelled as the paper's
    (with its source) or as our reference."""
    cfg = composed(preset)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / ".hydra" / "overrides.yaml").write_text(f"- experiment={preset}\n")
    metric = "mse" if str(cfg.benchmark._target_).endswith("SineBenchmark") else "accuracy"
    (run / "results.json").write_text(json.dumps({
        "metric": metric, "split": "test", "mean": 0.5, "ci95": 0.01, "tasks": 600, "steps": 1, "seed": 0,
        "algo": "a", "model": "m", "benchmark": "b", "metrics": {"mse@1": {"mean": 0.3, "ci95": 0.03}}}))
    proc = run_metarun("report", str(run), "--paper", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    if cfg.get("paper") is not None:
        assert row["figure"] == "paper" and row["source"] == f"paper ({cfg.paper.source})"
        assert row["figure_mean"] == cfg.paper.mean
    else:
        assert row["figure"] == "reference" and row["source"].startswith("ours (reference)")
        assert row["figure_mean"] == cfg.reference.mean
    assert row["verdict"] in ("within CIs", "above", "below")


def _smoke_presets() -> list[str]:
    """One preset per name without its episode shape: the 5-way 1-shot one where there is one, else the first."""
    chosen: dict[str, str] = {}
    for preset in PRESETS:
        family = EPISODE_SHAPE.sub("", preset)
        if family not in chosen or preset.endswith("_5w1s"):
            chosen[family] = preset
    return sorted(chosen.values())


SMOKE_PRESETS = _smoke_presets()


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    work = tmp_path_factory.mktemp("presets")
    data = {
        "sine": [],
        "bandit": [],  # generated tasks: no data
        "tabular_mdp": [],
        "navigation2d": [],
        "multimodal": [],
        "omniglot": [f"benchmark.root={omniglot_tree(work / 'omniglot', OMNIGLOT_BACKGROUND, OMNIGLOT_EVALUATION)}",
                     "benchmark.split_scheme=lake", *OMNIGLOT_TINY],
        "miniimagenet": [f"benchmark.root={mini_cache_pickles(work / 'miniimagenet', classes=MINI, per_class=MINI_PER_CLASS)}", *TINY],
    }
    # CIFAR-100 with 24 images per class: MetaOptNet's FC100 training episodes take 15 shots + 6 queries
    cifar = f"benchmark.root={cifar100_python(work / 'cifar100', train_per_class=20, test_per_class=4)}"
    data["cifarfs"] = data["fc100"] = [cifar, *TINY]
    if has_transformers():  # FewRel: a tiny saved encoder and FewRel-format files with 10-way episodes of 5 + 5
        from tests.hf_fixtures import TOPICS, save_tiny_model, write_fewrel

        topics = [list(TOPICS)[i % len(TOPICS)] for i in range(12)]
        for name in ("train_wiki.json", "val_wiki.json"):
            write_fewrel(work / "fewrel", topics, name, per_class=10)
        data["text"] = [f"benchmark.root={work / 'fewrel'}", f"model.name_or_path={save_tiny_model(work / 'tiny')}",
                        "model.max_length=16"]
    groups: dict[str, list[str]] = {}
    for preset in SMOKE_PRESETS:
        if preset not in OWN_FIXTURE | NEEDS_MUJOCO and benchmark_of(preset) in data:
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


@pytest.mark.parametrize("preset", sorted(NEEDS_MUJOCO))
def test_mujoco_preset_runs_or_says_what_to_install(preset: str, tmp_path: Path) -> None:
    smoke = ["debug=smoke", "benchmark.horizon=5", "algo.rollouts=2", "algo.eval_inner_steps=1",
             "logger.console=false", "logger.tensorboard=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_metarun("train", f"experiment={preset}", *smoke, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    try:
        import mujoco  # noqa: F401
    except ImportError:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "MuJoCo is not installed" in lines[0], proc.stderr
        pytest.skip(f"{preset}: MuJoCo is not installed here ({lines[0].split(': ', 2)[-1]}); the preset composes "
                    f"and stops with that one line")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["metric"] == "return" and math.isfinite(report["mean"]) and "return@1" in report["metrics"]


def test_every_preset_family_has_a_smoke_run() -> None:
    """Guards the subset: every preset either smoke-runs or shares its name, up to the episode shape, with one that does."""
    for preset in PRESETS:
        assert EPISODE_SHAPE.sub("", preset) in {EPISODE_SHAPE.sub("", p) for p in SMOKE_PRESETS}, preset
    assert "maml_omniglot_5w1s" in SMOKE_PRESETS and "maml_omniglot_20w5s" not in SMOKE_PRESETS


@pytest.mark.parametrize("preset", sorted(set(SMOKE_PRESETS) - OWN_FIXTURE - NEEDS_MUJOCO))
def test_preset_trains_and_tests_on_a_fixture(preset: str, smoke_runs: dict[str, tuple[int, str, Path]]) -> None:
    if benchmark_of(preset) == "text" and not has_transformers():
        pytest.skip('benchmark=text needs the nlp extra: pip install ".[nlp]"')
    returncode, stderr, run_dir = smoke_runs[preset]
    results = run_dir / "results.json"
    assert results.is_file(), f"{preset}: no results.json (exit {returncode}): {stderr}"
    report = json.loads(results.read_text())
    assert report["split"] == "test" and report["tasks"] == 6 and report["nonfinite_tasks"] == 0
    # returns may be negative (navigation2d: minus the distance to the goal); accuracies, errors and bandit returns not
    assert math.isfinite(report["mean"]) and (report["mean"] >= 0.0 or benchmark_of(preset) == "navigation2d")
    assert returncode == 0, stderr
    cfg = composed(preset)  # the preset's figure travels with the result, under its own kind
    for kind in ("paper", "reference"):
        expected = OmegaConf.to_container(cfg[kind]) if cfg.get(kind) is not None else None
        assert report.get(kind) == expected, f"{preset}: results.json {kind}"
