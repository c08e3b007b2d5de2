"""`metarun data download|verify`: counts and problems found, exit statuses, and downloads from a local
HTTP server (resume with Range, md5 check, extraction) or from nowhere (the one-line offline error)."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from metarun import data_cli
from metarun.benchmarks import omniglot_source
from metarun.benchmarks.download import md5sum
from metarun.benchmarks.verify import verify_miniimagenet, verify_omniglot
from tests.image_fixtures import (BACKGROUND, EVALUATION, MINI_CLASSES, error_line, mini_cache_pickles, mini_csv,
                                  mini_metaoptnet_pickles, omniglot_tree, run_metarun, truncate, zip_set)


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return omniglot_tree(tmp_path_factory.mktemp("omniglot"), BACKGROUND, EVALUATION)


@pytest.fixture(scope="module")
def archives(omniglot: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("zips")
    return {z.name: z.read_bytes() for z in (zip_set(omniglot, s, folder) for s in ("background", "evaluation"))}


class Server:
    """A local HTTP server that honours Range requests (as raw.githubusercontent.com does)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.ranges = files, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                data = owner.files.get(self.path.rsplit("/", 1)[-1])
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    owner.ranges.append(self.headers["Range"])
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/omniglot/python"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server(archives: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setattr(omniglot_source, "ARCHIVE_MD5", {name: _md5(data) for name, data in archives.items()})
    served = Server(dict(archives))
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def _md5(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


def exit_status(*args: str) -> int:
    with pytest.raises(SystemExit) as ex:
        data_cli.main(list(args))
        raise SystemExit(0)
    return int(ex.value.code or 0)


def test_download_resumes_verifies_and_unpacks(server: Server, archives: dict[str, bytes], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "omniglot-py"
    folder.mkdir()
    half = archives["images_background.zip"][: len(archives["images_background.zip"]) // 2]
    (folder / "images_background.zip.part").write_bytes(half)  # an interrupted earlier attempt
    assert exit_status("download", "omniglot", f"root={tmp_path}", f"mirror={server.url}") == 0
    assert server.ranges == [f"bytes={len(half)}-"], "the partial download was resumed, not restarted"
    for name, data in archives.items():
        assert (folder / name).read_bytes() == data and not (folder / f"{name}.part").exists()
    assert len(list((folder / "images_background").rglob("*.png"))) == sum(BACKGROUND.values()) * 20
    assert len(list((folder / "images_evaluation").rglob("*.png"))) == sum(EVALUATION.values()) * 20
    assert "omniglot ready" in capsys.readouterr().out
    report = verify_omniglot(tmp_path, split_scheme="lake", workers=1)
    assert report.ok, report.problems
    assert exit_status("download", "omniglot", f"root={tmp_path}", f"mirror={server.url}") == 0  # idempotent


def test_download_with_wrong_bytes_fails_and_deletes_the_part(server: Server, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    server.files["images_background.zip"] = b"not the archive"
    assert exit_status("download", "omniglot", f"root={tmp_path}", f"mirror={server.url}") == 2
    err = capsys.readouterr().err.strip()
    assert "checksum mismatch for images_background.zip" in err and "\n" not in err
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.zip"))


def test_download_offline_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused, as offline
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = run_metarun("data", "download", "omniglot", f"root={tmp_path}", f"mirror=http://127.0.0.1:{port}",
                       cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "cannot reach http://127.0.0.1" in line and "by hand into" in line
    assert "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip" in line


def test_verify_omniglot_subprocess(omniglot: Path, tmp_path: Path) -> None:
    ok = run_metarun("data", "verify", "omniglot", f"root={omniglot}", "split_scheme=lake", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "background" in ok.stdout and "ok" in ok.stdout.splitlines()[-1]
    data = tmp_path / "data"
    shutil.copytree(omniglot, data)
    bad = truncate(sorted(data.rglob("*.png"))[5], keep=0.5)
    broken = run_metarun("data", "verify", "omniglot", f"root={data}", "split_scheme=lake", cwd=tmp_path)
    assert broken.returncode == 2 and f"corrupt image {bad}" in broken.stdout.replace("\n", "")
    missing = run_metarun("data", "verify", "omniglot", f"root={tmp_path / 'none'}", cwd=tmp_path)
    assert missing.returncode == 2 and "metarun data download omniglot" in error_line(missing)


def test_verify_omniglot_report(omniglot: Path, tmp_path: Path) -> None:
    report = verify_omniglot(omniglot, split_scheme="lake", workers=1)
    rows = {row[0]: row for row in report.rows}
    assert report.ok and rows["background"][2:6] == ["6", "12", "240", "20"] and rows["test"][3] == "16"
    assert any("the published set has 30/964/19280" in w for w in report.warnings)
    vinyals = verify_omniglot(omniglot, workers=1)  # the fixture lacks the characters Vinyals' lists name
    assert not vinyals.ok and "vinyals split names" in vinyals.problems[0]
    data = tmp_path / "data"
    shutil.copytree(omniglot, data)
    zip_set(omniglot, "evaluation", data)  # not the canonical archive: its md5 differs
    report = verify_omniglot(data, split_scheme="lake", workers=1)
    assert not report.ok and "checksum mismatch" in report.problems[0]
    assert {row[0]: row for row in report.rows}["evaluation.zip"][-1] == "md5 WRONG"


@pytest.mark.parametrize("write", [mini_csv, mini_cache_pickles, mini_metaoptnet_pickles])
def test_verify_miniimagenet_formats(write, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = verify_miniimagenet(write(tmp_path), workers=1)
    rows = {row[0]: row for row in report.rows}
    assert report.ok, report.problems
    splits = ("train", "val", "test")
    assert [rows[s][2] for s in splits] == [str(len(MINI_CLASSES[s])) for s in splits]
    assert rows["train"][4] == "20" and any("the published split has 64 x 600" in w for w in report.warnings)


def test_verify_miniimagenet_problems(tmp_path: Path) -> None:
    data = mini_cache_pickles(tmp_path / "pkl")
    truncate(data / "mini-imagenet-cache-test.pkl", keep=0.6)
    proc = run_metarun("data", "verify", "miniimagenet", f"root={data}", cwd=tmp_path)
    assert proc.returncode == 2 and "truncated or not a miniImageNet pickle" in proc.stdout.replace("\n", "")
    csv_data = mini_csv(tmp_path / "csv")
    truncate(sorted((csv_data / "images").iterdir())[0], keep=0.2)
    report = verify_miniimagenet(csv_data, workers=1)
    assert not report.ok and report.problems[0].startswith("corrupt image")


def test_download_miniimagenet_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status("download", "miniimagenet", f"root={tmp_path}") == 2
    captured = capsys.readouterr()
    assert "no official download" in captured.out and "mini-imagenet-cache" in captured.out
    assert "nothing was downloaded" in captured.err
    mini_cache_pickles(tmp_path)
    assert exit_status("download", "miniimagenet", f"root={tmp_path}") == 0
    assert "found cache-pkl format" in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["verify"], "name a dataset"),
    (["verify", "omniglott"], "unknown dataset 'omniglott' (did you mean 'omniglot'?)"),
    (["check", "omniglot"], "unknown data command 'check'"),
    (["verify", "omniglot", "rot=1"], "unknown option 'rot=1'"),
    (["verify", "omniglot", "workers=two"], "workers must be a non-negative integer"),
])
def test_bad_arguments_are_one_line(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(*args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_default_root_follows_metarun_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METARUN_DATA", "/datasets")
    assert data_cli.parse(["verify", "omniglot"])[2]["root"] == "/datasets/omniglot"
    monkeypatch.delenv("METARUN_DATA")
    assert data_cli.parse(["verify", "miniimagenet", "benchmark.root=/x"])[2]["root"] == "/x"
    assert data_cli.parse(["verify", "miniimagenet"])[2]["root"] == "data/miniimagenet"


def test_md5_helper(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert md5sum(tmp_path / "f") == "900150983cd24fb0d6963f7d28e17f72"
