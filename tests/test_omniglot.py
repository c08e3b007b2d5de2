"""Omniglot: layouts, splits, rotations, inversion, the cache, bad inputs and an end-to-end smoke run,
all on a generated tree of 1-bit PNGs (16 characters x 20 drawings), plus a quick check of the real
data when /work/shared has it."""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.benchmarks import decode as decode_mod
from metarun.benchmarks import omniglot as omniglot_mod
from metarun.benchmarks import omniglot_source as source_mod
from metarun.benchmarks.decode import DecodeError, ImageRef, Preprocess, decode_all, decode_one
from metarun.benchmarks.download import md5sum
from metarun.benchmarks.omniglot import OmniglotBenchmark, arrange
from metarun.benchmarks.omniglot_source import Character, locate, make_split
from metarun.errors import UserInputError
from tests.image_fixtures import (BACKGROUND, EVALUATION, PNG_SIZE, error_line, finish, omniglot_tree, smoke_runs,
                                  truncate, zip_set)

REAL_ROOT = Path("/work/shared/data/omniglot")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return omniglot_tree(tmp_path_factory.mktemp("omniglot"), BACKGROUND, EVALUATION)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Starts the session's slow subprocess runs at once, so they overlap with the in-process tests."""
    return smoke_runs(tmp_path_factory)


def bench(root: Path, cache: Path, **kwargs: object) -> OmniglotBenchmark:
    options = {"split_scheme": "lake", **kwargs}
    return OmniglotBenchmark(root=str(root), cache_dir=str(cache), **options)  # type: ignore[arg-type]


def test_fixture_is_the_real_format(root: Path) -> None:
    png = next((root / "omniglot-py" / "images_background").rglob("*.png"))
    with Image.open(png) as image:
        assert image.mode == "1" and image.info.get("bits", 1) == 1
    assert png.read_bytes()[24] == 1  # IHDR bit depth byte


def test_locate_counts(root: Path) -> None:
    source = locate(root)
    assert len(source.characters) == 16 and {len(c.images) for c in source.characters} == {20}
    assert [c.set for c in source.characters].count("evaluation") == 4
    assert len(source.listing) == 16 * 20


def test_lake_split_is_disjoint_by_alphabet(root: Path, tmp_path: Path) -> None:
    chars = locate(root).characters
    split = make_split(chars, "lake", (0, 90, 180, 270), seed=0)
    alphabets = {name: {chars[c].alphabet for c, _ in classes} for name, classes in split.items()}
    assert len(alphabets["val"]) == 1 and alphabets["val"] <= set(BACKGROUND)
    assert not alphabets["train"] & alphabets["val"] and alphabets["test"] == set(EVALUATION)
    assert [len(split[s]) for s in ("train", "val", "test")] == [40, 8, 16]
    assert make_split(chars, "lake", (0,), seed=0)["val"] == [(c, 0) for c, r in split["val"] if r == 0]
    other_seeds = [{c for c, _ in make_split(chars, "lake", (0,), seed=s)["val"]} for s in range(1, 8)]
    assert any(v != {c for c, _ in split["val"]} for v in other_seeds), "split_seed chooses the held-out alphabet"
    b = bench(root, tmp_path)
    assert b.sampler.ranges == {"train": (0, 40), "val": (40, 48), "test": (48, 64)}
    assert b.spec.input_shape == (1, 28, 28) and b.spec.output_size == 5 and b.spec.kind == "classification"


def test_random_split_follows_maml_counts() -> None:
    fake = [Character("background", f"A{i // 20}", f"character{i % 20:02d}", ()) for i in range(1623)]
    split = make_split(fake, "random", (0, 90, 180, 270), seed=0)
    chars = {name: {c for c, _ in classes} for name, classes in split.items()}
    assert [len(chars[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert [len(split[s]) for s in ("train", "val", "test")] == [4400, 400, 1692]
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])
    assert make_split(fake, "random", (0,), seed=0) == make_split(fake, "random", (0,), seed=0)
    assert make_split(fake, "random", (0,), seed=0) != make_split(fake, "random", (0,), seed=1)


def test_shipped_vinyals_lists() -> None:
    folder = resources.files("metarun.benchmarks").joinpath("splits", "vinyals")
    assert "MIT License" in folder.joinpath("LICENSE").read_text()
    lines = {s: source_mod.vinyals_lines(s) for s in ("train", "val", "test")}
    assert [len(lines[s]) for s in ("train", "val", "test")] == [4112, 688, 1692]
    chars = {s: {line.rpartition("/")[0] for line in lines[s]} for s in lines}
    assert [len(chars[s]) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])


def test_vinyals_split_on_fixture(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chars = locate(root).characters
    keys = [c.key for c in chars]
    lists = {"train": keys[:10], "val": keys[10:12], "test": keys[12:]}
    monkeypatch.setattr(source_mod, "vinyals_lines",
                        lambda s: [f"{k}/rot{r:03d}" for k in lists[s] for r in (0, 90, 180, 270)])
    b = OmniglotBenchmark(root=str(root), cache_dir=str(tmp_path), ways=2, rotations=[0, 180])
    assert b.sampler.ranges == {"train": (0, 20), "val": (20, 24), "test": (24, 32)}
    monkeypatch.setattr(source_mod, "vinyals_lines",
                        lambda s: [f"{k}/rot000" for k in [*lists[s], "Missing/character01"]])
    with pytest.raises(UserInputError, match="vinyals split names 1 characters missing"):
        make_split(chars, "vinyals", (0,), 0)


def test_ink_is_one_and_background_zero(root: Path) -> None:
    png = next((root / "omniglot-py" / "images_evaluation").rglob("*.png"))
    with Image.open(png) as image:
        ink = ~np.asarray(image)  # 1-bit: True is white background
    decoded = decode_one(ImageRef(str(png)), Preprocess(size=PNG_SIZE, mode="L", invert=True))
    assert decoded.shape == (1, PNG_SIZE, PNG_SIZE) and decoded.dtype == np.uint8
    assert np.array_equal(decoded[0], np.where(ink, 255, 0))


def test_rotations_are_counter_clockwise_quarter_turns() -> None:
    base = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.uint8).view(2, 3, 1, 4, 4)
    split = {"train": [(0, 0), (1, 90)], "val": [(1, 180)], "test": [(0, 270), (1, 0)]}
    store, ranges = arrange(base, split)
    assert ranges == {"train": (0, 2), "val": (2, 3), "test": (3, 5)}
    pil_rotated = np.asarray(Image.fromarray(base[1, 0, 0].numpy()).rotate(90))  # PIL: counter-clockwise
    assert np.array_equal(store[1, 0, 0].numpy(), pil_rotated)
    assert torch.equal(store[2], torch.rot90(base[1], 2, dims=(-2, -1)))
    assert torch.equal(store[3], torch.rot90(base[0], 3, dims=(-2, -1))) and torch.equal(store[4], base[1])


def test_episodes_seeded_and_labels_remapped(root: Path, tmp_path: Path) -> None:
    b = bench(root, tmp_path, ways=4, shots=2, queries=3)
    first = b.sample("train", 5, torch.Generator().manual_seed(0))
    again = b.sample("train", 5, torch.Generator().manual_seed(0))
    assert torch.equal(first.support_x, again.support_x) and torch.equal(first.query_y, again.query_y)
    assert first.support_x.shape == (5, 8, 1, 28, 28) and first.query_x.shape == (5, 12, 1, 28, 28)
    assert sorted(first.query_y[0].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert 0.0 <= float(first.support_x.min()) and float(first.support_x.max()) <= 1.0
    assert float(first.support_x.mean()) < 0.5  # mostly background, which is 0 after inversion


def test_cache_hit_and_invalidation(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(root, data)
    first = bench(data, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 1

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(omniglot_mod, "decode_all", no_decoding)
    second = bench(data, tmp_path / "cache")
    assert torch.equal(first.sampler.flat, second.sampler.flat)
    png = next(data.rglob("*.png"))
    os.utime(png, ns=(1, 1))  # the listing changed: a new cache entry
    monkeypatch.undo()
    bench(data, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 2


def test_cache_dir_from_environment(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "env_cache"))
    OmniglotBenchmark(root=str(root), split_scheme="lake")
    assert list((tmp_path / "env_cache").glob("omniglot-*.pt"))


def test_zip_layout_reads_the_same_images(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zipped = tmp_path / "zipped"
    archives = [zip_set(root, s, zipped / "omniglot-py") for s in ("background", "evaluation")]
    with pytest.raises(UserInputError, match=r"checksum mismatch for .*images_\w+\.zip: md5 \w+, expected") as ex:
        bench(zipped, tmp_path / "cache")  # our zips are not the canonical archives
    assert "\n" not in str(ex.value)
    monkeypatch.setattr(source_mod, "ARCHIVE_MD5", {a.name: md5sum(a) for a in archives})
    from_zip = bench(zipped, tmp_path / "cache")
    from_folders = bench(root, tmp_path / "cache")
    assert torch.equal(from_zip.sampler.flat, from_folders.sampler.flat)
    truncate(archives[1], keep=0.5)
    message = one_line_error(root=str(zipped), cache_dir=str(tmp_path), split_scheme="lake")
    assert f"cannot read {archives[1]}" in message


def test_parallel_decoding_matches_serial(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2-process path (used for the real 32,460 images) on the fixture, from zip members and from files."""
    zipped = tmp_path / "zipped"
    for set_name in ("background", "evaluation"):
        zip_set(root, set_name, zipped)
    refs = [ref for c in locate(zipped).characters for ref in c.images]
    prep = Preprocess(size=28, mode="L", invert=True)
    serial = decode_all(refs, prep, workers=1)
    decode_all(refs[:3], prep, workers=1)  # the parent now holds open zip handles, which workers must not share
    monkeypatch.setattr(decode_mod, "MIN_IMAGES_FOR_POOL", 1)
    assert np.array_equal(decode_all(refs, prep, workers=2), serial)
    files = [ref for c in locate(root).characters for ref in c.images]
    assert np.array_equal(decode_all(files, prep, workers=2), serial)
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(files[0].path).read_bytes()[:60])
    with pytest.raises(DecodeError, match="cannot decode image .*broken.png"):
        decode_all([*files[:40], ImageRef(str(broken))], prep, workers=2)


def test_unwritable_cache_is_only_a_warning(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bench(root, blocker / "cache")
    assert "warning: cannot write the image cache" in capsys.readouterr().out


def one_line_error(**kwargs: object) -> str:
    with pytest.raises(UserInputError) as ex:
        OmniglotBenchmark(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(ex.value)
    return str(ex.value)


def test_bad_inputs_are_one_line(root: Path, tmp_path: Path) -> None:
    cache = str(tmp_path)
    assert "metarun data download omniglot root=" in one_line_error(root=str(tmp_path / "none"), cache_dir=cache)
    assert "benchmark.ways=9 but the val split" in one_line_error(root=str(root), cache_dir=cache,
                                                                   split_scheme="lake", ways=9)
    assert "= 21 but omniglot (lake split) has 20 examples per class" in one_line_error(
        root=str(root), cache_dir=cache, split_scheme="lake", shots=6, queries=15)
    assert "benchmark.split_scheme must be one of" in one_line_error(root=str(root), cache_dir=cache, split_scheme="x")
    assert "benchmark.rotations" in one_line_error(root=str(root), cache_dir=cache, split_scheme="lake", rotations=[45])


def test_corrupt_image_is_named(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(root, data)
    bad = truncate(sorted(data.rglob("*.png"))[7], keep=0.4)
    message = one_line_error(root=str(data), cache_dir=str(tmp_path / "cache"), split_scheme="lake")
    assert f"cannot decode image {bad}" in message


def test_cli_smoke_run_trains_on_the_fixture(cli_runs: dict[str, object]) -> None:
    proc = finish(cli_runs["omniglot"])  # type: ignore[arg-type]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "omniglot:" in proc.stdout and "lake split 40/8/16" in proc.stdout
    assert (cli_runs["omniglot_dir"] / "results.json").is_file()  # type: ignore[operator]


def test_cli_missing_root_exits_2_with_one_line(cli_runs: dict[str, object]) -> None:
    proc = finish(cli_runs["missing_root"])  # type: ignore[arg-type]
    assert proc.returncode == 2
    line = error_line(proc)
    assert "Omniglot data not found" in line and "metarun data download omniglot root=" in line


@pytest.mark.skipif(not (REAL_ROOT / "omniglot-py").is_dir(), reason="real Omniglot copy not on this machine")
def test_real_data_layout_and_vinyals_split() -> None:
    """Listing and splitting only (no decoding), so it stays quick."""
    source = locate(REAL_ROOT)
    assert len(source.characters) == 1623 and sum(len(c.images) for c in source.characters) == 32460
    split = make_split(source.characters, "vinyals", (0, 90, 180, 270), 0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [4112, 688, 1692]
