"""benchmark=cub: CUB-200-2011's layout generated in its real form (CUB_200_2011/images/<NNN.Name>/*.jpg with
ragged classes, attributes.txt beside the folder, the .tgz), Chen et al.'s shipped split, `metarun data download
cub` from a local mirror and `verify`, and a training run from the command line."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metarun import data_cli
from metarun.benchmarks.layouts import SPLIT_DIR, detect
from tests.conftest import read_results, run_metarun


def cub_names() -> list[str]:
    return sorted(line for s in ("train", "val", "test")
                  for line in (SPLIT_DIR / "cub" / f"{s}.txt").read_text().splitlines() if line.strip())


def cub_archive(root: Path, seed: int = 0) -> Path:
    """root/CUB_200_2011.tgz: CUB_200_2011/images/<class>/<class>_<n>.jpg, 4 to 6 small JPEGs a class (CUB's
    classes are ragged too), and attributes.txt at the top level as in the real archive."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "CUB_200_2011.tgz", "w:gz") as tar:
        def add(name: str, blob: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        add("attributes.txt", b"1 has_bill_shape::curved\n")
        for index, name in enumerate(cub_names()):
            colour = rng.integers(0, 256, size=3)
            for n in range(4 + index % 3):
                pixels = np.clip(colour + rng.integers(-30, 31, size=(12, 12, 3)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG")
                add(f"CUB_200_2011/images/{name}/{name}_{n:04d}.jpg", buffer.getvalue())
    return root / "CUB_200_2011.tgz"


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`metarun data download cub` from a local HTTP mirror of the generated archive (its md5 patched in)."""
    work = tmp_path_factory.mktemp("cub")
    archive = cub_archive(work / "host")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(archive.parent)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    saved = data_cli.CUB_MD5
    data_cli.CUB_MD5 = hashlib.md5(archive.read_bytes()).hexdigest()
    try:
        with pytest.raises(SystemExit) as done:
            data_cli.main(["download", "cub", f"root={work / 'data'}", f"mirror=http://127.0.0.1:{httpd.server_address[1]}"])
            raise SystemExit(0)
        assert (done.value.code or 0) == 0
    finally:
        data_cli.CUB_MD5 = saved
        httpd.shutdown()
        httpd.server_close()
    return work / "data"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_download_unpacks_the_folder_and_the_split_is_chen_et_als(downloaded: Path) -> None:
    images = downloaded / "CUB_200_2011" / "images"
    assert images.is_dir() and not (downloaded / "attributes.txt").exists()  # only the folder is unpacked
    source = detect(images, "class-folders", "cub")
    names = cub_names()
    assert [len(source.classes[s]) for s in ("train", "val", "test")] == [100, 50, 50]
    assert [c for c, _ in source.classes["train"]] == names[0::2]  # Chen et al.: index % 2 == 0
    assert [c for c, _ in source.classes["val"]] == names[1::4] and [c for c, _ in source.classes["test"]] == names[3::4]
    assert data_cli.run("verify", "cub", {"root": str(downloaded)})


def test_protonet_trains_on_cub_from_the_command_line(downloaded: Path, tmp_path: Path) -> None:
    root = downloaded / "CUB_200_2011" / "images"
    proc = run_metarun("train", "algo=protonet", "model=cnn", "benchmark=cub", f"benchmark.root={root}",
                       "benchmark.image_size=16", "benchmark.queries=2", "debug=smoke", "logger.tensorboard=false",
                       "threads=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                       env={"METARUN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the shipped cub class split" in proc.stdout and "100/50/50" in proc.stdout
    assert read_results(tmp_path / "run")["benchmark"] == "cub"


def test_a_cub_folder_missing_a_class_is_one_line(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name in cub_names()[1:]:  # the first class is gone
        (images / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(images / name / "a.jpg")
    proc = run_metarun("data", "verify", "cub", f"root={images}", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "001.Black_footed_Albatross" in lines[0], proc.stderr
