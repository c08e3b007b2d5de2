"""benchmark=cifarfs and benchmark=fc100 on CIFAR-100's python version generated in its real format (bytes-keyed
pickles, folder or .tar.gz): the shipped splits, the store against the pickled pixels, episodes, bad data in
one line, and a training run from the command line."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.benchmarks.cifar100 import CifarFSBenchmark, FC100Benchmark
from metarun.errors import UserInputError
from tests.conftest import read_results, run_metarun
from tests.image_fixtures import cifar100_names, cifar100_python


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cifar100_python(tmp_path_factory.mktemp("cifar") / "cifar100")


def shipped(scheme: str, split: str) -> list[str]:
    from metarun.benchmarks.cifar100 import SPLIT_DIR

    return [line for line in (SPLIT_DIR / scheme / f"{split}.txt").read_text().splitlines() if line.strip()]


def test_the_shipped_splits_partition_cifar100(tmp_path: Path) -> None:
    fine, coarse, coarse_of = cifar100_names()
    assert len(fine) == 100 and len(coarse) == 20 and all(list(coarse_of.values()).count(c) == 5 for c in coarse)
    cifarfs = {s: [line.split()[1] for line in shipped("cifarfs", s)] for s in ("train", "val", "test")}
    assert [len(v) for v in cifarfs.values()] == [64, 16, 20] and sorted(sum(cifarfs.values(), [])) == fine
    fc100 = {s: shipped("fc100", s) for s in ("train", "val", "test")}
    assert [len(v) for v in fc100.values()] == [12, 4, 4] and sorted(sum(fc100.values(), [])) == coarse


def test_cifarfs_store_holds_the_pickled_pixels_in_split_order(data: Path, tmp_path: Path) -> None:
    bench = CifarFSBenchmark(root=str(data), cache_dir=str(tmp_path), queries=3)
    store = bench.sampler.flat.view(100, -1, 3, 32, 32)
    assert tuple(store.shape) == (100, 10, 3, 32, 32) and store.dtype == torch.uint8
    assert bench.class_names[:64] == [line.split()[1] for line in shipped("cifarfs", "train")]
    fine, _, _ = cifar100_names()
    parts = [pickle.loads((data / "cifar-100-python" / p).read_bytes(), encoding="bytes") for p in ("train", "test")]
    pixels = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[b"fine_labels"] for p in parts])
    for c in (0, 63, 64, 99):
        want = pixels[labels == fine.index(bench.class_names[c])]
        assert torch.equal(store[c], torch.from_numpy(want))
    batch = bench.sample("test", 3, torch.Generator().manual_seed(0), shots=2, queries=3)
    assert batch.support_x.shape == (3, 10, 3, 32, 32) and 0.0 <= float(batch.support_x.min()) <= float(batch.support_x.max()) <= 1.0
    assert torch.equal(batch.support_y[0], torch.arange(5).repeat_interleave(2))


def test_fc100_splits_by_superclass_and_the_archive_reads_like_the_folder(data: Path, tmp_path: Path) -> None:
    bench = FC100Benchmark(root=str(data), cache_dir=str(tmp_path / "a"), queries=3)
    ranges = bench.sampler.ranges
    assert [ranges[s][1] - ranges[s][0] for s in ("train", "val", "test")] == [60, 20, 20]
    _, _, coarse_of = cifar100_names()
    test_classes = bench.class_names[80:]
    assert {coarse_of[c] for c in test_classes} == set(shipped("fc100", "test"))
    assert not {coarse_of[c] for c in bench.class_names[:60]} & set(shipped("fc100", "test"))
    archive = cifar100_python(tmp_path / "archived", archive=True)
    packed = FC100Benchmark(root=str(archive), cache_dir=str(tmp_path / "b"), queries=3)
    assert packed.class_names == bench.class_names and torch.equal(packed.sampler.flat, bench.sampler.flat)
    small = FC100Benchmark(root=str(data), cache_dir=str(tmp_path / "c"), image_size=16, queries=3)
    assert tuple(small.sampler.flat.shape[-3:]) == (3, 16, 16) and small.spec.input_shape == (3, 16, 16)


def test_bad_cifar_data_is_one_line(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no CIFAR-100 python version there.*metarun data download cifar100"):
        CifarFSBenchmark(root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path))
    broken = cifar100_python(tmp_path / "broken")
    (broken / "cifar-100-python" / "train").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(UserInputError, match="train is not a CIFAR-100 pickle"):
        CifarFSBenchmark(root=str(broken), cache_dir=str(tmp_path / "c1"), queries=3)
    renamed = cifar100_python(tmp_path / "renamed")
    meta = pickle.loads((renamed / "cifar-100-python" / "meta").read_bytes(), encoding="bytes")
    meta[b"fine_label_names"] = [b"not_a_whale" if n == b"whale" else n for n in meta[b"fine_label_names"]]
    (renamed / "cifar-100-python" / "meta").write_bytes(pickle.dumps(meta))
    with pytest.raises(UserInputError, match="names class 'whale', which this CIFAR-100 copy does not have"):
        CifarFSBenchmark(root=str(renamed), cache_dir=str(tmp_path / "c2"), queries=3)
    cut = cifar100_python(tmp_path / "cut", archive=True)
    archive = cut / "cifar-100-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(UserInputError, match="not a complete CIFAR-100 archive"):
        FC100Benchmark(root=str(cut), cache_dir=str(tmp_path / "c3"), queries=3)


def test_protonet_trains_on_cifarfs_from_the_command_line(data: Path, tmp_path: Path) -> None:
    proc = run_metarun("train", "algo=protonet", "model=cnn", "benchmark=cifarfs", f"benchmark.root={data}",
                       "benchmark.queries=2", "debug=smoke", "logger.tensorboard=false", "threads=1",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"METARUN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = read_results(tmp_path / "run")
    assert results["benchmark"] == "cifarfs" and 0.0 <= results["mean"] <= 1.0


def test_download_fetches_and_checks_the_archive_and_verify_reads_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`metarun data download cifar100` from a local mirror (the md5 set to the fixture archive's), then `verify`."""
    import hashlib
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from metarun import data_cli
    from metarun.benchmarks import cifar100

    served = cifar100_python(tmp_path / "host", archive=True)
    blob = (served / "cifar-100-python.tar.gz").read_bytes()
    monkeypatch.setattr(cifar100, "ARCHIVE_MD5", hashlib.md5(blob).hexdigest())

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        root = tmp_path / "data"
        with pytest.raises(SystemExit) as done:
            data_cli.main(["download", "cifar100", f"root={root}", f"mirror=http://127.0.0.1:{httpd.server_address[1]}"])
            raise SystemExit(0)
        assert (done.value.code or 0) == 0 and (root / "cifar-100-python.tar.gz").read_bytes() == blob
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert data_cli.run("verify", "cifar100", {"root": str(root)})
    monkeypatch.setattr(cifar100, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(SystemExit) as failed:
        data_cli.main(["download", "cifar100", f"root={tmp_path / 'offline'}", "mirror=http://127.0.0.1:9"])
    assert failed.value.code == 2
