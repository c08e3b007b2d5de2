"""What `metarun data verify` checks: counts per set and split, archive checksums, every image decodable.

Returns a Report (rows to print, problems that make the exit status 2, warnings that do not), so the
checks are testable without parsing terminal output. Torch-free, like the rest of the data command.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path

from metarun.benchmarks import miniimagenet_source as mini
from metarun.benchmarks import omniglot_source as omni
from metarun.benchmarks.decode import ImageRef, check_all
from metarun.benchmarks.download import md5sum
from metarun.errors import UserInputError

# The published sizes; a different count is reported as a warning (a subset may be intended).
OMNIGLOT_SETS = {"background": (30, 964, 19280), "evaluation": (20, 659, 13180)}
VINYALS_CLASSES = {"train": 4112, "val": 688, "test": 1692}
MINI_CLASSES, MINI_PER_CLASS = {"train": 64, "val": 16, "test": 20}, 600
SHOW_AT_MOST = 5


@dataclass
class Report:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, part: str, **cells: object) -> None:
        """A row by column name (`per class` is spelt per_class); missing cells stay empty."""
        self.rows.append([part] + [str(cells.get(c.replace(" ", "_"), "")) for c in self.columns[1:]])


def _spread(counts: list[int]) -> str:
    if not counts:
        return "-"
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _short(path: str | Path, root: Path) -> str:
    """A path relative to the root named in the title, so the table fits a terminal."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _decode_problems(report: Report, refs: list[ImageRef], workers: int) -> None:
    errors = check_all(refs, workers)
    for message in errors[:SHOW_AT_MOST]:
        report.problems.append(f"corrupt image {message}")
    if len(errors) > SHOW_AT_MOST:
        report.problems.append(f"... and {len(errors) - SHOW_AT_MOST} more corrupt images")
    report.add("decoded", source="every image", images=len(refs),
               status="ok" if not errors else f"{len(errors)} corrupt")


def verify_omniglot(root: str | Path, split_scheme: str = "vinyals", split_seed: int = 0, workers: int = 2) -> Report:
    source = omni.locate(root)
    columns = ["part", "source", "alphabets", "classes", "images", "per class", "status"]
    report = Report(f"omniglot in {source.root}", columns)
    for set_name in omni.SETS:
        chars = [c for c in source.characters if c.set == set_name]
        counts = [len(c.images) for c in chars]
        alphabets = len({c.alphabet for c in chars})
        status = "ok"
        if (alphabets, len(chars), sum(counts)) != OMNIGLOT_SETS[set_name]:
            status = "differs"
            expected = "/".join(map(str, OMNIGLOT_SETS[set_name]))
            report.warnings.append(f"{set_name}: {alphabets}/{len(chars)}/{sum(counts)} alphabets/characters/images, "
                                   f"the published set has {expected}")
        if len(set(counts)) > 1:
            status = "uneven"
            short = min(chars, key=lambda c: len(c.images))
            report.problems.append(f"{set_name}/{short.key} has {len(short.images)} drawings, "
                                   f"others up to {max(counts)}")
        report.add(set_name, source=Path(source.origins[set_name]).name, alphabets=alphabets, classes=len(chars),
                   images=sum(counts), per_class=_spread(counts), status=status)
    for name, path in sorted(source.archives.items()):
        actual = md5sum(path)
        good = actual == omni.ARCHIVE_MD5[name]
        if not good:
            report.problems.append(f"checksum mismatch for {path}: md5 {actual}, expected {omni.ARCHIVE_MD5[name]}")
        report.add(name.removeprefix("images_"), source=_short(path, source.root),
                   status="md5 ok" if good else "md5 WRONG")
    _omniglot_splits(report, source, split_scheme, split_seed)
    _decode_problems(report, [ref for c in source.characters for ref in c.images], workers)
    return report


def _omniglot_splits(report: Report, source: omni.OmniglotSource, scheme: str, seed: int) -> None:
    try:
        split = omni.make_split(source.characters, scheme, omni.ROTATIONS, seed)
    except UserInputError as ex:
        report.problems.append(f"{scheme} split: {ex}")
        return
    chars_of = {name: {c for c, _ in classes} for name, classes in split.items()}
    for name in omni.SPLITS:
        chars = chars_of[name]
        status = "ok"
        if scheme == "vinyals" and len(split[name]) != VINYALS_CLASSES[name]:
            status = "differs"
            report.warnings.append(f"vinyals {name}: {len(split[name])} classes, expected {VINYALS_CLASSES[name]}")
        others = set().union(*(chars_of[o] for o in omni.SPLITS if o != name))
        if chars & others:
            status = "overlaps"
            report.problems.append(f"{scheme} {name} shares {len(chars & others)} characters with another split")
        images = sum(len(source.characters[c].images) for c in chars)
        alphabets = len({source.characters[c].alphabet for c in chars})
        per_class = _spread(sorted({len(source.characters[c].images) for c in chars}))
        report.add(name, source=f"{scheme} x{len(omni.ROTATIONS)} rot.", alphabets=alphabets, classes=len(split[name]),
                   images=images, per_class=per_class, status=status)


def verify_miniimagenet(root: str | Path, workers: int = 2) -> Report:
    source = mini.detect(root)
    report = Report(source.describe(), ["part", "source", "classes", "images", "per class", "status"])
    classes: dict[str, set[str]] = {}
    refs: list[ImageRef] = []
    for split in mini.SPLITS:
        try:
            found: dict[str, Sized] = (mini.image_classes(source, split) if source.format in ("ravi-csv", "folders")
                                       else mini.pickle_classes(source, split))
        except UserInputError as ex:
            report.problems.append(str(ex))
            report.add(split, source=_short(source.splits[split], source.root), status="unreadable")
            continue
        counts = [len(items) for items in found.values()]
        classes[split] = set(found)
        if source.format in ("ravi-csv", "folders"):
            refs += [ref for files in found.values() for ref in files]  # type: ignore[attr-defined]
        status = "ok"
        if len(set(counts)) > 1:
            status = "uneven"
            report.problems.append(f"{split}: classes have {_spread(sorted(counts))} images; "
                                   "every class needs the same number")
        elif len(found) != MINI_CLASSES[split] or counts[0] != MINI_PER_CLASS:
            status = "differs"
            report.warnings.append(f"{split}: {len(found)} classes x {_spread(counts)} images, the published split has "
                                   f"{MINI_CLASSES[split]} x {MINI_PER_CLASS}")
        report.add(split, source=_short(source.splits[split], source.root), classes=len(found), images=sum(counts),
                   per_class=_spread(sorted(counts)), status=status)
    names = list(classes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if classes[a] & classes[b]:
                report.problems.append(f"{a} and {b} share classes (e.g. {sorted(classes[a] & classes[b])[0]})")
    if refs:
        _decode_problems(report, refs, workers)
    return report
