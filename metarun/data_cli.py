"""`metarun data download|verify omniglot|miniimagenet [key=value ...]`: data preparation is a command,
benchmark classes only read. Torch is never imported here, so the command answers at once.

Exit status: 0 done (or verified), 2 bad input or a problem found in the data. `download miniimagenet`
exits 0 when root already holds an accepted format and 2 otherwise (there is nothing we can fetch:
a script that chains it with `metarun train` should stop).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from metarun.errors import UserInputError, closest

if TYPE_CHECKING:
    from metarun.benchmarks.verify import Report

USAGE = """\
usage: metarun data <download|verify> <omniglot|miniimagenet|cifar100|cub> [key=value ...]

  download omniglot [root=PATH] [mirror=URL]
      fetch images_background.zip and images_evaluation.zip from brendenlake/omniglot (md5-checked,
      resumable), unpack them into PATH/omniglot-py/ (the layout benchmark=omniglot reads)
  download miniimagenet [root=PATH]
      miniImageNet has no official host: lists the accepted formats (exit 0 if PATH already holds one)
  download cifar100 [root=PATH] [mirror=URL]
      fetch cifar-100-python.tar.gz from the authors' site (md5-checked, resumable) into PATH; benchmark=cifarfs
      and benchmark=fc100 read it as it is
  download cub [root=PATH] [mirror=URL]
      fetch CUB_200_2011.tgz from Caltech's data repository (md5-checked, resumable) and unpack it into PATH
      (benchmark=cub reads PATH/CUB_200_2011/images)
  verify omniglot [root=PATH] [split_scheme=vinyals|lake|random] [split_seed=0] [workers=2]
  verify miniimagenet [root=PATH] [workers=2]
  verify cifar100 [root=PATH]
  verify cub [root=PATH]
      count classes and images per split, check archive checksums, decode every image;
      exit status 2 when something is wrong

root defaults to $METARUN_DATA/<dataset>, else ./data/<dataset>: the default of benchmark.root."""

ACTIONS = ("download", "verify")
DATASETS = ("omniglot", "miniimagenet", "cifar100", "cub")
OPTIONS = {
    ("download", "omniglot"): ("root", "mirror"),
    ("download", "miniimagenet"): ("root",),
    ("verify", "omniglot"): ("root", "split_scheme", "split_seed", "workers"),
    ("verify", "miniimagenet"): ("root", "workers"),
    ("download", "cifar100"): ("root", "mirror"),
    ("verify", "cifar100"): ("root",),
    ("download", "cub"): ("root", "mirror"),
    ("verify", "cub"): ("root",),
}
INT_OPTIONS = ("split_seed", "workers")
MINI_HOWTO = """\
miniImageNet (Vinyals et al. 2016; splits of Ravi & Larochelle 2017) has no official download: its images
come from ImageNet, whose terms of access (image-net.org: non-commercial research) apply to you.
Put one of these under root; metarun detects which:
  (a) train.csv, val.csv, test.csv (filename,label; twitter/meta-learning-lstm data/miniImagenet)
      and a flat images/ folder holding those files, any size (resized to 84x84)
  (b) train/ val/ test/ folders of <wnid>/*.jpg
  (c) mini-imagenet-cache-{train,validation,test}.pkl (image_data N x 84 x 84 x 3, class_dict)
  (d) MetaOptNet miniImageNet_category_split_{train_phase_train,val,test}.pickle (data, labels, catname2label)
Then check it: metarun data verify miniimagenet root=PATH"""


def main(args: list[str]) -> None:
    """Entry point from metarun.cli; exits 2 with one line on bad input."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    try:
        action, dataset, options = parse(args)
        ok = run(action, dataset, options)
    except UserInputError as ex:
        _fail(str(ex))
    except KeyboardInterrupt:
        _fail("interrupted; a partial download is kept as <file>.part and resumed by the same command")
    if not ok:
        sys.exit(2)


def _fail(message: str) -> None:
    from metarun.console import print_error

    print_error(message)
    sys.exit(2)


def parse(args: list[str]) -> tuple[str, str, dict[str, str | int]]:
    """`<action> <dataset> key=value ...` -> (action, dataset, options with root filled in)."""
    action = args[0]
    if action not in ACTIONS:
        raise UserInputError(f"unknown data command '{action}'{closest(action, ACTIONS)}; use: {', '.join(ACTIONS)}")
    if len(args) < 2 or "=" in args[1]:
        raise UserInputError(f"name a dataset: metarun data {action} <{'|'.join(DATASETS)}> [key=value ...]")
    dataset = args[1]
    if dataset not in DATASETS:
        raise UserInputError(f"unknown dataset '{dataset}'{closest(dataset, DATASETS)}; "
                             f"choose one of {', '.join(DATASETS)}")
    allowed = OPTIONS[(action, dataset)]
    options: dict[str, str | int] = {}
    for arg in args[2:]:
        key, sep, value = arg.partition("=")
        key = key.removeprefix("benchmark.")  # accept the train command's spelling too
        if not sep or key not in allowed:
            raise UserInputError(f"unknown option '{arg}'{closest(key, allowed)}; metarun data {action} {dataset} "
                                 f"accepts: {', '.join(k + '=...' for k in allowed)}")
        if key in INT_OPTIONS:
            if not value.isdigit():
                raise UserInputError(f"{key} must be a non-negative integer (got '{value}')")
            options[key] = int(value)
        else:
            options[key] = value
    options.setdefault("root", default_root(dataset))
    return action, dataset, options


def default_root(dataset: str) -> str:
    """The same default as configs/benchmark/<dataset>.yaml: $METARUN_DATA/<dataset>, else ./data/<dataset>."""
    return str(Path(os.environ.get("METARUN_DATA", "data")) / dataset)


def run(action: str, dataset: str, options: dict[str, str | int]) -> bool:
    """Do it; False when verification found a problem (the caller exits 2)."""
    root = Path(str(options["root"])).expanduser()
    if action == "download":
        if dataset == "omniglot":
            download_omniglot(root, str(options.get("mirror", "")) or None)
            return True
        if dataset == "cifar100":
            download_cifar100(root, str(options.get("mirror", "")) or None)
            return True
        if dataset == "cub":
            download_cub(root, str(options.get("mirror", "")) or None)
            return True
        return explain_miniimagenet(root)
    if dataset == "cifar100":
        return verify_cifar100(root)
    if dataset == "cub":
        return verify_cub(root)
    from metarun.benchmarks import verify

    workers = int(options.get("workers", 2))
    if dataset == "omniglot":
        report = verify.verify_omniglot(root, str(options.get("split_scheme", "vinyals")),
                                        int(options.get("split_seed", 0)), workers)
    else:
        report = verify.verify_miniimagenet(root, workers)
    print_report(report)
    return report.ok


def download_omniglot(root: Path, mirror: str | None) -> None:
    """Both archives into root/omniglot-py/, verified, then unpacked beside them (torchvision's layout)."""
    from metarun.benchmarks import omniglot_source as omni
    from metarun.benchmarks.download import download, extract
    from metarun.console import console

    base = (mirror or omni.URL_BASE).rstrip("/")
    folder = root / "omniglot-py"
    for name, md5 in omni.ARCHIVE_MD5.items():
        top = name.removesuffix(".zip")
        if (folder / top).is_dir():
            console.print(f"{folder / top} already present; skipped "
                          f"(check it: metarun data verify omniglot root={root})")
            continue
        manual = (f"offline? fetch {omni.URL_BASE}/{name} (and the other archive) by hand into {folder}/ "
                  f"and run this command again to check and unpack them")
        archive = download(f"{base}/{name}", folder / name, md5, manual)
        extract(archive, folder, top)
        console.print(f"{name}: md5 ok, unpacked to {folder / top}")
    console.print(f"omniglot ready: metarun train benchmark=omniglot benchmark.root={root}")


def download_cifar100(root: Path, mirror: str | None) -> None:
    """The archive into root, verified; benchmark=cifarfs/fc100 read it without unpacking."""
    from metarun.benchmarks import cifar100
    from metarun.benchmarks.download import download
    from metarun.console import console

    base = (mirror or cifar100.URL_BASE).rstrip("/")
    manual = (f"offline? fetch {cifar100.URL_BASE}/{cifar100.ARCHIVE} by hand into {root}/ and run this command "
              f"again to check it")
    download(f"{base}/{cifar100.ARCHIVE}", root / cifar100.ARCHIVE, cifar100.ARCHIVE_MD5, manual)
    console.print(f"{cifar100.ARCHIVE}: md5 ok; metarun train benchmark=cifarfs benchmark.root={root} "
                  f"(or benchmark=fc100)")


def verify_cifar100(root: Path) -> bool:
    """Read CIFAR-100 whole and check both few-shot splits against it: classes and images per split."""
    import numpy as np

    from metarun.benchmarks import cifar100
    from metarun.console import console

    data = cifar100.read_cifar100(str(root))
    per_class = np.bincount(data.fine, minlength=len(data.fine_names))
    for scheme in cifar100.SCHEMES:
        classes = cifar100.split_classes(scheme, data)
        counts = "/".join(str(len(classes[s])) for s in ("train", "val", "test"))
        console.print(f"{scheme}: {counts} train/val/test classes", highlight=False)
    uneven = sorted({int(n) for n in per_class})
    console.print(f"{data.where}: {len(data.images)} images, {len(data.fine_names)} classes, "
                  f"{'/'.join(map(str, uneven))} images per class", highlight=False)
    if len(uneven) > 1:
        from metarun.console import print_error

        print_error(f"classes hold different numbers of images ({'/'.join(map(str, uneven))}); CIFAR-100 has 600 each")
        return False
    console.print("[bold green]ok[/]")
    return True


CUB_ARCHIVE = "CUB_200_2011.tgz"
CUB_URL_BASE = "https://data.caltech.edu/records/65de6-vp158/files"  # Caltech's data repository (Wah et al. 2011)
CUB_MD5 = "97eceeb196236b17998738112f37df78"


def download_cub(root: Path, mirror: str | None) -> None:
    """The archive into root, verified, unpacked to root/CUB_200_2011/ (benchmark=cub reads its images/)."""
    from metarun.benchmarks.download import download, extract_tar
    from metarun.console import console

    if (root / "CUB_200_2011" / "images").is_dir():
        console.print(f"{root / 'CUB_200_2011'} already present; skipped (check it: metarun data verify cub root={root})")
        return
    base = (mirror or CUB_URL_BASE).rstrip("/")
    manual = f"offline? fetch {CUB_URL_BASE}/{CUB_ARCHIVE} by hand into {root}/ and run this command again"
    archive = download(f"{base}/{CUB_ARCHIVE}", root / CUB_ARCHIVE, CUB_MD5, manual)
    extract_tar(archive, root, "CUB_200_2011")
    console.print(f"{CUB_ARCHIVE}: md5 ok, unpacked; metarun train benchmark=cub "
                  f"benchmark.root={root / 'CUB_200_2011' / 'images'}")


def verify_cub(root: Path) -> bool:
    """The class folders against the shipped split (Chen et al.): classes and images per split."""
    from metarun.benchmarks.layouts import detect
    from metarun.console import console

    images = root / "CUB_200_2011" / "images" if (root / "CUB_200_2011").is_dir() else root
    source = detect(images, "class-folders", "cub")
    for split, classes in source.classes.items():
        counts = [len(refs) for _, refs in classes]
        console.print(f"{split}: {len(classes)} classes, {sum(counts)} images ({min(counts)}-{max(counts)} per class)",
                      highlight=False)
    console.print("[bold green]ok[/]")
    return True


def explain_miniimagenet(root: Path) -> bool:
    from metarun.benchmarks.miniimagenet_source import detect
    from metarun.console import console

    try:
        found = detect(root)
    except UserInputError:
        console.print(MINI_HOWTO, highlight=False, soft_wrap=True)
        from metarun.console import print_error

        print_error(f"no miniImageNet under {root} yet: nothing was downloaded (see above)")
        return False
    console.print(f"{found.describe()}: nothing to download; "
                  f"metarun train benchmark=miniimagenet benchmark.root={root}",
                  highlight=False, soft_wrap=True)
    return True


def print_report(report: Report) -> None:
    from rich import box
    from rich.table import Table

    from metarun.console import console

    table = Table(title=report.title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in report.columns:
        numeric = column in ("alphabets", "classes", "images", "per class")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "source")
    for row in report.rows:
        style = "red" if row[-1] not in ("ok", "md5 ok", "differs") else ("yellow" if row[-1] == "differs" else None)
        table.add_row(*row, style=style)
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for problem in report.problems:
        console.print(f"[bold red]problem:[/] {problem}", highlight=False)
    console.print("[bold green]ok[/]" if report.ok else f"[bold red]{len(report.problems)} problem(s) found[/]")
