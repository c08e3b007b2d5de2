"""Golden trajectories: a seeded tiny training run of every algorithm must keep its numbers.

Each case below trains in-process (hydra's compose API, then `metarun.run.train`, in a temporary working
directory, which run.py uses as the run directory when Hydra is not running), on one CPU thread, and
compares with tests/golden/trajectories.json:

* `train/loss` and `train/grad_norm` of every step (trainer.log_every=1),
* the test pool's metric of the best checkpoint (results.json `mean`) and every metric the algorithm
  reports there (`test/metrics`: e.g. MAML's mse@k after k inner steps),
* the best validation metric (`val_best`, also what train() returns to a sweeper) and its step,
* with model.bn=inductive, the norm of every BatchNorm layer's running mean and variance in the final weights.

Gradient-based learners run on sine with model=mlp; the metric learners, MAML, and ProtoNet with
model.bn=inductive (its BatchNorm running statistics are used at test time, so the test numbers pin them)
run on the generated Omniglot fixture of tests/image_fixtures.py with model=cnn. The Omniglot episodes
are 16-way: 5-way episodes of the fixture are solved at ~100%, which would make the accuracies pin little.

Tolerance: rtol 1e-4, atol 1e-6 (integers exactly). A refactor that is meant to keep the mathematics
must keep these numbers; one that changes them on purpose re-records them, and says so in its commit:

    METARUN_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py

rewrites tests/golden/trajectories.json (the selected cases; the coverage test drops stale entries).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from metarun.config import config_dir
from metarun.run import train
from tests.image_fixtures import EVALUATION, omniglot_tree

GOLDEN = Path(__file__).parent / "golden" / "trajectories.json"
RECORD = os.environ.get("METARUN_RECORD_GOLDEN", "") not in ("", "0")
RTOL, ATOL = 1e-4, 1e-6
ROOT = config_dir()
ALGOS = sorted(p.stem for p in (ROOT / "algo").glob("*.yaml"))

STEPS = 6
COMMON = ["seed=0", "device=cpu", "threads=1", "logger.tensorboard=false", "logger.console=false",
          f"trainer.steps={STEPS}", "trainer.meta_batch_size=2", "trainer.log_every=1", "trainer.eval_every=3",
          "trainer.checkpoint_every=1000", "trainer.val_tasks=4", "trainer.eval_tasks=8", "trainer.pool_seed=0"]
SINE = ["benchmark=sine", "model=mlp"]
# the fixture's root and decode cache are temporary paths, added at run time (not recorded)
OMNIGLOT = ["benchmark=omniglot", "model=cnn", "benchmark.split_scheme=lake", "benchmark.image_size=16",
            "benchmark.ways=16", "benchmark.shots=1", "benchmark.queries=2", "benchmark.decode_workers=1"]
# 6 alphabets x 4 characters x 4 rotations: the lake split leaves 80 train, 16 val and 16 test classes
OMNIGLOT_BACKGROUND = {f"Alphabet_{c}": 4 for c in "ABCDEF"}

CASES: dict[str, list[str]] = {
    **{f"{algo}-sine-mlp": [f"algo={algo}", *SINE] for algo in ("maml", "fomaml", "anil", "metasgd", "reptile",
                                                                 "incontext")},
    **{f"{algo}-omniglot-cnn": [f"algo={algo}", *OMNIGLOT] for algo in ("protonet", "matching", "feat", "maml")},
    "protonet-omniglot-cnn-bn_inductive": ["algo=protonet", *OMNIGLOT, "model.bn=inductive"],
    "siamese-omniglot-cnn": ["algo=siamese", *OMNIGLOT],
    # the shared meta-training distortions (benchmarks/augment.py), pinned through the pairs they make
    "siamese-omniglot-cnn-augment": ["algo=siamese", *OMNIGLOT, "+benchmark.augment={rotation: 10, shear: 0.3, "
                                     "scale: [0.8, 1.2], translation: 2, probability: 0.5}"],
    # the convex heads: the SVM dual (interior point, implicit gradients) and ridge regression's closed form
    # LEO: encoder, relation net, sampled codes and weights, latent steps, fine-tuning; its pair file's clipping
    # by value and then per tensor (trainer.grad_clip_value, trainer.grad_clip_per_tensor)
    "leo-omniglot-cnn": ["algo=leo", *OMNIGLOT],
    "metaoptnet-omniglot-cnn": ["algo=metaoptnet", *OMNIGLOT],
    "metaoptnet-omniglot-cnn-ridge": ["algo=metaoptnet", *OMNIGLOT, "algo.head=ridge"],
    "r2d2-omniglot-cnn": ["algo=r2d2", *OMNIGLOT],
    # RL^2 trained by PPO on its own rollouts (2 trials a step, 4 epochs x 2 minibatches): the environment's and
    # the policy's counter-based noise, GAE, the clipped loss and the minibatch order from the algorithm's generator
    "rl2-bandit-gru": ["algo=rl2", "benchmark=bandit", "benchmark.pulls=5", "model=gru", "model.hidden=16"],
    # hand-designed policies scored with nothing trained: the test pool's tasks and rollouts, pinned
    "baseline-bandit-gittins": ["algo=baseline", "algo.policy=gittins", "benchmark=bandit", "trainer.steps=0"],
    "baseline-mdp-psrl": ["algo=baseline", "algo.policy=psrl", "benchmark=tabular_mdp", "benchmark.episodes=3",
                          "trainer.steps=0"],
    # MAML for RL: rollouts from the task seeds, second-order policy-gradient adaptation, TRPO's CG and line search
    "maml-navigation2d-mlp-trpo": ["algo=maml", "benchmark=navigation2d", "benchmark.horizon=10", "model=mlp",
                                   "model.hidden=[8]", "algo.rollouts=2", "algo.inner_lr=0.1",
                                   "algo.eval_inner_steps=2", "trainer/optimizer=trpo",
                                   # the line search starts at half the step (KL ~ max_kl / 4): the full step lands
                                   # on the KL limit by construction, where rounding could flip accept / reject
                                   "trainer.optimizer.lr=0.5"],
    # MMAML (set-attention task encoder, FiLM) and its Multi-MAML oracle on the multimodal regression tasks
    "mmaml-multimodal-mlp": ["algo=mmaml", "benchmark=multimodal", "model=mlp"],
    "mmaml-multimodal-mlp-oracle": ["algo=mmaml", "algo.oracle=true", "benchmark=multimodal", "model=mlp"],
}


@pytest.fixture(scope="module")
def omniglot_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    work = tmp_path_factory.mktemp("golden_omniglot")
    root = omniglot_tree(work / "omniglot", OMNIGLOT_BACKGROUND, EVALUATION)
    return [f"benchmark.root={root}", f"benchmark.cache_dir={work / 'cache'}"]


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh working directory (the run directory), and the process-wide torch state put back afterwards."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    monkeypatch.chdir(tmp_path)
    # run.py reads the run directory and group names from HydraConfig when one is set: none here
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(1)
            torch.set_default_dtype(torch.float32)  # whatever an earlier test may have left
            yield tmp_path
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        GlobalHydra.instance().clear()


def run_case(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Train in-process in `run_dir` (the current directory); return the numbers the golden file records."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    returned = train(cfg)
    assert (run_dir / "results.json").is_file() and (run_dir / "metrics.jsonl").is_file(), \
        f"the run's files are not in the working directory {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    results = json.loads((run_dir / "results.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train_lines] == list(range(1, int(cfg.trainer.steps) + 1))
    # train() returns the run's best validation metric; with nothing trained (steps 0), the test metric
    assert returned == (results["val_best"] if cfg.trainer.steps else results["mean"])
    recorded: dict[str, Any] = {
        "train/loss": [line["train/loss"] for line in train_lines],
        "train/grad_norm": [line["train/grad_norm"] for line in train_lines],
        "test/mean": results["mean"],
        "test/metrics": {key: value["mean"] for key, value in results["metrics"].items()},
        "val_best": results["val_best"],
        "best_step": results["best_step"],
    }
    # BatchNorm running statistics (model.bn=inductive) of the final weights, per layer: the test pool's
    # accuracy moves in steps of 1/256, too coarsely to notice e.g. statistics taken from other images
    final = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for kind in ("running_mean", "running_var"):
        norms = [float(value.double().norm()) for key, value in final.items() if key.endswith(kind)]
        if norms:
            recorded[f"final/bn_{kind}_norm"] = norms
    return recorded


def differences(recorded: Any, now: Any, path: str = "") -> list[str]:
    """Human-readable differences beyond the tolerance, one per line."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        out = [f"{path}{key}: recorded but no longer produced" for key in recorded if key not in now]
        out += [f"{path}{key}: produced but not recorded (re-record?)" for key in now if key not in recorded]
        for key in recorded:
            if key in now:
                out += differences(recorded[key], now[key], f"{path}{key}" if not path else f"{path}.{key}")
        return out
    if isinstance(recorded, list) and isinstance(now, list):
        if len(recorded) != len(now):
            return [f"{path}: {len(recorded)} values recorded, {len(now)} now"]
        return [line for i, (a, b) in enumerate(zip(recorded, now)) for line in differences(a, b, f"{path}[{i}]")]
    if isinstance(recorded, bool) or isinstance(now, bool) or isinstance(recorded, int) and isinstance(now, int):
        return [] if recorded == now else [f"{path}: recorded {recorded!r}, now {now!r}"]
    if isinstance(recorded, (int, float)) and isinstance(now, (int, float)):
        a, b = float(recorded), float(now)
        if (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
            return []
        rel = abs(a - b) / max(abs(a), 1e-300)
        return [f"{path}: recorded {a!r}, now {b!r} (relative difference {rel:.2e})"]
    return [] if recorded == now else [f"{path}: recorded {recorded!r}, now {now!r}"]


def load_golden() -> dict[str, Any]:
    if GOLDEN.is_file():
        return json.loads(GOLDEN.read_text())
    return {"runs": {}}


def save_golden(golden: dict[str, Any]) -> None:
    golden["about"] = ("Golden numbers of tests/test_golden.py; re-record with "
                       "METARUN_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py")
    golden["tolerance"] = {"rtol": RTOL, "atol": ATOL}
    golden["common_overrides"] = COMMON
    golden["torch"] = torch.__version__
    runs = golden.get("runs", {})
    golden["runs"] = {name: runs[name] for name in CASES if name in runs}  # the test's order
    ordered = {key: golden[key] for key in ("about", "tolerance", "torch", "common_overrides", "runs")}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(ordered, indent=2) + "\n")


@pytest.mark.parametrize("name", list(CASES))
def test_golden_trajectory(name: str, isolated: Path, request: pytest.FixtureRequest) -> None:
    overrides = [*COMMON, *CASES[name]]  # a case may override a common key (the baselines: trainer.steps=0)
    if "benchmark=omniglot" in overrides:
        overrides += request.getfixturevalue("omniglot_overrides")
    now = run_case(overrides, isolated)
    golden = load_golden()
    if RECORD:
        golden["runs"][name] = {"overrides": CASES[name], "recorded": now}
        save_golden(golden)
        pytest.skip(f"recorded {GOLDEN.name}: {name}")
    entry = golden["runs"].get(name)
    assert entry is not None, f"{name} has no golden numbers; record them: METARUN_RECORD_GOLDEN=1 pytest {__file__}"
    problems = differences(entry["recorded"], now)
    notes = []
    if entry["overrides"] != CASES[name]:
        notes.append(f"the case's overrides changed: recorded {entry['overrides']}, now {CASES[name]}")
    if golden.get("common_overrides") != COMMON:
        notes.append(f"the common overrides changed: recorded {golden.get('common_overrides')}, now {COMMON}")
    if golden.get("torch") != torch.__version__:  # informative only: numbers may move between torch versions
        notes.append(f"note: recorded with torch {golden.get('torch')}, running torch {torch.__version__}")
    if problems or entry["overrides"] != CASES[name] or golden.get("common_overrides") != COMMON:
        pytest.fail(f"{name} no longer reproduces its golden numbers (rtol {RTOL}, atol {ATOL}):\n  "
                    + "\n  ".join(problems + notes)
                    + f"\nIf the change is intended, re-record: METARUN_RECORD_GOLDEN=1 pytest {__file__}",
                    pytrace=False)


def test_golden_file_covers_every_algorithm() -> None:
    """Every configs/algo/*.yaml has a case, and the file holds exactly the cases of this test."""
    covered = {next(o.split("=", 1)[1] for o in overrides if o.startswith("algo=")) for overrides in CASES.values()}
    assert set(ALGOS) <= covered, f"algorithms without a golden case: {sorted(set(ALGOS) - covered)}"
    golden = load_golden()
    if RECORD:
        save_golden(golden)  # drops entries of cases that no longer exist
        golden = load_golden()
    assert list(golden["runs"]) == list(CASES), (
        f"golden file cases {list(golden['runs'])} != test cases {list(CASES)}; re-record")
