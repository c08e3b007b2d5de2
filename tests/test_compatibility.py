"""Every algorithm x model x benchmark through the CLI: it trains and evaluates (exit 0, results.json),
or it exits 2 at start-up with one line naming the conflict and what works instead.

Algorithms are every configs/algo/*.yaml; models mlp, cnn and transformer and benchmarks sine, omniglot
and miniimagenet where their configs exist (the image ones on tiny generated fixtures, tests/image_fixtures,
where the transformer's patch is set to divide their 16x16 images).
Which outcome to expect comes from the classes themselves (an algorithm's `supports`, a model's
`accepts`), as run.py decides it, so the test pins both the successes and the one-line refusals.

Speed: a process spends seconds importing torch before it does anything, so the combinations that
should train run as one Hydra multirun (`-m`) per benchmark and model list, and the refusals (a multirun
stops at the first job that exits 2) run one after another through `metarun.cli.main` in one process
(tests/cli_batch.py: in the whole suite on 2 cores, this file's fixture took 144 s with a process per
refusal and 82 s so). Processes run a few at a
time, one thread each, started together by a module fixture; each combination is then its own test.
Refusals in a process of their own are pinned by the algorithms' tests (e.g. tests/test_feat.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import OmegaConf

from metarun.config import config_dir
from tests.cli_batch import finish_in_one_process, start_in_one_process
from tests.image_fixtures import EVALUATION, mini_cache_pickles, omniglot_tree, start_metarun

ROOT = config_dir()
ALGOS = sorted(p.stem for p in (ROOT / "algo").glob("*.yaml"))
MODELS = [m for m in ("mlp", "cnn", "transformer") if (ROOT / "model" / f"{m}.yaml").is_file()]
# benchmark -> (task kind, input kind) as its TaskSpec declares them
BENCHMARKS = {b: kinds for b, kinds in (("sine", ("regression", "vector")),
                                         ("omniglot", ("classification", "image")),
                                         ("miniimagenet", ("classification", "image")))
              if (ROOT / "benchmark" / f"{b}.yaml").is_file()}
COMBINATIONS = [(a, m, b) for b in BENCHMARKS for m in MODELS for a in ALGOS]

# Tiny episodes keep ~40 runs quick; 6 alphabets x 4 characters x 4 rotations leave 80 training classes
# (the lake split holds one background alphabet out), enough for ProtoNet's 60-way training episodes.
OMNIGLOT_BACKGROUND = {f"Alphabet_{c}": 4 for c in "ABCDEF"}
# 16x16 is the smallest image Conv-4 with max-pooling takes; few queries: a forward pass costs little
TINY_IMAGES = ["benchmark.image_size=16", "benchmark.queries=2"]
COMMON = ["debug=smoke", "logger.tensorboard=false", "logger.console=false"]
# what a model needs for a benchmark's inputs (model, input kind): the transformer's default patch (7, for
# 28x28 Omniglot) does not divide the 16x16 TINY_IMAGES; 8 does (4 tokens: cheap)
MODEL_OPTIONS = {("transformer", "image"): ["model.patch=8"]}
MAX_PARALLEL = 3
DEADLINE_S = 900


def model_options(model: str, benchmark: str) -> list[str]:
    return MODEL_OPTIONS.get((model, BENCHMARKS[benchmark][1]), [])


def expected_conflict(algo: str, model: str, benchmark: str) -> str | None:
    """The `group=option` run.py refuses for this combination (checked in its order), or None if it should train."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"algo={algo}", f"model={model}", f"benchmark={benchmark}"])
    GlobalHydra.instance().clear()
    kind, inputs = BENCHMARKS[benchmark]
    if kind not in getattr(get_class(cfg.algo._target_), "supports", {"classification", "regression"}):
        return f"algo={algo}"
    if inputs not in getattr(get_class(cfg.model._target_), "accepts", {"vector", "image"}):
        return f"model={model}"
    return None


@dataclass
class Job:
    args: list[str]
    combinations: list[tuple[str, str, str]]
    proc: subprocess.Popen[str] | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    started: float = 0.0
    seconds: float = 0.0


@dataclass
class Outcomes:
    conflicts: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    jobs: dict[tuple[str, str, str], Job] = field(default_factory=dict)
    run_dirs: dict[tuple[str, str, str], Path] = field(default_factory=dict)


def _run_all(jobs: list[Job], cwd: Path, env: dict[str, str], slots: int = MAX_PARALLEL) -> None:
    """Run the jobs `slots` at a time (in list order), collecting their output."""
    pending, running = list(jobs), []
    deadline = time.monotonic() + DEADLINE_S
    while pending or running:
        while pending and len(running) < slots:
            job = pending.pop(0)
            job.started = time.monotonic()
            job.proc = start_metarun(*job.args, cwd=cwd, env=env)
            running.append(job)
        for job in list(running):
            assert job.proc is not None
            if job.proc.poll() is not None or time.monotonic() > deadline:
                if job.proc.poll() is None:
                    job.proc.kill()
                job.stdout, job.stderr = job.proc.communicate()
                job.returncode, job.seconds = job.proc.returncode, time.monotonic() - job.started
                running.remove(job)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    work = tmp_path_factory.mktemp("compatibility")
    data = {"sine": [],
            "omniglot": [f"benchmark.root={omniglot_tree(work / 'omniglot', OMNIGLOT_BACKGROUND, EVALUATION)}",
                         "benchmark.split_scheme=lake", *TINY_IMAGES],
            "miniimagenet": [f"benchmark.root={mini_cache_pickles(work / 'miniimagenet')}",
                             *TINY_IMAGES]}
    out = Outcomes()
    jobs: list[Job] = []
    refusals: list[Job] = []
    for benchmark in BENCHMARKS:
        by_model: dict[str, list[str]] = {}
        for algo, model, bench in COMBINATIONS:
            if bench != benchmark:
                continue
            conflict = out.conflicts[(algo, model, bench)] = expected_conflict(algo, model, bench)
            if conflict is None:
                by_model.setdefault(model, []).append(algo)
                continue
            run_dir = work / "refused" / f"{algo}_{model}_{bench}"
            refusals.append(Job([*("train", f"algo={algo}", f"model={model}", f"benchmark={bench}"), *data[bench],
                                 *model_options(model, bench), *COMMON, f"hydra.run.dir={run_dir}"],
                                [(algo, model, bench)]))
        # models that train the same algorithms with the same extra options share one multirun
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
        for model, algos in by_model.items():
            groups.setdefault((tuple(algos), tuple(model_options(model, benchmark))), []).append(model)
        for i, ((algos, options), models) in enumerate(groups.items()):
            sweep_dir = work / "sweeps" / f"{benchmark}_{i}"
            jobs.append(Job(["train", "-m", f"algo={','.join(algos)}", f"model={','.join(models)}",
                             f"benchmark={benchmark}", *data[benchmark], *options, *COMMON,
                             f"hydra.sweep.dir={sweep_dir}"],
                            [(a, m, benchmark) for m in models for a in algos]))
    env = {"METARUN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    refusal_args = [job.args for job in refusals]
    batch = start_in_one_process(refusal_args, work, env)  # one slot: beside the multiruns
    _run_all(jobs, work, env, slots=MAX_PARALLEL - 1)
    for job, done in zip(refusals, finish_in_one_process(batch, refusal_args, timeout=DEADLINE_S), strict=True):
        job.returncode, job.stdout, job.stderr = done.returncode, done.stdout, done.stderr
    for job in jobs + refusals:
        for combination in job.combinations:
            out.jobs[combination] = job
        if "-m" in job.args:
            sweep_dir = Path(next(a for a in job.args if a.startswith("hydra.sweep.dir=")).split("=", 1)[1])
            for overrides in sweep_dir.glob("*/.hydra/overrides.yaml"):
                chosen = dict(str(o).split("=", 1) for o in OmegaConf.load(overrides) if "=" in str(o))
                out.run_dirs[(chosen["algo"], chosen["model"], chosen["benchmark"])] = overrides.parent.parent
    return out


@pytest.mark.parametrize("algo, model, benchmark", COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_combination_trains_or_names_the_conflict(outcomes: Outcomes, algo: str, model: str, benchmark: str) -> None:
    combination = (algo, model, benchmark)
    job = outcomes.jobs[combination]
    conflict = outcomes.conflicts[combination]
    if conflict is None:
        run_dir = outcomes.run_dirs.get(combination)
        results_file = None if run_dir is None else run_dir / "results.json"
        assert results_file is not None and results_file.is_file(), (
            f"no results for {combination}; its multirun exited {job.returncode}:\n{job.stderr[-3000:]}")
        results = json.loads(results_file.read_text())
        assert (results["algo"], results["model"], results["benchmark"]) == combination
        assert results["tasks"] == 6 and math.isfinite(results["mean"]), results
    else:
        assert job.returncode == 2, f"{combination}: exit {job.returncode}\n{job.stderr[-3000:]}"
        lines = [line for line in job.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, job.stderr
        assert conflict in lines[0] and f"benchmark={benchmark}" in lines[0] and "; use " in lines[0], lines[0]
        assert not (Path(job.args[-1].split("=", 1)[1]) / "results.json").exists()


def test_every_algorithm_runs_somewhere(outcomes: Outcomes) -> None:
    """Guards the expectations themselves: no supervised algorithm config is refused everywhere (the meta-RL
    learners' column is tests/test_rl_compatibility.py)."""
    for algo in ALGOS:
        if expected_conflict(algo, "mlp", "sine") == f"algo={algo}" and \
                expected_conflict(algo, "cnn", "omniglot") == f"algo={algo}":
            continue  # supports neither supervised kind: a reinforcement learner
        assert any(outcomes.conflicts[(algo, m, b)] is None for m in MODELS for b in BENCHMARKS), algo
