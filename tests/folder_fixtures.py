"""Tiny image datasets for `benchmark=folder`, written in each real on-disk layout from one seed.

Every class has its own colour (plus noise), so classes are learnable and every image differs; sizes may
be ragged. The same images (lossless PNGs) can be written in each layout, so the stores can be compared:
  split_folders   root/{train,val,test}/<class>/<images>
  class_folders   root/<class>/<images> (class names may be nested: 'group/cls'), with class_lists() beside
  libfewshot_csv  root/images/<file> + root/{train,val,test}.csv (filename,label)
  easyfsl_json    root/{train,val,test}.json ({"class_names": [...], "class_roots": [...]}) + class folders
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
# split -> class names; 6/5/5 classes, as small as 5-way episodes on every split allow
CLASSES = {"train": [f"animal/t{i}" for i in range(6)], "val": [f"plant/v{i}" for i in range(5)],
           "test": [f"stone/s{i}" for i in range(5)]}
PER_CLASS = 8
SIZE = 12


def pixels(class_index: int, image_index: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """uint8 [size, size, 3]: the class's colour plus noise seeded by (seed, class, image)."""
    rng = np.random.default_rng([seed, class_index, image_index])
    base = np.array([(class_index * 53) % 256, (class_index * 97) % 256, (class_index * 151) % 256])
    return np.clip(base + rng.integers(-20, 21, size=(size, size, 3)), 0, 255).astype(np.uint8)


def counts_for(classes: dict[str, list[str]], per_class: int | dict[str, int]) -> dict[str, int]:
    """Images per class: one number for all, or a dict of exceptions over PER_CLASS."""
    if isinstance(per_class, int):
        return {c: per_class for names in classes.values() for c in names}
    return {c: per_class.get(c, PER_CLASS) for names in classes.values() for c in names}


def _images(classes: dict[str, list[str]], per_class: int | dict[str, int], suffix: str = ".png"):
    """(split, class name, file name, pixels) of every image, class indices global in split order."""
    counts = counts_for(classes, per_class)
    index = 0
    for split in SPLITS:
        for name in classes[split]:
            for i in range(counts[name]):
                yield split, name, f"{name.replace('/', '_')}_{i:03d}{suffix}", pixels(index, i)
            index += 1


def split_folders(root: Path, classes: dict[str, list[str]] = CLASSES, per_class: int | dict[str, int] = PER_CLASS,
                  suffix: str = ".png") -> Path:
    for split, name, file, image in _images(classes, per_class, suffix):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / file)
    return root


def class_folders(root: Path, classes: dict[str, list[str]] = CLASSES, per_class: int | dict[str, int] = PER_CLASS) -> Path:
    for _, name, file, image in _images(classes, per_class):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / file)
    return root


def class_lists(folder: Path, classes: dict[str, list[str]] = CLASSES) -> Path:
    """train.txt val.txt test.txt: one class folder a line (with a comment and a blank line, as people write)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (folder / f"{split}.txt").write_text(f"# {split} classes\n" + "\n".join(classes[split]) + "\n\n")
    return folder


def libfewshot_csv(root: Path, classes: dict[str, list[str]] = CLASSES, per_class: int | dict[str, int] = PER_CLASS) -> Path:
    """LibFewShot: a flat images/ folder and {train,val,test}.csv with the header filename,label."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for split, name, file, image in _images(classes, per_class):
        Image.fromarray(image).save(root / "images" / file)
        rows[split].append((file, name))
    for split in SPLITS:
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            writer.writerows(rows[split][::-1])  # rows in any order: classes and files are sorted when read
    return root


def easyfsl_json(root: Path, classes: dict[str, list[str]] = CLASSES, per_class: int | dict[str, int] = PER_CLASS) -> Path:
    """easy-few-shot-learning's EasySet specs: class roots relative to the spec's folder (images/<class>/)."""
    for _, name, file, image in _images(classes, per_class):
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / file)
    for split in SPLITS:
        spec = {"class_names": classes[split], "class_roots": [f"images/{name}" for name in classes[split]]}
        (root / f"{split}.json").write_text(json.dumps(spec, indent=2))
    return root
