"""Write a folder-layout copy of real Omniglot's Vinyals split, for `benchmark=folder` (never committed: the
destination is a temporary or ignored folder; the data's license travels with it as LICENSE).

Each class of the Vinyals lists (`<Alphabet>/<characterNN>/rot<DDD>`: a character at a rotation) becomes a
class folder `<dest>/images/<Alphabet>/<characterNN>/rot<DDD>/` of its 20 drawings, and the lists themselves
are copied to `<dest>/splits/{train,val,test}.txt`, so the folder benchmark sees the classes in the same
order as `benchmark=omniglot` (class order decides which classes a seeded episode draws):

    python scripts/make_omniglot_folder.py --dest /tmp/omniglot-folder [--mode original|store]
    metarun train benchmark=folder benchmark.root=/tmp/omniglot-folder/images \\
        benchmark.splits=/tmp/omniglot-folder/splits benchmark.channels=1 benchmark.image_size=28 \\
        benchmark.invert=true          # --mode original; with --mode store: benchmark.invert=false

--mode original (default): the 105x105 1-bit PNGs, rotated losslessly (what a user's own copy would be).
    benchmark=omniglot resizes each drawing to 28x28 and then rotates it; a folder copy is rotated first and
    resized after, and Pillow's LANCZOS (horizontal pass, clipped to 0..255, then vertical pass) does not
    commute with a quarter turn: the 90 and 270 degree classes differ by a few grey levels at stroke edges.
--mode store: the 28x28 images exactly as benchmark=omniglot's store holds them (resized, inverted, then
    rotated), as 8-bit PNGs: the folder store is then bit-identical to the omniglot one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from metarun.benchmarks.decode import Preprocess, to_array, usable_cores

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train", "val", "test")
TURNS = {0: None, 90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
STORE = Preprocess(size=28, mode="L", invert=True)  # benchmark=omniglot's defaults


def _write(job: tuple[str, str, int, str]) -> None:
    source, dest, degrees, mode = job
    with Image.open(source) as image:
        if mode == "original":  # a quarter turn of a 1-bit image is exact; PIL turns counter-clockwise like rot90
            turned = image.transpose(TURNS[degrees]) if TURNS[degrees] is not None else image.copy()
            turned.save(dest)
        else:
            array = np.rot90(to_array(image, STORE)[0], degrees // 90)  # as omniglot.arrange: resize, then rotate
            Image.fromarray(np.ascontiguousarray(array), mode="L").save(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--dest", required=True, help="a temporary or git-ignored folder")
    parser.add_argument("--mode", choices=("original", "store"), default="original")
    parser.add_argument("--layout", choices=("class-folders", "split-folders"), default="class-folders",
                        help="split-folders: images/{train,val,test}/... (classes then sorted by name)")
    args = parser.parse_args()
    source, dest = Path(args.source), Path(args.dest)
    sets = [source / "omniglot-py" / f"images_{s}" for s in ("background", "evaluation")]
    jobs = []
    for split in SPLITS:
        text = (source / "splits" / "vinyals" / f"{split}.txt").read_text()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for line in lines:
            character, _, rot = line.rpartition("/")
            folder = next(s / character for s in sets if (s / character).is_dir())
            target = dest / "images" / (split if args.layout == "split-folders" else "") / line
            target.mkdir(parents=True, exist_ok=True)
            for png in sorted(folder.glob("*.png")):
                jobs.append((str(png), str(target / png.name), int(rot.removeprefix("rot")), args.mode))
        (dest / "splits").mkdir(parents=True, exist_ok=True)
        (dest / "splits" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    shutil.copy(source / "LICENSE", dest / "LICENSE")
    with multiprocessing.Pool(usable_cores()) as pool:
        for _ in pool.imap_unordered(_write, jobs, chunksize=256):
            pass
    invert = "true" if args.mode == "original" else "false"
    splits = f" benchmark.splits={dest / 'splits'}" if args.layout == "class-folders" else ""
    print(f"wrote {len(jobs)} images of {sum(1 for _ in (dest / 'splits').glob('*.txt'))} splits to {dest / 'images'}; "
          f"use: benchmark=folder benchmark.root={dest / 'images'}{splits} benchmark.channels=1 "
          f"benchmark.image_size=28 benchmark.invert={invert}")


if __name__ == "__main__":
    main()
