"""`metarun predict`: the labels a trained learner gives a user's own query files after adapting to their
support set (one episode: the support folder's classes, every file in it), with each class's probability.

The checkpoint's learner is rebuilt as `metarun eval` rebuilds it, with the episode shape set to the support
set's (benchmark.ways = its classes, benchmark.shots = its files per class). The files are decoded and
normalised by the checkpoint's benchmark exactly as its own examples were (Benchmark.load_inputs), so the
benchmark's data root must be reachable (its decoded cache suffices). Scores come from
MetaAlgorithm.query_scores, whose argmax is the label `evaluate` scores.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from metarun.benchmarks.layouts import image_suffixes
from metarun.errors import UserInputError

OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass(frozen=True)
class SupportSet:
    """The user's labelled examples: class names (folder names, sorted) and each class's files."""

    classes: list[str]
    files: list[list[Path]]

    @property
    def shots(self) -> int:
        return len(self.files[0])


def example_files(folder: Path) -> list[Path]:
    """The folder's example files: every suffix Pillow opens (benchmarks/layouts.image_suffixes, what
    benchmark=folder reads) and .txt (benchmark=text: one example a file); other files are ignored, and a
    benchmark refuses a kind it does not read in one line."""
    suffixes = image_suffixes() | {".txt"}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


def read_support(path: str | None) -> SupportSet:
    """support=<folder>/<class>/<files>; every class with the same number of files (one episode's shots)."""
    if not path:
        raise UserInputError("metarun predict needs support=<folder with one sub-folder of example files per class>")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserInputError(f"support={path}: not a folder (give a folder with one sub-folder per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))  # not .hydra, .git
    if len(folders) < 2:
        raise UserInputError(f"support={path}: {len(folders)} class folder(s); an episode needs at least 2 "
                             f"(one sub-folder per class, holding its example files)")
    files = [example_files(folder) for folder in folders]
    empty = [folder.name for folder, found in zip(folders, files) if not found]
    if empty:
        raise UserInputError(f"support={path}: class folder '{empty[0]}' holds no example files (images or .txt)")
    counts = {folder.name: len(found) for folder, found in zip(folders, files)}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise UserInputError(f"support={path}: every class needs the same number of examples (one episode's shots); "
                             f"found {listed}")
    return SupportSet([folder.name for folder in folders], files)


def read_queries(path: str | None) -> list[Path]:
    """query=<folder of files> (not recursive) or one file."""
    if not path:
        raise UserInputError("metarun predict needs query=<folder of files to label, or one file>")
    target = Path(path).expanduser()
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise UserInputError(f"query={path}: no such file or folder")
    files = example_files(target)
    if not files:
        raise UserInputError(f"query={path}: the folder holds no example files (images or .txt)")
    return files


def output_path(path: str | None) -> Path | None:
    if not path:
        return None
    target = Path(path).expanduser()
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserInputError(f"output={path}: give a .csv or .json file name")
    return target


def predict(cfg: DictConfig, overrides: list[str], run_dir: Path) -> list[dict[str, Any]]:
    """Adapt the checkpoint's learner to the support set and label every query file; print, write and return
    the rows (file, label, probability, probabilities per class)."""
    from metarun.console import console
    from metarun.episodes import TaskBatch
    from metarun.run import restore

    if not cfg.ckpt_path:
        raise UserInputError("metarun predict needs ckpt_path=<run dir>/checkpoints/best.pt")
    support, queries, target = read_support(cfg.support), read_queries(cfg.query), output_path(cfg.output)
    ways, shots = len(support.classes), support.shots
    shape = [f"benchmark.ways={ways}", f"benchmark.shots={shots}"]
    try:
        merged, names, benchmark, algorithm, device, state = restore(str(cfg.ckpt_path), [*overrides, *shape])
    except UserInputError as ex:
        trained = state_ways(str(cfg.ckpt_path))
        if "do not fit" in str(ex) and trained is not None and trained != ways:
            raise UserInputError(f"the checkpoint's learner was trained {trained}-way with a fixed output layer and "
                                 f"support={cfg.support} has {ways} classes: give {trained} class folders") from None
        raise
    if benchmark.spec.kind != "classification":
        raise UserInputError(f"metarun predict labels examples: benchmark={names['benchmark']} is "
                             f"{benchmark.spec.kind}, not classification")
    support_x = benchmark.load_inputs([f for files in support.files for f in files])
    query_x = benchmark.load_inputs(queries)
    support_y = torch.arange(ways).repeat_interleave(shots)
    batch = TaskBatch(support_x[None], support_y[None], query_x[None],
                      torch.zeros(1, len(queries), dtype=torch.long)).to(device)
    algorithm.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        probabilities = torch.softmax(algorithm.query_scores(batch)[0].double(), dim=-1).cpu()
    rows = [{"file": str(path), "label": support.classes[int(p.argmax())], "probability": float(p.max()),
             "probabilities": {name: float(v) for name, v in zip(support.classes, p)}}
            for path, p in zip(queries, probabilities)]
    write_json(rows, run_dir / "predictions.json")
    if target is not None:
        (write_csv if target.suffix.lower() == ".csv" else write_json)(rows, target)
    print_predictions(rows, f"{names['algo']} / {names['model']} / {names['benchmark']}, step {int(state['step'])}: "
                      f"{ways}-way {shots}-shot from {cfg.support}")
    console.print(f"predictions: {run_dir / 'predictions.json'}" + (f" and {target}" if target else ""))
    return rows


def state_ways(ckpt_path: str) -> int | None:
    """The ways the checkpoint's config trained with, when it records them."""
    from omegaconf import OmegaConf

    from metarun.checkpoint import load_checkpoint

    saved = load_checkpoint(Path(ckpt_path).expanduser()).get("config")
    if saved is None:
        return None
    ways = OmegaConf.select(OmegaConf.create(saved), "benchmark.ways", default=None)
    return int(ways) if isinstance(ways, int) else None


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """file, label, probability, then one p(<class>) column per class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = list(rows[0]["probabilities"]) if rows else []
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "probability", *(f"p({name})" for name in classes)])
        for row in rows:
            writer.writerow([row["file"], row["label"], f"{row['probability']:.6f}",
                             *(f"{row['probabilities'][name]:.6f}" for name in classes)])


def print_predictions(rows: list[dict[str, Any]], title: str) -> None:
    from rich.table import Table

    from metarun.console import console

    table = Table(title=title)
    table.add_column("file")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for row in rows:
        table.add_row(Path(row["file"]).name, row["label"], f"{row['probability']:.3f}")
    console.print(table)
