"""benchmark=text: the readers (JSON lines per split, Bao et al.'s one file + class lists, FewRel), the cached int
store of ids and attention masks, seeded episodes by index arithmetic, bad data in one line, and the command line
end to end with model=hf on a tiny encoder saved with save_pretrained (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")

from metarun.benchmarks.text import TextBenchmark  # noqa: E402
from metarun.benchmarks.text_source import fewrel_text  # noqa: E402
from metarun.errors import UserInputError  # noqa: E402
from metarun.models.base import TokenShape, input_kind  # noqa: E402
from tests.conftest import read_results, run_metarun  # noqa: E402
from tests.hf_fixtures import TOPICS, save_tiny_model, write_bao_file, write_fewrel, write_jsonl_splits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-bert")


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny, local_files_only=True)


def bench(root: Path, tiny: Path, cache: Path, **options) -> TextBenchmark:
    settings = {"ways": 3, "shots": 2, "queries": 3, "max_length": 16, **options}
    return TextBenchmark(root=str(root), tokenizer=str(tiny), cache_dir=str(cache), **settings)


def topic_of(tokenizer, ids: torch.Tensor) -> str:
    """The topic whose words a text is made of (every fixture sentence uses one topic's words only)."""
    words = tokenizer.decode(ids[0][ids[1] == 1], skip_special_tokens=True).split()
    found = {t for t, vocab in TOPICS.items() if words and words[0] in vocab.split()}
    assert len(found) == 1, words
    return found.pop()


def test_episodes_are_seeded_class_major_and_each_label_is_one_class(tmp_path: Path, tiny: Path, tokenizer) -> None:
    benchmark = bench(write_jsonl_splits(tmp_path / "data"), tiny, tmp_path / "cache")
    assert benchmark.spec.input_shape == (2, 16) and input_kind(benchmark.spec.input_shape) == "tokens"
    assert isinstance(benchmark.spec.input_shape, TokenShape)
    assert benchmark.spec.input_shape.vocab_size == len(tokenizer)
    batch = benchmark.sample("test", 4, torch.Generator().manual_seed(3))
    again = benchmark.sample("test", 4, torch.Generator().manual_seed(3))
    assert torch.equal(batch.support_x, again.support_x) and torch.equal(batch.query_x, again.query_x)
    assert batch.support_x.shape == (4, 6, 2, 16) and batch.query_x.shape == (4, 9, 2, 16)
    assert batch.support_x.dtype == torch.int64
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for t in range(4):
        names = {}
        for x, y in [*zip(batch.support_x[t], batch.support_y[t]), *zip(batch.query_x[t], batch.query_y[t])]:
            names.setdefault(int(y), set()).add(topic_of(tokenizer, x))
        assert all(len(v) == 1 for v in names.values())
        assert {v.pop() for v in names.values()} <= {"science", "health", "film"}  # the test split's classes
    draws = {tuple(benchmark.sample("train", 1, torch.Generator().manual_seed(s)).support_x.flatten().tolist())
             for s in range(5)}
    assert len(draws) == 5


def test_within_a_class_an_episode_never_draws_the_same_example_twice(tmp_path: Path, tiny: Path) -> None:
    """Examples are the top-(K+Q) of uniform numbers over the class's own count: distinct, and never past it, so
    with K + Q = 5 texts per class every episode holds each of its classes' 5 texts exactly once."""
    benchmark = bench(write_jsonl_splits(tmp_path / "data", per_class=5), tiny, tmp_path / "cache", shots=2,
                      queries=3)
    sampler = benchmark.sampler
    rows_of = [sorted(tuple(r.tolist()) for r in sampler.store[int(a):int(a) + int(n)])
               for a, n in zip(sampler.starts, sampler.counts)]
    for seed in range(10):
        batch = benchmark.sample("train", 2, torch.Generator().manual_seed(seed))
        for t in range(2):
            for label in range(3):
                x = torch.cat((batch.support_x[t][batch.support_y[t] == label],
                               batch.query_x[t][batch.query_y[t] == label]))
                stored = x[:, 0].masked_fill(x[:, 1] == 0, -1).to(sampler.store.dtype)
                drawn = sorted(tuple(r.tolist()) for r in stored)
                assert drawn in rows_of


def test_the_store_holds_exactly_the_tokenizers_ids_and_masks(tmp_path: Path, tiny: Path, tokenizer) -> None:
    root = write_jsonl_splits(tmp_path / "data")
    benchmark = bench(root, tiny, tmp_path / "cache")
    texts = [json.loads(line)["text"] for line in (root / "train.jsonl").read_text().splitlines()]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    store = benchmark.sampler.store
    assert store.dtype == torch.int16 and store.shape == (72, 16)
    torch.testing.assert_close((store[:24] >= 0).long(), enc["attention_mask"])
    torch.testing.assert_close(store[:24].long().masked_fill(store[:24] < 0, tokenizer.pad_token_id), enc["input_ids"])


def test_the_store_is_cached_and_keyed_by_tokenizer_length_and_files(tmp_path: Path, tiny: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = write_jsonl_splits(tmp_path / "data"), tmp_path / "cache"
    first = bench(root, tiny, cache)
    files = sorted(cache.glob("text-*.pt"))
    assert len(files) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again although the store is cached")

    monkeypatch.setattr("metarun.benchmarks.text.build_store", no_tokenising)
    second = bench(root, tiny, cache)
    assert torch.equal(first.sampler.store, second.sampler.store)
    monkeypatch.undo()
    same = save_tiny_model(tmp_path / "same-tokenizer", hidden=16)  # another model, the same tokenizer: same key
    bench(root, same, cache)
    assert len(list(cache.glob("text-*.pt"))) == 1
    bench(root, tiny, cache, max_length=20)
    bench(root, save_tiny_model(tmp_path / "other-tokenizer", whole_words=False), cache)
    with (root / "train.jsonl").open("a") as f:
        f.write(json.dumps({"text": "goal team", "label": "sport"}) + "\n")
    bench(root, tiny, cache)
    assert len(list(cache.glob("text-*.pt"))) == 4  # a new max_length, tokenizer, file contents: new stores


def test_bao_format_one_file_and_class_lists(tmp_path: Path, tiny: Path, tokenizer) -> None:
    path = write_bao_file(tmp_path / "bao")
    classes = {"train": [0, 1, 2, 3], "val": [4, 5, 6], "test": [7, 8]}
    benchmark = bench(path.parent, tiny, tmp_path / "cache", ways=2, format="bao", file=path.name, classes=classes)
    assert benchmark.sampler.ranges == {"train": (0, 4), "val": (4, 7), "test": (7, 9)}
    batch = benchmark.sample("test", 1, torch.Generator().manual_seed(0))
    assert {topic_of(tokenizer, x) for x in batch.support_x[0]} == {"health", "film"}  # labels 7 and 8
    with pytest.raises(UserInputError, match="label 3 is in both the train and the val split"):
        bench(path.parent, tiny, tmp_path / "cache", format="bao", file=path.name,
              classes={"train": [0, 1, 3], "val": [3, 4, 5], "test": [6, 7, 8]})
    with pytest.raises(UserInputError, match=r"names label\(s\) 42 of the test split"):
        bench(path.parent, tiny, tmp_path / "cache", format="bao", file=path.name,
              classes={"train": [0, 1, 2], "val": [3, 4, 5], "test": [6, 7, 42]})
    with pytest.raises(UserInputError, match="needs benchmark.classes"):
        bench(path.parent, tiny, tmp_path / "cache", format="bao", file=path.name)


def test_fewrel_marks_the_head_and_tail_entities() -> None:
    markers = ("<h>", "</h>", "<t>", "</t>")
    assert fewrel_text(["Paris", "is", "in", "France"], [0], [3], markers) == "<h> Paris </h> is in <t> France </t>"
    assert fewrel_text(["a", "b", "c", "d"], [2, 3], [0], markers) == "<t> a </t> b <h> c d </h>"


def test_fewrel_files_are_a_benchmark(tmp_path: Path, tiny: Path, tokenizer) -> None:
    root = tmp_path / "fewrel"
    write_fewrel(root, ["sport", "weather", "finance"], "train_wiki.json")
    write_fewrel(root, ["food", "music", "travel"], "val_wiki.json")
    write_fewrel(root, ["science", "health", "film"], "test_wiki.json")
    files = {"train": "train_wiki.json", "val": "val_wiki.json", "test": "test_wiki.json"}
    benchmark = bench(root, tiny, tmp_path / "cache", format="fewrel", files=files, max_length=24)
    batch = benchmark.sample("train", 1, torch.Generator().manual_seed(0))
    x = batch.support_x[0, 0]
    text = tokenizer.decode(x[0][x[1] == 1])
    # FewRel's BERT encoder's markers: [unused0] head [unused2] ... [unused1] tail [unused3]
    assert text.split()[1] == "[unused0]" and text.split()[3] == "[unused2]"
    assert "[unused1] and more [unused3]" in text


def test_bad_text_data_is_one_line_naming_the_problem(tmp_path: Path, tiny: Path) -> None:
    root = write_jsonl_splits(tmp_path / "data")
    with pytest.raises(UserInputError, match=r"label '\w+' of the train split .* has 8 examples but benchmark.shots "
                                             r"\+ benchmark.queries = 5 \+ 4 = 9"):
        bench(root, tiny, tmp_path / "cache", shots=5, queries=4)
    with pytest.raises(UserInputError, match="benchmark.ways=4 but the train split .* has only 3 classes"):
        bench(root, tiny, tmp_path / "cache", ways=4)
    benchmark = bench(root, tiny, tmp_path / "cache")
    with pytest.raises(UserInputError, match="episode shots \\+ episode queries = 6 \\+ 3"):
        benchmark.sample("train", 1, torch.Generator(), shots=6)
    lines = (root / "val.jsonl").read_text().splitlines()
    lines[4] = "{'text': 'single quotes', 'label': 1}"
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError, match=r"val.jsonl:5: not JSON lines"):
        bench(root, tiny, tmp_path / "cache")
    lines[4] = json.dumps({"text": "no label"})
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError, match=r'val.jsonl:5: a line without "text" and "label"'):
        bench(root, tiny, tmp_path / "cache")
    (root / "val.jsonl").unlink()
    with pytest.raises(UserInputError, match=r"reads <root>/val.jsonl: no file"):
        bench(root, tiny, tmp_path / "cache")
    with pytest.raises(UserInputError, match="benchmark=text tokenises with the model's tokenizer: use model=hf"):
        TextBenchmark(root=str(root), tokenizer=None)
    with pytest.raises(UserInputError, match="model.name_or_path / benchmark.tokenizer=.*nowhere: no such directory"):
        bench(write_jsonl_splits(tmp_path / "ok"), tmp_path / "nowhere", tmp_path / "cache")


# -- the command line, end to end ------------------------------------------------------------------------------

COMMON = ["model=hf", "model.max_length=16", "benchmark=text", "benchmark.ways=3", "benchmark.shots=2",
          "benchmark.queries=3", "debug=smoke", "threads=1", "logger.tensorboard=false", "logger.console=false"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> dict[str, object]:
    work = tmp_path_factory.mktemp("cli")
    root = write_jsonl_splits(work / "data")
    env = {"HF_HUB_OFFLINE": "1", "METARUN_CACHE": str(work / "cache")}
    args = [*COMMON, f"model.name_or_path={tiny}", f"benchmark.root={root}"]
    out: dict[str, object] = {"work": work, "root": root, "env": env, "args": args}
    out["protonet"] = run_metarun("train", "algo=protonet", *args, f"hydra.run.dir={work / 'protonet'}", env=env)
    out["maml"] = run_metarun("train", "algo=maml", "model.trainable=lora", *args, f"hydra.run.dir={work / 'maml'}",
                              env=env)
    return out


def test_protonet_and_maml_over_lora_train_and_eval_from_the_command_line(cli: dict[str, object]) -> None:
    work = cli["work"]
    for name in ("protonet", "maml"):
        proc = cli[name]
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = read_results(work / name)
        assert results["model"] == "hf" and results["benchmark"] == "text" and results["tasks"] == 6
    checkpoint = torch.load(work / "maml" / "checkpoints" / "best.pt", weights_only=True)
    assert all("lora_" in k or k.startswith("net.head.") for k in checkpoint["model"])  # adapters and head only
    proc = run_metarun("eval", f"ckpt_path={work / 'maml' / 'checkpoints' / 'best.pt'}", "logger.console=false",
                       f"hydra.run.dir={work / 'eval'}", env=cli["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_results(work / "eval")["mean"] == read_results(work / "maml")["mean"]


def test_predict_labels_text_files_with_the_trained_learner(cli: dict[str, object], tmp_path: Path) -> None:
    """`metarun predict` on text: class folders of .txt files (one example each), tokenised as the store was."""
    from tests.hf_fixtures import sentences

    assert cli["protonet"].returncode == 0
    support, query = tmp_path / "support", tmp_path / "query"
    for topic in ("food", "music", "travel"):
        (support / topic).mkdir(parents=True)
        for i, text in enumerate(sentences(topic, 2, seed=11)):
            (support / topic / f"{i}.txt").write_text(text + "\n")
        query.mkdir(exist_ok=True)
        for i, text in enumerate(sentences(topic, 2, seed=12)):
            (query / f"{topic}_{i}.txt").write_text(text)
    ckpt = cli["work"] / "protonet" / "checkpoints" / "best.pt"
    proc = run_metarun("predict", f"ckpt_path={ckpt}", f"support={support}", f"query={query}",
                       f"hydra.run.dir={tmp_path / 'run'}", env=cli["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in rows] == sorted(p.name for p in query.iterdir())
    for row in rows:
        assert set(row["probabilities"]) == {"food", "music", "travel"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)


# "too few examples" and the vocabulary mismatch are the same one-line errors, checked in-process above and in
# tests/test_hf_backbone.py; through the CLI, one of the model and one of the data suffice (each costs a process)
@pytest.mark.parametrize("case", ["model path", "not json lines"])
def test_bad_input_on_the_command_line_is_one_line_exit_2(cli: dict[str, object], case: str, tmp_path: Path) -> None:
    args = list(cli["args"])
    if case == "model path":
        args.append(f"model.name_or_path={tmp_path / 'missing'}")
        expected = "no such directory"
    else:
        bad = write_jsonl_splits(tmp_path / "bad")
        (bad / "test.jsonl").write_text('{"text": "a", "label": "x"}\n' + "text,label\n")
        args.append(f"benchmark.root={bad}")
        expected = "test.jsonl:2: not JSON lines"
    proc = run_metarun("train", "algo=protonet", *args, f"hydra.run.dir={tmp_path / 'run'}", env=cli["env"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("name, sizes", [("20newsgroup", (8, 5, 7)), ("amazon", (10, 5, 9)), ("huffpost", (20, 5, 16)),
                                         ("reuters", (15, 5, 11)), ("rcv1", (37, 10, 24)), ("fewrel", (65, 5, 10))])
def test_shipped_class_lists_are_bao_et_als_splits(name: str, sizes: tuple[int, int, int]) -> None:
    """The class counts per split of Bao et al. 2020's loader (n_train/val/test_class), disjoint, with their origin."""
    from metarun.benchmarks.text_source import SHIPPED_CLASSES, class_lists

    lists = class_lists(name)
    assert tuple(len(lists[s]) for s in ("train", "val", "test")) == sizes
    assert "Distributional-Signatures" in json.loads((SHIPPED_CLASSES / f"{name}.json").read_text())["origin"]
