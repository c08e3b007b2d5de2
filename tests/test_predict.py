"""`MetaAlgorithm.query_scores` (what `metarun predict` reads) agrees with `evaluate` for every classification
algorithm: its argmax is the label evaluate scores, task by task. `metarun predict` end to end on the generated
Omniglot: labels and probabilities as CSV and JSON, equal to the learner's own in Python, and each bad input's
one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from metarun.algorithms.base import MetaAlgorithm
from metarun.config import config_dir
from metarun.defaults import option_node
from metarun.episodes import TaskBatch
from metarun.models.mlp import MLP
from tests.cli_batch import run_in_one_process
from tests.image_fixtures import (BACKGROUND, EVALUATION, error_line, finish, mini_folders, omniglot_tree,
                                 start_metarun)
from tests.test_feat import TOY, toy_batch

ALGOS = sorted(p.stem for p in (config_dir() / "algo").glob("*.yaml"))
CLASSIFIERS = [a for a in ALGOS if "classification" in get_class(option_node("algo", a)._target_).supports]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(algo: str) -> MetaAlgorithm:
    node = OmegaConf.to_container(option_node("algo", algo))
    cls = get_class(node["_target_"])
    torch.manual_seed(0)
    runtime = {"generator": torch.Generator().manual_seed(0)} if cls.draws_randomness else {}
    backbone = MLP(cls.backbone_input_shape(TOY), hidden=[16, 8])
    options = {k: v for k, v in node.items() if not k.startswith("_")}
    return cls(backbone, TOY, **options, **runtime).double().eval()


def test_every_classification_algorithm_is_checked() -> None:
    assert {"maml", "protonet", "matching", "feat", "siamese", "metaoptnet", "r2d2", "reptile", "mmaml", "leo",
            "incontext"} <= set(CLASSIFIERS)


@pytest.mark.parametrize("algo", CLASSIFIERS)
def test_query_scores_give_the_labels_evaluate_scores(algo: str) -> None:
    model = build(algo)
    batch = toy_batch(tasks=3, shots=2, queries=3)
    with torch.no_grad():
        scores = model.query_scores(batch)
        accuracy = model.evaluate(batch)["accuracy"]
    assert scores.shape == (3, 9, 3) and torch.isfinite(scores).all()
    torch.testing.assert_close((scores.argmax(dim=-1) == batch.query_y).double().mean(dim=1), accuracy.double())
    assert not scores.requires_grad


# -- `metarun predict` end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ProtoNet and a MAML checkpoint (debug=smoke, 5-way) on the generated Omniglot, and support/query folders
    made of the fixture's own PNGs: 5 characters, 2 drawings each as support and 2 others as queries."""
    work = tmp_path_factory.mktemp("predict")
    root = omniglot_tree(work / "omniglot", BACKGROUND, EVALUATION)
    common = ["model=cnn", "benchmark=omniglot", f"benchmark.root={root}", "benchmark.split_scheme=lake",
              "benchmark.image_size=16", "benchmark.queries=2", "debug=smoke", "logger.tensorboard=false",
              "logger.console=false"]
    env = {"METARUN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    runs = {algo: start_metarun("train", f"algo={algo}", *common, f"hydra.run.dir={work / algo}", cwd=work, env=env)
            for algo in ("protonet", "maml")}
    characters = sorted((root / "omniglot-py" / "images_background").glob("*/character*"))[:5]
    for character in characters:
        drawings = sorted(character.glob("*.png"))
        name = f"{character.parent.name}-{character.name}"
        (work / "support" / name).mkdir(parents=True)
        for drawing in drawings[:2]:
            shutil.copy(drawing, work / "support" / name / drawing.name)
        (work / "query").mkdir(exist_ok=True)
        for drawing in drawings[2:4]:
            shutil.copy(drawing, work / "query" / f"{name}_{drawing.name}")
    for algo, proc in runs.items():
        done = finish(proc)
        assert done.returncode == 0, done.stderr
    return {"work": work, "env": env, "protonet": work / "protonet" / "checkpoints" / "best.pt",  # type: ignore[dict-item]
            "maml": work / "maml" / "checkpoints" / "best.pt", "support": work / "support", "query": work / "query"}


def predict_args(ckpt: Path, support: Path, query: Path, *extra: str) -> list[str]:
    return ["predict", f"ckpt_path={ckpt}", f"support={support}", f"query={query}", *extra]


def test_predict_labels_the_files_with_the_learners_own_probabilities(trained: dict[str, Path]) -> None:
    work, support, query = trained["work"], trained["support"], trained["query"]
    csv_file, json_file = work / "out" / "labels.csv", work / "out" / "labels.json"
    ok_protonet, ok_maml = run_in_one_process(
        [predict_args(trained["protonet"], support, query, f"output={csv_file}", f"hydra.run.dir={work / 'p1'}"),
         predict_args(trained["maml"], support, query, f"output={json_file}", f"hydra.run.dir={work / 'p2'}")],
        cwd=work, env=trained["env"])  # type: ignore[arg-type]
    assert ok_protonet.returncode == 0, ok_protonet.stderr
    assert ok_maml.returncode == 0, ok_maml.stderr
    classes = sorted(p.name for p in support.iterdir())
    with open(csv_file) as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["file"]).name for r in rows] == sorted(p.name for p in query.iterdir())
    assert list(rows[0]) == ["file", "label", "probability", *(f"p({c})" for c in classes)]
    for row in rows:
        probabilities = [float(row[f"p({c})"]) for c in classes]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == classes[probabilities.index(max(probabilities))]
    assert json.loads((work / "p1" / "predictions.json").read_text())[0]["label"] == rows[0]["label"]
    maml_rows = json.loads(json_file.read_text())
    assert len(maml_rows) == 10 and set(maml_rows[0]["probabilities"]) == set(classes)
    # the same numbers as the learner gives in Python, through the path `metarun eval` rebuilds it by
    from metarun.run import restore

    _, _, benchmark, algorithm, _, _ = restore(str(trained["protonet"]), ["benchmark.ways=5", "benchmark.shots=2"])
    files = [f for c in classes for f in sorted((support / c).glob("*.png"))]
    batch = TaskBatch(benchmark.load_inputs(files)[None], torch.arange(5).repeat_interleave(2)[None],
                      benchmark.load_inputs(sorted(query.iterdir()))[None], torch.zeros(1, 10, dtype=torch.long))
    algorithm.eval()
    with torch.no_grad():
        want = torch.softmax(algorithm.query_scores(batch)[0].double(), dim=-1)
    got = torch.tensor([[float(r[f"p({c})"]) for c in classes] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_predict_bad_inputs_are_one_line_each(trained: dict[str, Path], tmp_path: Path) -> None:
    work, support, query, ckpt = trained["work"], trained["support"], trained["query"], trained["protonet"]
    one_class = tmp_path / "one_class"
    shutil.copytree(next(support.iterdir()), one_class / "only")
    uneven = tmp_path / "uneven"
    shutil.copytree(support, uneven)
    next(next(uneven.iterdir()).glob("*.png")).unlink()
    empty_class = tmp_path / "empty_class"
    shutil.copytree(support, empty_class)
    (empty_class / "zz-empty").mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(query, broken)
    (broken / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    three = tmp_path / "three"
    for c in sorted(support.iterdir())[:3]:
        shutil.copytree(c, three / c.name)
    cases = {
        "no support": (predict_args(ckpt, tmp_path / "nowhere", query), "not a folder"),
        "one class": (predict_args(ckpt, one_class, query), "1 class folder(s)"),
        "uneven shots": (predict_args(ckpt, uneven, query), "the same number of examples"),
        "empty class": (predict_args(ckpt, empty_class, query), "'zz-empty' holds no example files"),
        "no query": (predict_args(ckpt, support, tmp_path / "nothing"), "no such file or folder"),
        "bad output": (predict_args(ckpt, support, query, "output=labels.txt"), "give a .csv or .json"),
        "damaged image": (predict_args(ckpt, support, broken), "damaged.png"),
        "fixed head": (predict_args(trained["maml"], three, query), "trained 5-way with a fixed output layer"),
        "no checkpoint": (["predict", f"support={support}", f"query={query}"], "needs ckpt_path="),
    }
    outcomes = run_in_one_process([[*args, f"hydra.run.dir={tmp_path / 'runs' / name.replace(' ', '_')}"]
                                   for name, (args, _) in cases.items()], cwd=work, env=trained["env"])  # type: ignore[arg-type]
    for (name, (_, expected)), proc in zip(cases.items(), outcomes, strict=True):
        assert proc.returncode == 2, (name, proc.stderr)
        assert expected in error_line(proc), (name, proc.stderr)


def test_cross_domain_eval_scores_another_benchmark_and_names_a_shape_mismatch(trained: dict[str, Path]) -> None:
    """`metarun eval ckpt_path=<omniglot run> benchmark=...`: a greyscale folder benchmark is scored (Chen et
    al.'s cross-domain protocol); RGB miniImageNet does not fit the 1-channel network, in one line naming both."""
    work = trained["work"]
    mini = mini_folders(work / "mini_rgb")
    common = [f"ckpt_path={trained['protonet']}", "trainer.eval_tasks=4", "benchmark.queries=2"]
    grey, rgb = run_in_one_process(
        [["eval", *common, "benchmark=folder", f"benchmark.root={mini}", "benchmark.channels=1",
          "benchmark.image_size=16", f"hydra.run.dir={work / 'cross_grey'}"],
         ["eval", *common, "benchmark=miniimagenet", f"benchmark.root={mini}", "benchmark.image_size=16",
          f"hydra.run.dir={work / 'cross_rgb'}"]], cwd=work, env=trained["env"])  # type: ignore[arg-type]
    assert grey.returncode == 0, grey.stderr
    results = json.loads((work / "cross_grey" / "results.json").read_text())
    assert results["benchmark"] == "folder" and results["tasks"] == 4 and 0.0 <= results["mean"] <= 1.0
    assert rgb.returncode == 2
    line = error_line(rgb)
    assert "[64, 1, 3, 3] in the checkpoint and [64, 3, 3, 3] here" in line and "(3, 16, 16)" in line
    assert "OmniglotBenchmark" in line
