"""Tiny image datasets written in the real on-disk formats, and a way to run `metarun` on them.

Everything is generated from a seed in a temporary folder: 1-bit Omniglot PNGs in the torchvision
tree and in the original zip layout; miniImageNet as Ravi CSVs + images/, class folders, the
image_data/class_dict pickles, and MetaOptNet pickles written the way Python 2 wrote them.
"""

from __future__ import annotations

import atexit
import csv
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

DRAWERS = 20  # as in the real data: enough for the default 1 shot + 15 queries
PNG_SIZE = 14
BACKGROUND = {f"Alphabet_{c}": 2 for c in "ABCDEF"}  # 6 alphabets: lake holds 1 out for validation
EVALUATION = {"Script_X": 2, "Script_Y": 2}


def omniglot_tree(root: Path, background: dict[str, int], evaluation: dict[str, int], drawers: int = DRAWERS,
                  size: int = PNG_SIZE, seed: int = 0) -> Path:
    """root/omniglot-py/images_<set>/<Alphabet>/characterNN/<ID>_<DD>.png, 1-bit, white background, black ink.
    Each character is a random stroke pattern, its drawings noisy copies of it. Returns root."""
    rng = np.random.default_rng(seed)
    char_id = 0
    for set_name, alphabets in (("background", background), ("evaluation", evaluation)):
        for alphabet, count in alphabets.items():
            for n in range(1, count + 1):
                char_id += 1
                folder = root / "omniglot-py" / f"images_{set_name}" / alphabet / f"character{n:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                ink = rng.random((size, size)) < 0.25
                for d in range(1, drawers + 1):
                    drawing = ink ^ (rng.random((size, size)) < 0.03)
                    Image.fromarray(~drawing).convert("1").save(folder / f"{char_id:04d}_{d:02d}.png")
    return root


def zip_set(root: Path, set_name: str, dest: Path) -> Path:
    """The original archive layout: images_<set>.zip whose members start with images_<set>/."""
    source = root / "omniglot-py" / f"images_{set_name}"
    archive = dest / f"images_{set_name}.zip"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(source.rglob("*")):
            out.write(path, path.relative_to(source.parent).as_posix())
    return archive


# miniImageNet ------------------------------------------------------------------------------------------

MINI_CLASSES = {"train": [f"n0100000{i}" for i in range(6)],
                "val": [f"n0200000{i}" for i in range(5)],
                "test": [f"n0300000{i}" for i in range(5)]}
MINI_PER_CLASS = 20


def _mini_pixels(rng: np.random.Generator, class_index: int, height: int, width: int) -> np.ndarray:
    """A per-class colour plus noise: classes are learnable, images differ."""
    base = np.array([(class_index * 53) % 256, (class_index * 97) % 256, (class_index * 151) % 256])
    noise = rng.integers(-30, 31, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def mini_csv(root: Path, seed: int = 0) -> Path:
    """Ravi & Larochelle: {train,val,test}.csv (filename,label) and a flat images/ of JPEGs of mixed sizes."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    index = 0
    for split, wnids in MINI_CLASSES.items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for wnid in wnids:
                for i in range(1, MINI_PER_CLASS + 1):
                    name = f"{wnid}{i:08d}.jpg"
                    size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
                    Image.fromarray(_mini_pixels(rng, index, *size)).save(root / "images" / name, quality=90)
                    writer.writerow([name, wnid])
                index += 1
    return root


def mini_folders(root: Path, seed: int = 0) -> Path:
    """{train,val,test}/<wnid>/*.jpg."""
    rng = np.random.default_rng(seed)
    index = 0
    for split, wnids in MINI_CLASSES.items():
        for wnid in wnids:
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(MINI_PER_CLASS):
                Image.fromarray(_mini_pixels(rng, index, 24, 30)).save(folder / f"{wnid}_{i}.jpg", quality=90)
            index += 1
    return root


def mini_classes(train: int, val: int, test: int) -> dict[str, list[str]]:
    """Class names (wnid-like) for a fixture with these many classes per split."""
    return {split: [f"n0{digit}{i:06d}" for i in range(count)]
            for split, digit, count in (("train", 1, train), ("val", 2, val), ("test", 3, test))}


def _split_arrays(seed: int, classes: dict[str, list[str]],
                  per_class: int = MINI_PER_CLASS) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per split: uint8 [n, 84, 84, 3] images (class-major, `per_class` each) and their class names."""
    rng = np.random.default_rng(seed)
    out, index = {}, 0
    for split, wnids in classes.items():
        images = []
        for _ in wnids:
            images += [_mini_pixels(rng, index, 84, 84) for _ in range(per_class)]
            index += 1
        out[split] = (np.stack(images), [w for w in wnids for _ in range(per_class)])
    return out


def mini_cache_pickles(root: Path, seed: int = 0, val_name: str = "validation",
                       classes: dict[str, list[str]] | None = None, per_class: int = MINI_PER_CLASS) -> Path:
    """mini-imagenet-cache-{train,validation,test}.pkl with image_data and class_dict (Python 3 pickles)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in _split_arrays(seed, classes or MINI_CLASSES, per_class).items():
        class_dict: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            class_dict.setdefault(label, []).append(i)
        name = val_name if split == "val" else split
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as handle:
            pickle.dump({"image_data": images, "class_dict": class_dict}, handle, protocol=4)
    return root


class Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes what Python 2's cPickle (protocol 2) wrote: str and bytes as 8-bit BINSTRINGs (so numpy's
    raw buffers need encoding='latin1' to load in Python 3) and numpy globals under `numpy.core`."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_binstring(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_binstring
    dispatch[bytes] = save_binstring

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            qualified = name or obj.__name__  # type: ignore[attr-defined]
            legacy = module.replace("numpy._core", "numpy.core")
            self.write(pickle.GLOBAL + legacy.encode() + b"\n" + qualified.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type] = save_global


def mini_metaoptnet_pickles(root: Path, seed: int = 0) -> Path:
    """miniImageNet_category_split_{train_phase_train,val,test}.pickle: data, labels, catname2label (Python 2)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"train": "train_phase_train", "val": "val", "test": "test"}
    offset = 0
    for split, (images, names) in _split_arrays(seed, MINI_CLASSES).items():
        unique = list(dict.fromkeys(names))
        catname2label = {name: offset + i for i, name in enumerate(unique)}  # global labels, as MetaOptNet's
        offset += len(unique)
        payload = {"data": images, "labels": [catname2label[n] for n in names], "catname2label": catname2label}
        with open(root / f"miniImageNet_category_split_{files[split]}.pickle", "wb") as handle:
            Python2Pickler(handle, protocol=2).dump(payload)
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# CIFAR-100 (python version) -----------------------------------------------------------------------------

def cifar100_names() -> tuple[list[str], list[str], dict[str, str]]:
    """CIFAR-100's fine and coarse class names (alphabetical, as its meta file lists them) and fine -> coarse,
    from the shipped CIFAR-FS lists (whose 64 + 16 + 20 pairs are all 100 classes)."""
    from metarun.benchmarks.cifar100 import SPLIT_DIR

    pairs = [line.split() for s in ("train", "val", "test")
             for line in (SPLIT_DIR / "cifarfs" / f"{s}.txt").read_text().splitlines() if line.strip()]
    coarse_of = {fine: coarse for coarse, fine in pairs}
    return sorted(coarse_of), sorted(set(coarse_of.values())), coarse_of


def cifar100_python(root: Path, train_per_class: int = 8, test_per_class: int = 2, seed: int = 0,
                    archive: bool = False) -> Path:
    """root/cifar-100-python/{train,test,meta} as CIFAR-100's authors pickled them (bytes keys, `data` uint8
    [N, 3072] channel-major rows, `fine_labels`, `coarse_labels`), fewer images per class; or, with `archive`,
    root/cifar-100-python.tar.gz holding that folder. Each class is a colour and a pattern plus noise. Returns root."""
    import io
    import tarfile

    fine_names, coarse_names, coarse_of = cifar100_names()
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(100, 3, 32, 32))
    blobs = {}
    for part, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per)
        rng.shuffle(labels)
        noise = rng.integers(-40, 41, size=(len(labels), 3, 32, 32))
        data = np.clip(base[labels] + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3072)
        blobs[part] = pickle.dumps({b"batch_label": part.encode(), b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
                                    b"data": data, b"fine_labels": labels.tolist(),
                                    b"coarse_labels": [coarse_names.index(coarse_of[fine_names[f]]) for f in labels]})
    blobs["meta"] = pickle.dumps({b"fine_label_names": [n.encode() for n in fine_names],
                                  b"coarse_label_names": [n.encode() for n in coarse_names]})
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return root
    (root / "cifar-100-python").mkdir(exist_ok=True)
    for name, blob in blobs.items():
        (root / "cifar-100-python" / name).write_bytes(blob)
    return root


# running the command -----------------------------------------------------------------------------------

def metarun_command() -> list[str]:
    script = Path(sys.executable).parent / "metarun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "metarun"]


def metarun_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a test's `metarun` runs in: this one, wide lines, one-line errors (no HYDRA_FULL_ERROR)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return full_env


def start_metarun(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `metarun ...` without waiting, so independent slow runs overlap."""
    return subprocess.Popen([*metarun_command(), *args], cwd=cwd, env=metarun_env(env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_metarun(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return finish(start_metarun(*args, cwd=cwd, env=env))


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a bad-input exit (asserting it is a single line)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


_runs: dict[str, subprocess.Popen[str] | Path] = {}


def smoke_runs(workdir_factory) -> dict[str, subprocess.Popen[str] | Path]:  # type: ignore[no-untyped-def]
    """The slow `metarun train` subprocesses of the test session, all started on first use so that they
    overlap (each spends seconds importing torch): the Omniglot and miniImageNet smoke runs on fixtures,
    and the missing-root failure. `workdir_factory` is pytest's tmp_path_factory."""
    if not _runs:
        work = workdir_factory.mktemp("smoke_runs")
        omniglot = omniglot_tree(work / "omniglot", BACKGROUND, EVALUATION)
        mini = mini_cache_pickles(work / "miniimagenet")
        env = {"METARUN_CACHE": str(work / "cache")}
        common = ["debug=smoke", "logger.tensorboard=false"]
        _runs["omniglot_dir"], _runs["mini_dir"] = work / "omniglot_run", work / "mini_run"
        _runs["omniglot"] = start_metarun("train", "benchmark=omniglot", f"benchmark.root={omniglot}",
                                          "benchmark.split_scheme=lake", *common,
                                          f"hydra.run.dir={_runs['omniglot_dir']}", cwd=work, env=env)
        _runs["miniimagenet"] = start_metarun("train", "benchmark=miniimagenet", f"benchmark.root={mini}", *common,
                                              f"hydra.run.dir={_runs['mini_dir']}", cwd=work, env=env)
        _runs["missing_root"] = start_metarun("train", "benchmark=omniglot", f"benchmark.root={work / 'nowhere'}",
                                              *common, f"hydra.run.dir={work / 'missing_run'}", cwd=work, env=env)
        atexit.register(_stop_runs)
    return _runs


def _stop_runs() -> None:
    """Runs a partial test selection never waited for must not outlive the session."""
    for run in _runs.values():
        if isinstance(run, subprocess.Popen) and run.poll() is None:
            run.kill()
            run.communicate()
