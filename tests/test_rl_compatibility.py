"""The reinforcement column of the compatibility matrix: every algorithm x model on the RL benchmarks either
builds (and the learners among them train through the CLI) or is refused with the one line run.py prints,
naming the conflict and what works instead.

In-process (`run.build`, which is where run.py refuses) rather than a process per refusal as in
tests/test_compatibility.py: there are ~60 of them and a process costs seconds of torch import; the one-line
exit-2 path of the CLI for them is pinned by the few CLI runs below and in tests/test_rl2.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import OmegaConf

from metarun.config import config_dir, validate
from metarun.errors import UserInputError
from metarun.models.base import input_kind
from metarun.run import build
from tests.conftest import run_metarun
from tests.image_fixtures import error_line

ROOT = config_dir()
ALGOS = sorted(p.stem for p in (ROOT / "algo").glob("*.yaml"))
MODELS = ("mlp", "cnn", "transformer", "gru")
RL_BENCHMARKS = ("bandit", "tabular_mdp", "navigation2d")
# small trials keep the builds cheap (the Transformer's positions and the GRU are sized by the trial length)
SMALL = {"bandit": ["benchmark.pulls=4"], "tabular_mdp": ["benchmark.episodes=2", "benchmark.horizon=3"],
         "navigation2d": ["benchmark.horizon=3"]}


def _config(algo: str, model: str, benchmark: str, *extra: str):  # type: ignore[no-untyped-def]
    """A fresh copy of the composed config (composing costs ~0.1 s; the matrix asks for each one several times)."""
    return OmegaConf.create(_composed(algo, model, benchmark, *extra))


@functools.cache
def _composed(algo: str, model: str, benchmark: str, *extra: str):  # type: ignore[no-untyped-def]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"algo={algo}", f"model={model}", f"benchmark={benchmark}",
                                                      *SMALL[benchmark], *extra])
    GlobalHydra.instance().clear()
    return validate(cfg)


def expected_conflict(algo: str, model: str, benchmark: str) -> str | None:
    """What run.py refuses first (the algorithm's kind, then the model's inputs), from the classes themselves."""
    cfg = _config(algo, model, benchmark)
    algorithm = get_class(cfg.algo._target_)
    spec = get_class(cfg.benchmark._target_)(**{k: v for k, v in cfg.benchmark.items() if k != "_target_"}).spec
    acts = algorithm.continuous_actions if spec.continuous_actions else algorithm.discrete_actions
    if "reinforcement" not in algorithm.supports or not acts:
        return f"algo={algo}"
    if input_kind(algorithm.backbone_input_shape(spec)) not in get_class(cfg.model._target_).accepts:
        return f"model={model}"
    return None


@pytest.mark.parametrize("benchmark", RL_BENCHMARKS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("algo", ALGOS)
def test_rl_combination_builds_or_names_the_conflict(algo: str, model: str, benchmark: str) -> None:
    conflict = expected_conflict(algo, model, benchmark)
    names = {"algo": algo, "model": model, "benchmark": benchmark}
    if conflict is None:
        built, algorithm = build(_config(algo, model, benchmark), names)
        assert built.spec.kind == "reinforcement" and "reinforcement" in algorithm.supports
        return
    with pytest.raises(UserInputError) as raised:
        build(_config(algo, model, benchmark), names)
    line = str(raised.value)
    assert "\n" not in line and conflict in line and f"benchmark={benchmark}" in line and "; use " in line, line
    if conflict == f"algo={algo}":  # pointed at the RL learners of the benchmark's action space
        assert ("algo=maml" if benchmark == "navigation2d" else "algo=rl2") in line


def test_every_rl_learner_runs_somewhere_and_every_supervised_one_is_refused() -> None:
    for algo in ALGOS:
        outcomes = {expected_conflict(algo, m, b) for m in MODELS for b in RL_BENCHMARKS}
        supports = get_class(_config(algo, "mlp", "bandit").algo._target_).supports
        assert (None in outcomes) == ("reinforcement" in supports), (algo, outcomes)


def test_the_rl_learners_train_and_test_through_the_cli(tmp_path: Path) -> None:
    """rl2 with both sequence bodies and a baseline, one multirun on bandits: each writes results.json with the
    return and its CI over the test pool."""
    proc = run_metarun("train", "-m", "algo=rl2", "model=gru,transformer", "benchmark=bandit", "benchmark.pulls=4",
                       "debug=smoke", "trainer.meta_batch_size=4", "logger.tensorboard=false",
                       "logger.console=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                       env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("0", "1"):
        results = json.loads((tmp_path / "sweep" / run / "results.json").read_text())
        assert results["metric"] == "return" and results["algo"] == "rl2" and results["tasks"] == 6, results
        assert 0.0 <= results["mean"] <= 4.0


def test_a_supervised_learner_on_an_rl_benchmark_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_metarun("train", "algo=protonet", "benchmark=bandit", "logger.console=false",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert error_line(proc) == ("metarun: error: algo=protonet supports only classification and benchmark=bandit is "
                                "reinforcement; use algo=rl2 (or algo=baseline for the bandit/MDP baselines)")


@pytest.mark.parametrize("algo", ["rl2", "baseline"])
def test_a_discrete_learner_on_continuous_actions_is_one_line(algo: str) -> None:
    """2D navigation's actions are real numbers: RL^2's categorical policy and the baselines cannot act there."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=[f"algo={algo}", "model=gru",
                                                               "benchmark=navigation2d"]))
    GlobalHydra.instance().clear()
    with pytest.raises(UserInputError, match=rf"^algo={algo} acts in discrete action spaces and "
                                             r"benchmark=navigation2d has continuous actions"):
        build(cfg, {"algo": algo, "model": "gru", "benchmark": "navigation2d"})
