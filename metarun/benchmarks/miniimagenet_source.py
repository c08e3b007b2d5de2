"""Find miniImageNet (Vinyals et al. 2016; the 64/16/20-class split of Ravi & Larochelle 2017) in any of
the four forms it circulates in, and read its classes. Torch-free: `metarun data verify` uses it too.

miniImageNet has no official host (the images fall under the ImageNet terms of access), so we
accept what people have, checked in this order under `root`:
  ravi-csv    train.csv, val.csv, test.csv (`filename,label`) and a flat images/ folder, any image size
  folders     train/, val/, test/ each holding <wnid>/*.jpg
  cache-pkl   mini-imagenet-cache-{train,validation|val,test}.pkl: image_data N x 84 x 84 x 3, class_dict
  metaoptnet  miniImageNet_category_split_{train_phase_train,val,test}.pickle: data, labels, catname2label
              (Python 2 pickles: read with encoding='latin1')
Pickles can run code when loaded: read only files you trust (the same holds for any pickle-based loader).
"""

from __future__ import annotations

import csv
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarun.benchmarks.decode import ImageRef
from metarun.errors import UserInputError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_PICKLES = {"train": ("mini-imagenet-cache-train.pkl",),
                 "val": ("mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-val.pkl"),
                 "test": ("mini-imagenet-cache-test.pkl",)}
METAOPTNET_PICKLES = {s: f"miniImageNet_category_split_{p}.pickle"
                      for s, p in (("train", "train_phase_train"), ("val", "val"), ("test", "test"))}
FORMAT_HELP = (
    "Ravi & Larochelle train.csv/val.csv/test.csv (filename,label) with a flat images/ folder; "
    "train/ val/ test/ folders of <wnid>/*.jpg; mini-imagenet-cache-{train,validation,test}.pkl "
    "(image_data, class_dict); or MetaOptNet miniImageNet_category_split_{train_phase_train,val,test}.pickle"
)


@dataclass
class MiniSource:
    """A detected copy: its format, the file or folder behind each split, and the cache listing."""

    root: Path
    format: str
    splits: dict[str, Path]
    images: Path | None = None  # ravi-csv: the flat images/ folder
    listing: list[str] = field(default_factory=list)

    def describe(self) -> str:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in self.splits.values())
        extra = " + images/" if self.images else ""
        return f"miniimagenet: found {self.format} format in {self.root} ({names}{extra})"


def detect(root: str | os.PathLike[str]) -> MiniSource:
    """The first complete format under `root`; otherwise a one-line UserInputError saying what was looked for."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserInputError(f"miniImageNet not found: {base} is not a folder; set benchmark.root "
                             f"(`metarun data download miniimagenet` lists the accepted formats)")
    csvs = {s: base / f"{s}.csv" for s in SPLITS}
    if all(p.is_file() for p in csvs.values()) and (base / "images").is_dir():
        source = MiniSource(base, "ravi-csv", csvs, images=base / "images")
        source.listing = [_stat_line(p, base) for p in csvs.values()] + _folder_listing(base / "images", base)
        return source
    folders = {s: base / s for s in SPLITS}
    if all(p.is_dir() for p in folders.values()):
        source = MiniSource(base, "folders", folders)
        source.listing = [line for p in folders.values() for line in _folder_listing(p, base)]
        return source
    cache = {s: next((base / n for n in names if (base / n).is_file()), None) for s, names in CACHE_PICKLES.items()}
    if all(cache.values()):
        return _pickle_source(base, "cache-pkl", cache)  # type: ignore[arg-type]
    metaopt = {s: base / n for s, n in METAOPTNET_PICKLES.items()}
    if all(p.is_file() for p in metaopt.values()):
        return _pickle_source(base, "metaoptnet", metaopt)
    partial = [p.name for p in (*csvs.values(), *cache.values(), *metaopt.values()) if p is not None and p.is_file()]
    seen = f" (found only {', '.join(partial)})" if partial else ""
    raise UserInputError(f"miniImageNet not found under {base}{seen}; looked for {FORMAT_HELP}; "
                         f"see `metarun data download miniimagenet` for how to obtain it")


def _pickle_source(base: Path, fmt: str, files: dict[str, Path]) -> MiniSource:
    return MiniSource(base, fmt, files, listing=[_stat_line(p, base) for p in files.values()])


def _stat_line(path: Path, root: Path) -> str:
    stat = path.stat()
    return f"{os.path.relpath(path, root)} {stat.st_size} {stat.st_mtime_ns}"


def _folder_listing(folder: Path, root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            out.append(_stat_line(Path(dirpath) / name, root))
    return out


def image_classes(source: MiniSource, split: str) -> dict[str, list[ImageRef]]:
    """wnid -> image files of one split (ravi-csv, folders), classes sorted by wnid, images by name."""
    if source.format == "ravi-csv":
        return _csv_classes(source.splits[split], source.images)  # type: ignore[arg-type]
    folder = source.splits[split]
    classes = {}
    for wnid in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
        files = sorted(e.name for e in os.scandir(folder / wnid) if e.name.lower().endswith(IMAGE_SUFFIXES))
        if files:
            classes[wnid] = [ImageRef(str(folder / wnid / f)) for f in files]
    if not classes:
        raise UserInputError(f"{folder} holds no <wnid>/*.jpg class folders")
    return classes


def _csv_classes(table: Path, images: Path) -> dict[str, list[ImageRef]]:
    grouped: dict[str, list[str]] = {}
    try:
        with open(table, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as ex:
        raise UserInputError(f"cannot read {table}: {ex}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise UserInputError(f"{table} must start with the header 'filename,label' (Ravi & Larochelle format)")
    for row in rows[1:]:
        if len(row) >= 2:
            grouped.setdefault(row[1].strip(), []).append(row[0].strip())
    present = set(os.listdir(images))
    missing = [f for files in grouped.values() for f in files if f not in present]
    if missing:
        raise UserInputError(f"{len(missing)} images listed in {table.name} are missing from {images} "
                             f"(e.g. {missing[0]}); the images folder is incomplete")
    return {wnid: [ImageRef(str(images / f)) for f in sorted(files)] for wnid, files in sorted(grouped.items())}


def load_pickle(path: Path) -> Any:
    """Unpickle with encoding='latin1', which reads Python 2 pickles (numpy data stored as str) and Python 3
    ones alike; a truncated or foreign file is a one-line UserInputError."""
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # old pickles name numpy.core, renamed in numpy 2
            return pickle.load(handle, encoding="latin1")
    except MemoryError:
        raise
    except Exception as ex:  # EOFError, UnpicklingError, ValueError...: pickle has no common base error
        reason = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
        raise UserInputError(f"cannot read {path}: truncated or not a miniImageNet pickle ({reason}); "
                             f"re-download it") from None


def pickle_classes(source: MiniSource, split: str) -> dict[str, np.ndarray]:
    """wnid -> uint8 [n, 84, 84, 3] images of one split (cache-pkl, metaoptnet), classes sorted by name."""
    path = source.splits[split]
    data = load_pickle(path)
    keys = ("image_data", "class_dict") if source.format == "cache-pkl" else ("data", "labels", "catname2label")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise UserInputError(f"{path} is not a {source.format} pickle: expected a dict with keys {', '.join(keys)}")
    images = np.asarray(data[keys[0]])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise UserInputError(f"{path}: {keys[0]} must be uint8 N x H x W x 3 (got {images.dtype} {images.shape})")
    if source.format == "cache-pkl":
        groups = {str(k): np.asarray(v, dtype=np.int64) for k, v in data["class_dict"].items()}
    else:
        labels = np.asarray(data["labels"], dtype=np.int64)
        if len(labels) != len(images):
            raise UserInputError(f"{path}: {len(labels)} labels for {len(images)} images")
        names = {int(v): str(k) for k, v in data["catname2label"].items()}
        groups = {names.get(int(label), str(label)): np.flatnonzero(labels == label) for label in np.unique(labels)}
    out = {}
    for name, index in sorted(groups.items()):
        if len(index) and (index.min() < 0 or index.max() >= len(images)):
            raise UserInputError(f"{path}: class {name} indexes image {int(index.max())} of {len(images)}; "
                                 "truncated data")
        out[name] = images[index]
    return out
