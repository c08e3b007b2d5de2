"""Readers of few-shot text classification data: each returns, per split, the texts of each class in file order.

Three on-disk formats (`benchmark.format`):

- `jsonl`: one JSON-lines file per split, `<root>/{train,val,test}.jsonl`, each line `{"text": ..., "label": ...}`;
  a split's classes are the labels in its file.
- `bao`: the format of Bao et al. 2020 ("Few-shot Text Classification with Distributional Signatures",
  YujiaBao/Distributional-Signatures): one JSON-lines file for the whole dataset (`benchmark.file`), its `text` a
  string or a list of tokens (joined by spaces), and class lists per split (`benchmark.classes`: a mapping
  split -> labels, or the name of a list shipped in metarun/benchmarks/splits/text/).
- `fewrel`: FewRel (Han et al. 2018) JSON files, each {relation: [{"tokens": [...], "h": [name, id, [[i, ...]]],
  "t": [...]}, ...]}; the head and tail entity spans are wrapped in `benchmark.entity_markers` (head start,
  head end, tail start, tail end) before tokenising. `benchmark.files` maps each split to its file(s).

Every line problem is one line naming the file and the line number (exit 2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarun.errors import UserInputError

SPLITS = ("train", "val", "test")
FORMATS = ("jsonl", "bao", "fewrel")
SHIPPED_CLASSES = Path(__file__).parent / "splits" / "text"


@dataclass(frozen=True)
class TextSource:
    """The texts of every class of every split (classes in first-seen order), and the files they came from."""

    splits: dict[str, dict[str, list[str]]]
    files: list[Path]
    description: str

    def listing(self) -> list[str]:
        """What the cache key hashes: each file's path, size and modification time."""
        out = []
        for path in self.files:
            stat = path.stat()
            out.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        return out


def _label_name(value: Any) -> str:
    return str(value)


def read_json_lines(path: Path) -> list[tuple[str, str]]:
    """(text, label) per line of a JSON-lines file; a line that is not a JSON object with both keys is one line."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as ex:
                raise UserInputError(f"{path}:{number}: not JSON lines ({ex.msg}); benchmark=text reads one "
                                     '{"text": ..., "label": ...} object per line') from None
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise UserInputError(f'{path}:{number}: a line without "text" and "label"; benchmark=text reads one '
                                     '{"text": ..., "label": ...} object per line')
            text = record["text"]
            if isinstance(text, list):  # Bao et al.'s files hold the tokens
                text = " ".join(str(t) for t in text)
            if not isinstance(text, str):
                raise UserInputError(f'{path}:{number}: "text" must be a string or a list of tokens')
            records.append((text, _label_name(record["label"])))
    return records


def _group(records: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    classes: dict[str, list[str]] = {}
    for text, label in records:
        classes.setdefault(label, []).append(text)
    return classes


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserInputError(f"{what}: no file {path}; see configs/benchmark/text.yaml for the formats")
    return path


def read_jsonl_splits(root: Path) -> TextSource:
    files = []
    splits = {}
    for split in SPLITS:
        path = _existing(root / f"{split}.jsonl", f"benchmark.format=jsonl reads <root>/{split}.jsonl")
        files.append(path)
        splits[split] = _group(read_json_lines(path))
    return TextSource(splits, files, f"JSON lines {root}/{{train,val,test}}.jsonl")


def class_lists(classes: Mapping[str, Sequence[Any]] | str | None) -> dict[str, list[str]]:
    """benchmark.classes: a mapping split -> labels, or the name of a shipped list (splits/text/<name>.json)."""
    if classes is None:
        raise UserInputError("benchmark.format=bao needs benchmark.classes: {train: [...], val: [...], test: [...]} "
                             f"or the name of a shipped list ({', '.join(shipped_class_lists()) or 'none shipped'})")
    if isinstance(classes, str):
        path = SHIPPED_CLASSES / f"{classes}.json"
        if not path.is_file():
            raise UserInputError(f"benchmark.classes={classes}: no such shipped class list; shipped: "
                                 f"{', '.join(shipped_class_lists())}")
        classes = json.loads(path.read_text())["classes"]
    missing = [s for s in SPLITS if s not in classes]
    if missing:
        raise UserInputError(f"benchmark.classes lacks the {', '.join(missing)} split(s)")
    lists = {s: [_label_name(c) for c in classes[s]] for s in SPLITS}
    seen: dict[str, str] = {}
    for split, labels in lists.items():
        for label in labels:
            if label in seen:
                raise UserInputError(f"benchmark.classes: label {label} is in both the {seen[label]} and the {split} "
                                     "split; few-shot splits have disjoint classes")
            seen[label] = split
    return lists


def shipped_class_lists() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CLASSES.glob("*.json")) if SHIPPED_CLASSES.is_dir() else []


def _by_class_lists(classes: dict[str, list[str]], grouped: dict[str, list[str]],
                    where: str) -> dict[str, dict[str, list[str]]]:
    splits = {}
    for split in SPLITS:
        absent = [c for c in classes[split] if c not in grouped]
        if absent:
            raise UserInputError(f"benchmark.classes names label(s) {', '.join(absent[:5])} of the {split} split "
                                 f"that {where} does not have")
        splits[split] = {c: grouped[c] for c in classes[split]}
    return splits


def read_bao(root: Path, file: str | None, classes: Mapping[str, Sequence[Any]] | str | None) -> TextSource:
    if not file:
        raise UserInputError("benchmark.format=bao needs benchmark.file=<the dataset's JSON-lines file under root>")
    path = _existing(root / file, "benchmark.file")
    lists = class_lists(classes)
    return TextSource(_by_class_lists(lists, _group(read_json_lines(path)), str(path)), [path],
                      f"{path} with class lists per split")


def fewrel_text(tokens: Sequence[str], head: Sequence[int], tail: Sequence[int], markers: Sequence[str]) -> str:
    """The sentence with its head and tail entity spans marked: markers = (head start, head end, tail start,
    tail end), as in the entity-marker inputs of Soares et al. 2019 and FewRel's BERT encoders."""
    before: dict[int, list[str]] = {}
    after: dict[int, list[str]] = {}
    for span, (start_mark, end_mark) in ((head, markers[0:2]), (tail, markers[2:4])):
        before.setdefault(min(span), []).append(start_mark)
        after.setdefault(max(span), []).append(end_mark)
    words = []
    for i, token in enumerate(tokens):
        words.extend(before.get(i, []))
        words.append(str(token))
        words.extend(after.get(i, []))
    return " ".join(words)


def _entity_span(entity: Any, path: Path, relation: str, index: int) -> list[int]:
    try:
        positions = [int(i) for i in entity[2][0]]
    except (TypeError, IndexError, ValueError, KeyError):
        raise UserInputError(f"{path}: relation {relation}, instance {index}: an entity is not "
                             "[name, id, [[positions]]] as in FewRel") from None
    if not positions:
        raise UserInputError(f"{path}: relation {relation}, instance {index}: an entity with no token positions")
    return positions


def read_fewrel_file(path: Path, markers: Sequence[str]) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as ex:
        raise UserInputError(f"{path}:{ex.lineno}: not FewRel JSON ({ex.msg})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: FewRel JSON is one object {{relation: [instances]}}")
    out: dict[str, list[str]] = {}
    for relation, instances in data.items():
        texts = []
        for i, item in enumerate(instances):
            if not isinstance(item, dict) or "tokens" not in item or "h" not in item or "t" not in item:
                raise UserInputError(f'{path}: relation {relation}, instance {i}: needs "tokens", "h" and "t"')
            texts.append(fewrel_text(item["tokens"], _entity_span(item["h"], path, relation, i),
                                     _entity_span(item["t"], path, relation, i), markers))
        out[str(relation)] = texts
    return out


def read_fewrel(root: Path, files: Mapping[str, Any] | None, markers: Sequence[str]) -> TextSource:
    if len(markers) != 4:
        raise UserInputError(f"benchmark.entity_markers needs 4 strings (head start, head end, tail start, tail end); "
                             f"got {list(markers)}")
    if not files or any(s not in files for s in SPLITS):
        raise UserInputError("benchmark.format=fewrel needs benchmark.files={train: ..., val: ..., test: ...} "
                             "(file names under root, e.g. train_wiki.json)")
    paths, splits = [], {}
    cache: dict[Path, dict[str, list[str]]] = {}
    for split in SPLITS:
        names = [files[split]] if isinstance(files[split], str) else list(files[split])
        classes: dict[str, list[str]] = {}
        for name in names:
            path = _existing(root / name, f"benchmark.files.{split}")
            if path not in cache:
                cache[path] = read_fewrel_file(path, markers)
                paths.append(path)
            classes.update(cache[path])
        splits[split] = classes
    return TextSource(splits, paths, f"FewRel JSON under {root}")


def read_source(root: str, format: str, file: str | None, files: Mapping[str, Any] | None,
                classes: Mapping[str, Sequence[Any]] | str | None, entity_markers: Sequence[str]) -> TextSource:
    """The configured reader."""
    if format not in FORMATS:
        raise UserInputError(f"benchmark.format={format} is not one of {', '.join(FORMATS)}")
    base = Path(str(root)).expanduser()
    if not base.is_dir():
        raise UserInputError(f"benchmark.root={root} is not a directory; set benchmark.root (or $METARUN_DATA)")
    if format == "jsonl":
        return read_jsonl_splits(base)
    if format == "bao":
        return read_bao(base, file, classes)
    return read_fewrel(base, files, entity_markers)
