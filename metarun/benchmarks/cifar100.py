"""CIFAR-FS (Bertinetto et al., ICLR 2019) and FC100 (Oreshkin et al., NeurIPS 2018): few-shot benchmarks made
of CIFAR-100's 100 classes of 600 32x32 colour images (its train and test sets together).

CIFAR-FS splits the fine classes at random, 64 / 16 / 20; FC100 splits by superclass, 12 / 4 / 4 (60 / 20 / 20 fine
classes), so that test classes share no superclass with the training ones: the harder benchmark. The class lists
ship in metarun/benchmarks/splits/{cifarfs,fc100}/ with their origin and license.

`benchmark.root` holds CIFAR-100's python version, as its authors distribute it: the `cifar-100-python/` folder
(`train`, `test`, `meta` pickles) or the `cifar-100-python.tar.gz` archive itself, read without unpacking
(`metarun data download cifar100` fetches it). The pixels are already arrays: no decoding, only a resize when
`benchmark.image_size` is not 32 (bilinear with antialiasing, once). The store [100, 600, 3, S, S] uint8 is
cached like the other image benchmarks'; episodes come from EpisodeSampler.
"""

from __future__ import annotations

import pickle
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.benchmarks.augment import Augmentation
from metarun.benchmarks.base import SPLITS, TaskSpec, check_positive, split_ranges
from metarun.benchmarks.decode import Preprocess
from metarun.benchmarks.sampler import EpisodeSampler, SamplerBackedBenchmark
from metarun.benchmarks.store import cached_store
from metarun.defaults import option_defaults
from metarun.errors import UserInputError

SCHEMES = ("cifarfs", "fc100")
ARCHIVE = "cifar-100-python.tar.gz"
URL_BASE = "https://www.cs.toronto.edu/~kriz"  # the authors' host (Krizhevsky 2009)
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
PARTS = ("train", "test")  # CIFAR-100's own sets; both are used, 500 + 100 images per class
SPLIT_DIR = Path(__file__).parent / "splits"


@dataclass(frozen=True)
class Cifar100:
    """CIFAR-100 read whole: images uint8 [N, 3, 32, 32], fine and coarse labels [N], the label names."""

    images: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    fine_names: list[str]
    coarse_names: list[str]
    where: str


def locate(root: str) -> tuple[Path, str]:
    """(path, form): the cifar-100-python folder or archive under root (or root itself); one line if neither."""
    base = Path(root).expanduser()
    for candidate, form in ((base / FOLDER, "folder"), (base, "folder"), (base / ARCHIVE, "archive"), (base, "archive")):
        if form == "folder" and candidate.is_dir() and all((candidate / n).is_file() for n in (*PARTS, "meta")):
            return candidate, form
        if form == "archive" and candidate.is_file() and candidate.name.endswith(".tar.gz"):
            return candidate, form
    raise UserInputError(f"benchmark.root={root}: no CIFAR-100 python version there (looked for {FOLDER}/ with "
                         f"train, test and meta, or {ARCHIVE}); get it with `metarun data download cifar100 root={root}`")


def _unpickle(data: bytes, name: str, where: str) -> dict[str, Any]:
    try:
        loaded = pickle.loads(data, encoding="bytes")
    except Exception as ex:  # a truncated or foreign file: any unpickling error
        raise UserInputError(f"{where}: {name} is not a CIFAR-100 pickle ({type(ex).__name__}: "
                             f"{str(ex).splitlines()[0] if str(ex) else 'unreadable'})") from None
    if not isinstance(loaded, dict):
        raise UserInputError(f"{where}: {name} is not a CIFAR-100 pickle (a {type(loaded).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in loaded.items()}


def read_cifar100(root: str) -> Cifar100:
    path, form = locate(root)
    if form == "folder":
        raw = {name: (path / name).read_bytes() for name in (*PARTS, "meta")}
    else:
        try:
            with tarfile.open(path, "r:gz") as archive:
                raw = {}
                for name in (*PARTS, "meta"):
                    member = archive.extractfile(f"{FOLDER}/{name}")
                    if member is None:
                        raise KeyError(name)
                    raw[name] = member.read()
        except (tarfile.TarError, KeyError, OSError, EOFError) as ex:
            raise UserInputError(f"{path}: not a complete CIFAR-100 archive ({type(ex).__name__}: {ex}); "
                                 f"download it again") from None
    meta = _unpickle(raw["meta"], "meta", str(path))
    images, fine, coarse = [], [], []
    for name in PARTS:
        part = _unpickle(raw[name], name, str(path))
        missing = {"data", "fine_labels", "coarse_labels"} - set(part)
        if missing:
            raise UserInputError(f"{path}: {name} lacks {', '.join(sorted(missing))}: not CIFAR-100's python version")
        images.append(np.asarray(part["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        fine.append(np.asarray(part["fine_labels"]))
        coarse.append(np.asarray(part["coarse_labels"]))

    def names(key: str) -> list[str]:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]

    return Cifar100(np.concatenate(images), np.concatenate(fine), np.concatenate(coarse),
                    names("fine_label_names"), names("coarse_label_names"), str(path))


def split_classes(scheme: str, data: Cifar100) -> dict[str, list[str]]:
    """Each split's fine class names, in the shipped lists' order (FC100: its superclasses' fine classes)."""
    lists = {s: (SPLIT_DIR / scheme / f"{s}.txt").read_text().split("\n") for s in SPLITS}
    lists = {s: [line for line in lines if line.strip()] for s, lines in lists.items()}
    if scheme == "cifarfs":
        wanted = {s: [line.split()[1] for line in lines] for s, lines in lists.items()}
        known = set(data.fine_names)
    else:
        known = set(data.coarse_names)
        wanted = {s: lines for s, lines in lists.items()}
    for split, names in wanted.items():
        absent = [n for n in names if n not in known]
        if absent:
            raise UserInputError(f"{data.where}: the {scheme} {split} split names class '{absent[0]}', which this "
                                 f"CIFAR-100 copy does not have ({len(absent)} missing)")
    if scheme == "cifarfs":
        return wanted
    of_coarse = {c: sorted({data.fine_names[f] for f in np.unique(data.fine[data.coarse == data.coarse_names.index(c)])})
                 for c in data.coarse_names}
    return {s: [fine for c in names for fine in of_coarse[c]] for s, names in wanted.items()}


def build_store(data: Cifar100, classes: dict[str, list[str]], size: int) -> tuple[Tensor, dict[str, Any]]:
    """[classes, 600, 3, size, size] uint8, classes in train/val/test order, each class's images in file order."""
    rows = []
    for split in SPLITS:
        for name in classes[split]:
            index = np.flatnonzero(data.fine == data.fine_names.index(name))
            if rows and len(index) != len(rows[0]):
                raise UserInputError(f"{data.where}: class '{name}' has {len(index)} images and "
                                     f"'{classes['train'][0]}' {len(rows[0])}; CIFAR-100 has 600 of every class")
            rows.append(data.images[index])
    store = torch.from_numpy(np.stack(rows))  # [C, 600, 3, 32, 32]
    if size != 32:
        flat = store.flatten(0, 1).float()
        resized = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        store = resized.round().clamp(0, 255).to(torch.uint8).view(*store.shape[:3], size, size)
    return store, {"classes": classes}


class Cifar100FewShotBenchmark(SamplerBackedBenchmark):
    """benchmark=cifarfs and benchmark=fc100: constructor parameters are the keys of their config files."""

    def __init__(self, root: str, scheme: str, ways: int, shots: int, queries: int, image_size: int,
                 cache_dir: str | None, augment: dict[str, Any] | None) -> None:
        from metarun.console import console

        if scheme not in SCHEMES:
            raise UserInputError(f"benchmark.scheme must be one of {', '.join(SCHEMES)} (got '{scheme}')")
        check_positive(ways=ways, shots=shots, queries=queries, image_size=image_size)
        started = time.perf_counter()
        path, _ = locate(root)
        self.preprocess = Preprocess(size=image_size, mode="RGB", invert=False)
        listing = [f"{path.resolve()}:{(path / n).stat().st_size if path.is_dir() else path.stat().st_size}"
                   for n in (PARTS if path.is_dir() else ("",))]
        settings = {"scheme": scheme, "size": image_size}

        def build() -> tuple[Tensor, dict[str, Any]]:
            data = read_cifar100(root)
            return build_store(data, split_classes(scheme, data), image_size)

        store, meta, cache_file, hit = cached_store(scheme, listing, settings, build, cache_dir)
        ranges = split_ranges(meta["classes"])
        self.class_names = [name for split in SPLITS for name in meta["classes"][split]]
        self.sampler = EpisodeSampler(store, ranges, ways, shots, queries, name=scheme,
                                      augment=Augmentation.from_config(augment))
        self.spec = TaskSpec(name=scheme, kind="classification", input_shape=(3, image_size, image_size),
                             output_size=ways, ways=ways, shots=shots, queries=queries)
        counts = "/".join(str(ranges[s][1] - ranges[s][0]) for s in SPLITS)
        how = "loaded from cache" if hit else "built and cached"
        console.print(f"{scheme}: CIFAR-100 from {path}; {counts} train/val/test classes x {store.shape[1]} images "
                      f"at {image_size}x{image_size}; {how} {cache_file} ({time.perf_counter() - started:.1f} s)",
                      highlight=False, soft_wrap=True)


_CIFARFS = option_defaults("benchmark", "cifarfs")
_FC100 = option_defaults("benchmark", "fc100")


class CifarFSBenchmark(Cifar100FewShotBenchmark):
    """CIFAR-FS: 64 / 16 / 20 CIFAR-100 classes (configs/benchmark/cifarfs.yaml)."""

    def __init__(self, root: str = _CIFARFS["root"], ways: int = _CIFARFS["ways"], shots: int = _CIFARFS["shots"],
                 queries: int = _CIFARFS["queries"], image_size: int = _CIFARFS["image_size"],
                 cache_dir: str | None = _CIFARFS["cache_dir"], augment: dict[str, Any] | None = _CIFARFS["augment"]
                 ) -> None:
        super().__init__(root, "cifarfs", ways, shots, queries, image_size, cache_dir, augment)


class FC100Benchmark(Cifar100FewShotBenchmark):
    """FC100: CIFAR-100 split by superclass, 60 / 20 / 20 classes (configs/benchmark/fc100.yaml)."""

    def __init__(self, root: str = _FC100["root"], ways: int = _FC100["ways"], shots: int = _FC100["shots"],
                 queries: int = _FC100["queries"], image_size: int = _FC100["image_size"],
                 cache_dir: str | None = _FC100["cache_dir"], augment: dict[str, Any] | None = _FC100["augment"]
                 ) -> None:
        super().__init__(root, "fc100", ways, shots, queries, image_size, cache_dir, augment)
