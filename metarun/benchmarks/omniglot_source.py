"""Where the Omniglot images are (extracted folders or the original zips) and how characters form splits.

Torch-free, shared by the benchmark and `metarun data verify`. Data: Lake, Salakhutdinov and
Tenenbaum, "Human-level concept learning through probabilistic program induction", Science 2015.

Layouts, per set (background, evaluation), first match wins:
  <root>/omniglot-py/images_<set>/<Alphabet>/<characterNN>/*.png   (torchvision, or unpacked zips)
  <root>/images_<set>/...                                          (root pointing inside omniglot-py)
  <root>/omniglot-py/images_<set>.zip, <root>/images_<set>.zip     (read in place, md5-checked)
"""

from __future__ import annotations

import os
import random
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from metarun.benchmarks.decode import ImageRef
from metarun.benchmarks.download import md5sum
from metarun.errors import UserInputError

SETS = ("background", "evaluation")
SPLITS = ("train", "val", "test")
# The canonical archives (brendenlake/omniglot, python/); the md5s are the ones torchvision checks.
ARCHIVE_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
URL_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
SPLIT_SCHEMES = ("vinyals", "lake", "random")
ROTATIONS = (0, 90, 180, 270)
DOWNLOAD_HINT = "metarun data download omniglot root={root}"
# random split (MAML reference code, Finn et al. 2017): of 1623 characters 1200 meta-train, whose last 100
# are meta-validation, and 423 meta-test; other character counts are split in the same proportions.
RANDOM_TRAINVAL, RANDOM_VAL, ALL_CHARACTERS = 1200, 100, 1623
# lake split: 1 background alphabet in 6 (5 of the 30) is held out, seeded, for validation.
LAKE_VAL_ALPHABET_FRACTION = 1 / 6


@dataclass(frozen=True)
class Character:
    """One handwritten character: 20 drawings (one per drawer) in the real data."""

    set: str
    alphabet: str
    name: str
    images: tuple[ImageRef, ...]

    @property
    def key(self) -> str:
        return f"{self.alphabet}/{self.name}"


@dataclass
class OmniglotSource:
    """The characters found under a root, in a stable order (set, alphabet, character), and where from."""

    root: Path
    characters: list[Character]
    origins: dict[str, str]  # set -> folder or archive path
    archives: dict[str, Path] = field(default_factory=dict)  # archive name -> path, every one present
    # what identifies these images for the cache: 'relative/path size mtime_ns', or 'zip:member crc size'
    listing: list[str] = field(default_factory=list)

    def describe(self) -> str:
        counts = {s: sum(c.set == s for c in self.characters) for s in SETS}
        where = ", ".join(f"{s} {counts[s]} characters from {self.origins[s]}" for s in SETS)
        return f"omniglot: {where}"


def find_archives(root: Path) -> dict[str, Path]:
    """The canonical zips present in <root>/omniglot-py/ or <root>/ (first wins)."""
    found = {}
    for name in ARCHIVE_MD5:
        for folder in (root / "omniglot-py", root):
            if (folder / name).is_file():
                found[name] = folder / name
                break
    return found


def check_archive(path: Path, root: Path) -> None:
    """Raise UserInputError when a canonical zip's md5 is wrong (truncated or altered download)."""
    expected = ARCHIVE_MD5[path.name]
    actual = md5sum(path)
    if actual != expected:
        raise UserInputError(f"checksum mismatch for {path}: md5 {actual}, expected {expected}; delete it and run "
                             f"`{DOWNLOAD_HINT.format(root=root)}` again")


def locate(root: str | os.PathLike[str]) -> OmniglotSource:
    """Find both sets under `root`; UserInputError (one line, naming the download command) when missing."""
    base = Path(root).expanduser()
    archives = find_archives(base) if base.is_dir() else {}
    characters: list[Character] = []
    origins: dict[str, str] = {}
    listing: list[str] = []
    for set_name in SETS:
        folder = next((f for f in (base / "omniglot-py" / f"images_{set_name}", base / f"images_{set_name}")
                       if f.is_dir()), None)
        archive = archives.get(f"images_{set_name}.zip")
        if folder is not None:
            characters += _characters_in_folder(folder, set_name, base, listing)
            origins[set_name] = str(folder)
        elif archive is not None:
            characters += _characters_in_zip(archive, set_name, base, listing)
            origins[set_name] = str(archive)
        else:
            what = "Omniglot data" if not origins else f"the Omniglot {set_name} set"
            raise UserInputError(f"{what} not found under {base} (looked for omniglot-py/images_{set_name}/ and "
                                 f"images_{set_name}.zip); run `{DOWNLOAD_HINT.format(root=base)}` "
                                 "or set benchmark.root")
    for set_name in SETS:
        if not any(c.set == set_name for c in characters):
            raise UserInputError(f"no character folders with PNGs in {origins[set_name]}; expected "
                                 f"<Alphabet>/<characterNN>/*.png (run `metarun data verify omniglot root={base}`)")
    return OmniglotSource(base, characters, origins, archives, listing)


def _characters_in_folder(folder: Path, set_name: str, root: Path, listing: list[str]) -> list[Character]:
    """One scandir pass that also stats each file for the cache listing (DirEntry.stat is the cheap stat)."""
    out = []
    prefix = os.path.relpath(folder, root)
    for alphabet in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
        for char in sorted(e.name for e in os.scandir(folder / alphabet) if e.is_dir()):
            char_dir = folder / alphabet / char
            pngs = sorted((e for e in os.scandir(char_dir) if e.name.lower().endswith(".png")), key=lambda e: e.name)
            for entry in pngs:
                stat = entry.stat()
                listing.append(f"{prefix}/{alphabet}/{char}/{entry.name} {stat.st_size} {stat.st_mtime_ns}")
            if pngs:
                out.append(Character(set_name, alphabet, char, tuple(ImageRef(entry.path) for entry in pngs)))
    return out


def _characters_in_zip(archive: Path, set_name: str, root: Path, listing: list[str]) -> list[Character]:
    try:
        with zipfile.ZipFile(archive) as handle:
            infos = handle.infolist()
    except (zipfile.BadZipFile, OSError) as ex:
        raise UserInputError(f"cannot read {archive} ({ex}); delete it and run "
                             f"`{DOWNLOAD_HINT.format(root=root)}` again") from None
    grouped: dict[tuple[str, str], list[str]] = {}
    for info in sorted(infos, key=lambda i: i.filename):
        parts = info.filename.split("/")
        if len(parts) == 4 and parts[0] == f"images_{set_name}" and parts[3].lower().endswith(".png"):
            grouped.setdefault((parts[1], parts[2]), []).append(info.filename)
            listing.append(f"{archive.name}:{info.filename} {info.CRC} {info.file_size}")
    return [Character(set_name, alphabet, char, tuple(ImageRef(n, str(archive)) for n in members))
            for (alphabet, char), members in sorted(grouped.items())]


Split = dict[str, list[tuple[int, int]]]  # split -> [(character index, rotation in degrees)], one per class


def make_split(characters: list[Character], scheme: str, rotations: tuple[int, ...], seed: int) -> Split:
    """Classes per split: characters (indices into `characters`) times rotations."""
    if scheme not in SPLIT_SCHEMES:
        raise UserInputError(f"benchmark.split_scheme must be one of {', '.join(SPLIT_SCHEMES)} (got '{scheme}')")
    bad = [r for r in rotations if r not in ROTATIONS]
    if bad or not rotations or len(set(rotations)) != len(rotations):
        raise UserInputError(f"benchmark.rotations must be distinct values among {list(ROTATIONS)} "
                             f"(got {list(rotations)})")
    if scheme == "vinyals":
        return _vinyals(characters, rotations)
    chars = _lake(characters, seed) if scheme == "lake" else _random(len(characters), seed)
    return {split: [(i, r) for i in members for r in rotations] for split, members in chars.items()}


def _vinyals(characters: list[Character], rotations: tuple[int, ...]) -> Split:
    """Vinyals et al. 2016 as listed by Snell et al. (prototypical-networks): lines `<Alphabet>/<characterNN>/rotDDD`,
    1028/172/423 characters. Rotations not in `rotations` are left out."""
    index = {c.key: i for i, c in enumerate(characters)}
    split: Split = {}
    missing: list[str] = []
    for name in SPLITS:
        classes = []
        for line in vinyals_lines(name):
            key, _, rot = line.rpartition("/")
            degrees = int(rot.removeprefix("rot"))
            if key not in index:
                missing.append(key)
            elif degrees in rotations:
                classes.append((index[key], degrees))
        split[name] = classes
    if missing:
        unique = sorted(set(missing))
        raise UserInputError(f"the vinyals split names {len(unique)} characters missing from the data "
                             f"(e.g. {unique[0]}); the data is incomplete: run `metarun data verify omniglot` "
                             "or use benchmark.split_scheme=lake")
    return split


def vinyals_lines(split: str) -> list[str]:
    text = resources.files("metarun.benchmarks").joinpath("splits", "vinyals", f"{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _lake(characters: list[Character], seed: int) -> dict[str, list[int]]:
    """Lake et al. 2015: background alphabets train, evaluation alphabets test; validation is 1 in 6 of the
    background alphabets (5 of 30), chosen with random.Random(seed) from the sorted names, so whole
    alphabets are unseen in validation as they are in test."""
    alphabets = sorted({c.alphabet for c in characters if c.set == "background"})
    held = set(random.Random(seed).sample(alphabets, max(1, round(len(alphabets) * LAKE_VAL_ALPHABET_FRACTION))))
    return {
        "train": [i for i, c in enumerate(characters) if c.set == "background" and c.alphabet not in held],
        "val": [i for i, c in enumerate(characters) if c.set == "background" and c.alphabet in held],
        "test": [i for i, c in enumerate(characters) if c.set == "evaluation"],
    }


def _random(count: int, seed: int) -> dict[str, list[int]]:
    """Finn et al. 2017's code: shuffle all characters (here random.Random(seed) over the sorted list), take
    the first 1200 for meta-training of which the last 100 validate (so 1100 train), the other 423 test."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    trainval = round(count * RANDOM_TRAINVAL / ALL_CHARACTERS)
    val = round(count * RANDOM_VAL / ALL_CHARACTERS)
    return {"train": order[:trainval - val], "val": order[trainval - val:trainval], "test": order[trainval:]}
