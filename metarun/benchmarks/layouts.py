"""Find a user's image data under `benchmark.root` in one of the layouts few-shot data circulates in, and
list its classes per split. Torch-free (it only lists and stats files), so tools can use it cheaply.

Layouts, checked in this order under `root` (`benchmark.layout` names one instead of detecting):
  split-folders  train/ val/ test/, each holding <class>/<images>
  csv            train.csv val.csv test.csv (`filename,label`, LibFewShot / Ravi & Larochelle) beside images/
  json           train.json val.json test.json with `class_names` and `class_roots` (easy-few-shot-learning)
  class-folders  <class>/<images> folders, split by class lists (`benchmark.splits=<dir with train.txt
                 val.txt test.txt>`, one class per line) or, without them, by a seeded random class split
                 with `benchmark.split_fractions` of the classes

A class folder is any folder that directly holds image files, named by its path under the split folder
(or root): `Alphabet/character01` is a class, so nested data such as Omniglot needs no flattening. An image
is a file whose suffix Pillow registers (PNG, JPEG, BMP, GIF, TIFF, WebP, ...); other files are ignored.
Classes keep the order of a class list or JSON spec, else sorted by name; images are sorted by file name.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from metarun.benchmarks.decode import ImageRef
from metarun.errors import UserInputError

SPLITS = ("train", "val", "test")
LAYOUTS = ("split-folders", "csv", "json", "class-folders")
LOOKED_FOR = ("train/ val/ test/ folders of <class>/<images>; train.csv val.csv test.csv (filename,label) beside "
              "images/; train.json val.json test.json (class_names, class_roots); or <class>/<images> folders "
              "(split by benchmark.splits=<dir with train.txt val.txt test.txt> or benchmark.split_fractions)")


Classes = list[tuple[str, list[ImageRef]]]  # (class name, its images), in store order
# class lists shipped with the package (metarun/benchmarks/splits/<name>/, each with its origin and license):
# benchmark.splits=<name> uses them
SHIPPED_SPLITS = ("cub",)
SPLIT_DIR = Path(__file__).parent / "splits"


def image_suffixes() -> frozenset[str]:
    """Every file suffix Pillow can open, lower case ('.png', '.jpg', '.webp', ...)."""
    Image.init()
    return frozenset(s.lower() for s in Image.registered_extensions())


@dataclass
class FolderSource:
    """The classes of each split in store order, with what the cache key needs (paths, sizes, mtimes)."""

    root: Path
    layout: str
    classes: dict[str, Classes]  # split -> [(class name, images)]
    detail: str = ""  # how the split was made (class lists from X, random 0.64/0.16/0.2 seed 0, ...)
    listing: list[str] = field(default_factory=list)

    def describe(self) -> str:
        counts = "/".join(str(len(self.classes[s])) for s in SPLITS)
        images = sum(len(refs) for s in SPLITS for _, refs in self.classes[s])
        extra = f", {self.detail}" if self.detail else ""
        return (f"folder: found the {self.layout} layout in {self.root}{extra}: {counts} train/val/test classes, "
                f"{images} images")


def detect(root: str | os.PathLike[str], layout: str = "auto", splits: str | None = None,
           fractions: tuple[float, float, float] = (0.64, 0.16, 0.2), seed: int = 0) -> FolderSource:
    """The layout under `root` (the first that matches, or `layout`) and its classes per split; one-line
    UserInputError when nothing matches (saying what was looked for) or a split is inconsistent."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserInputError(f"benchmark.root {base} is not a folder; point it at your image data (looked for "
                             f"{LOOKED_FOR})")
    if layout not in ("auto", *LAYOUTS):
        raise UserInputError(f"benchmark.layout must be auto or one of {', '.join(LAYOUTS)} (got '{layout}')")
    suffixes = image_suffixes()
    if splits is not None and layout not in ("auto", "class-folders"):
        raise UserInputError(f"benchmark.splits (class lists) splits the class-folders layout, not {layout}; "
                             "drop one of them")
    chosen = "class-folders" if splits is not None else layout
    if chosen == "auto":
        chosen = _detect_layout(base, suffixes)
    if chosen == "split-folders":
        source = _split_folders(base, suffixes)
    elif chosen == "csv":
        source = _csv_layout(base)
    elif chosen == "json":
        source = _json_layout(base, suffixes)
    else:
        source = _class_folders(base, suffixes, splits, fractions, seed)
    for split in SPLITS:
        if not source.classes[split]:
            raise UserInputError(f"the {split} split of the {source.layout} layout in {base} has no class with images")
    source.listing = _listing(source)
    return source


def _detect_layout(base: Path, suffixes: frozenset[str]) -> str:
    if all((base / s).is_dir() for s in SPLITS):
        return "split-folders"
    if all((base / f"{s}.csv").is_file() for s in SPLITS) and (base / "images").is_dir():
        return "csv"
    if all((base / f"{s}.json").is_file() for s in SPLITS):
        return "json"
    if _class_dirs(base, suffixes):
        return "class-folders"
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in base.iterdir())[:8]
    seen = f" (it holds {', '.join(present)}{'...' if len(present) == 8 else ''})" if present else " (it is empty)"
    raise UserInputError(f"no recognisable image layout under {base}{seen}; looked for {LOOKED_FOR}")


def _class_dirs(folder: Path, suffixes: frozenset[str]) -> Classes:
    """Every folder under `folder` that directly holds images, as (path relative to `folder`, sorted images),
    sorted by that path. One os.walk: symlinked folders are followed (data folders are often links)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        images = sorted(f for f in filenames if os.path.splitext(f)[1].lower() in suffixes and not f.startswith("."))
        if images and Path(dirpath) != folder:
            name = Path(os.path.relpath(dirpath, folder)).as_posix()
            found.append((name, [ImageRef(os.path.join(dirpath, f)) for f in images]))
    return sorted(found, key=lambda item: item[0])


def _split_folders(base: Path, suffixes: frozenset[str]) -> FolderSource:
    return FolderSource(base, "split-folders", {s: _class_dirs(base / s, suffixes) for s in SPLITS})


def _class_folders(base: Path, suffixes: frozenset[str], splits: str | None,
                   fractions: tuple[float, float, float], seed: int) -> FolderSource:
    classes = dict(_class_dirs(base, suffixes))
    if not classes:
        raise UserInputError(f"no class folders of images under {base}; looked for {LOOKED_FOR}")
    if splits in SHIPPED_SPLITS:
        return FolderSource(base, "class-folders", _listed_split(base, classes, SPLIT_DIR / splits),
                            detail=f"the shipped {splits} class split")
    if splits is not None:
        return FolderSource(base, "class-folders", _listed_split(base, classes, Path(splits).expanduser()),
                            detail=f"split by the class lists in {splits}")
    fractions = tuple(float(f) for f in fractions)  # type: ignore[assignment]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserInputError(f"benchmark.split_fractions must be three non-negative fractions (train, val, test) "
                             f"summing to 1 (got {list(fractions)})")
    names = sorted(classes)
    random.Random(seed).shuffle(names)
    n_val, n_test = round(fractions[1] * len(names)), round(fractions[2] * len(names))
    parts = {"test": names[:n_test], "val": names[n_test:n_test + n_val], "train": names[n_test + n_val:]}
    shown = "/".join(f"{f:g}" for f in fractions)
    return FolderSource(base, "class-folders", {s: [(c, classes[c]) for c in sorted(parts[s])] for s in SPLITS},
                        detail=f"random class split {shown} (benchmark.split_seed={seed})")


def _listed_split(base: Path, classes: dict[str, list[ImageRef]], folder: Path) -> dict[str, Classes]:
    """Classes per split from train.txt/val.txt/test.txt in `folder`: one class (folder path) per line, blank
    lines and '#' comments skipped; a name that is not a class folder, or a class in two lists, is one line."""
    files = {s: folder / f"{s}.txt" for s in SPLITS}
    absent = [p.name for p in files.values() if not p.is_file()]
    if absent:
        raise UserInputError(f"benchmark.splits={folder} lacks {', '.join(absent)}; it needs train.txt, val.txt "
                             "and test.txt, one class folder (relative to benchmark.root) per line")
    out: dict[str, Classes] = {}
    seen: dict[str, str] = {}
    for split, path in files.items():
        names = [line.strip().strip("/") for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        missing = [n for n in names if n not in classes]
        if missing:
            raise UserInputError(f"{path} names {len(missing)} class{'es' if len(missing) > 1 else ''} that "
                                 f"{'are' if len(missing) > 1 else 'is'} not a folder of images under {base} "
                                 f"(e.g. '{missing[0]}')")
        for name in names:
            if name in seen:
                raise UserInputError(f"class '{name}' is listed in both {seen[name]}.txt and {split}.txt; a class "
                                     "belongs to one split")
            seen[name] = split
        out[split] = [(n, classes[n]) for n in names]
    return out


def _csv_layout(base: Path) -> FolderSource:
    """LibFewShot (and Ravi & Larochelle): `filename,label` rows; a filename is a path under images/."""
    images = base / "images"
    present = {Path(os.path.relpath(os.path.join(d, f), images)).as_posix()
               for d, _, names in os.walk(images, followlinks=True) for f in names}
    out = {}
    for split in SPLITS:
        table = base / f"{split}.csv"
        try:
            with open(table, newline="") as handle:
                rows = list(csv.reader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as ex:
            raise UserInputError(f"cannot read {table}: {ex}") from None
        if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
            raise UserInputError(f"{table} must start with the header 'filename,label' (LibFewShot format)")
        grouped: dict[str, list[str]] = {}
        for row in rows[1:]:
            if len(row) >= 2 and row[0].strip():
                grouped.setdefault(row[1].strip(), []).append(row[0].strip())
        missing = [f for files in grouped.values() for f in files if f not in present]
        if missing:
            raise UserInputError(f"{len(missing)} images listed in {table} are missing from {images} "
                                 f"(e.g. {missing[0]})")
        out[split] = [(label, [ImageRef(str(images / f)) for f in sorted(files)])
                      for label, files in sorted(grouped.items())]
    return FolderSource(base, "csv", out)


def _json_layout(base: Path, suffixes: frozenset[str]) -> FolderSource:
    """easy-few-shot-learning's specs: {"class_names": [...], "class_roots": [...]}, one root folder per class.
    A relative class root is resolved against the spec's folder, then the working directory (easyfsl writes
    them relative to where its scripts run), then the spec folder's parents; the first that exists wins."""
    out = {}
    for split in SPLITS:
        spec_path = base / f"{split}.json"
        try:
            spec = json.loads(spec_path.read_text())
            names, roots = list(spec["class_names"]), list(spec["class_roots"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserInputError(f"{spec_path} is not an easy-few-shot-learning spec: expected a JSON object with "
                                 "lists class_names and class_roots") from None
        if len(names) != len(roots):
            raise UserInputError(f"{spec_path}: {len(names)} class_names but {len(roots)} class_roots")
        classes = []
        for name, root in zip(names, roots):
            folder = _resolve(Path(root), base)
            if folder is None:
                raise UserInputError(f"{spec_path}: the class root of '{name}' ({root}) is not a folder")
            files = sorted(e.name for e in os.scandir(folder)
                           if e.is_file() and os.path.splitext(e.name)[1].lower() in suffixes)
            classes.append((str(name), [ImageRef(str(folder / f)) for f in files]))
        out[split] = classes
    return FolderSource(base, "json", out)


def _resolve(root: Path, base: Path) -> Path | None:
    candidates = [root] if root.is_absolute() else [base / root, Path.cwd() / root, *(p / root for p in base.parents)]
    return next((c for c in candidates if c.is_dir()), None)


def _listing(source: FolderSource) -> list[str]:
    """What the cache key hashes: each split's classes in order, each image with its size and mtime."""
    lines = []
    for split in SPLITS:
        for name, refs in source.classes[split]:
            lines.append(f"{split}\t{name}\t{len(refs)}")
            for ref in refs:
                stat = os.stat(ref.path)
                lines.append(f"{os.path.relpath(ref.path, source.root)} {stat.st_size} {stat.st_mtime_ns}")
    return lines
