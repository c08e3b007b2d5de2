"""miniImageNet: each of the four on-disk formats (generated, 16 classes x 20 images), detection, the cache,
bad inputs, and an end-to-end smoke run."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from metarun.benchmarks import miniimagenet as mini_mod
from metarun.benchmarks.miniimagenet import MiniImageNetBenchmark
from metarun.benchmarks.miniimagenet_source import detect, pickle_classes
from metarun.errors import UserInputError
from tests.image_fixtures import (MINI_CLASSES, MINI_PER_CLASS, finish, mini_cache_pickles, mini_csv, mini_folders,
                                  mini_metaoptnet_pickles, smoke_runs, truncate)

WRITERS = {"ravi-csv": mini_csv, "folders": mini_folders, "cache-pkl": mini_cache_pickles,
           "metaoptnet": mini_metaoptnet_pickles}


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Starts the session's slow subprocess runs at once, so they overlap with the in-process tests."""
    return smoke_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("miniimagenet")
    return {name: write(base / name) for name, write in WRITERS.items()}


def make(root: Path, cache: Path, **kwargs: object) -> MiniImageNetBenchmark:
    return MiniImageNetBenchmark(root=str(root), cache_dir=str(cache), **kwargs)  # type: ignore[arg-type]


def one_line_error(root: Path, cache: Path, **kwargs: object) -> str:
    with pytest.raises(UserInputError) as ex:
        make(root, cache, **kwargs)
    assert "\n" not in str(ex.value)
    return str(ex.value)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_is_detected_and_counted(fmt: str, roots: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bench = make(roots[fmt], tmp_path, ways=5, shots=1, queries=3, image_size=32)
    found = [line for line in capsys.readouterr().out.splitlines() if line.startswith("miniimagenet:")]
    assert len(found) == 1 and f"found {fmt} format" in found[0] and "6/5/5 train/val/test classes x 20" in found[0]
    assert bench.sampler.ranges == {"train": (0, 6), "val": (6, 11), "test": (11, 16)}
    assert bench.sampler.flat.shape == (16 * MINI_PER_CLASS, 3, 32, 32)
    assert bench.spec.input_shape == (3, 32, 32) and bench.spec.output_size == 5
    batch = bench.sample("test", 3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 5, 3, 32, 32) and batch.query_x.shape == (3, 15, 3, 32, 32)
    assert batch.query_x.dtype == torch.float32
    assert 0.0 <= float(batch.query_x.min()) <= float(batch.query_x.max()) <= 1.0


def test_classes_and_pixels_agree_across_pickle_formats(roots: dict[str, Path], tmp_path: Path) -> None:
    cache_pkl = make(roots["cache-pkl"], tmp_path)
    metaoptnet = make(roots["metaoptnet"], tmp_path)
    assert cache_pkl.sampler.flat.shape == (16 * MINI_PER_CLASS, 3, 84, 84)  # 84x84 pickles kept as they are
    assert torch.equal(cache_pkl.sampler.flat, metaoptnet.sampler.flat)
    train = pickle_classes(detect(roots["cache-pkl"]), "train")
    assert list(train) == MINI_CLASSES["train"]
    first = torch.from_numpy(train[MINI_CLASSES["train"][0]]).permute(0, 3, 1, 2)
    assert torch.equal(cache_pkl.sampler.flat[:MINI_PER_CLASS], first)


def test_metaoptnet_fixture_is_a_python2_pickle(roots: dict[str, Path]) -> None:
    path = roots["metaoptnet"] / "miniImageNet_category_split_val.pickle"
    data = path.read_bytes()
    assert data[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct" in data
    with pytest.raises(UnicodeDecodeError):  # Python 3's default ASCII decoding cannot read Python 2 strings
        pickle.loads(data)
    assert set(pickle.loads(data, encoding="latin1")) == {"data", "labels", "catname2label"}


def test_validation_pickle_may_be_named_val(tmp_path: Path) -> None:
    root = mini_cache_pickles(tmp_path / "data", val_name="val")
    assert detect(root).splits["val"].name == "mini-imagenet-cache-val.pkl"


def test_cache_hit_skips_reading_the_data(roots: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first = make(roots["ravi-csv"], tmp_path, image_size=24)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was read again despite the cache")

    monkeypatch.setattr(mini_mod, "decode_all", fail)
    monkeypatch.setattr(mini_mod, "image_classes", fail)
    second = make(roots["ravi-csv"], tmp_path, image_size=24)
    assert torch.equal(first.sampler.flat, second.sampler.flat)
    assert len(list(tmp_path.glob("miniimagenet-*.pt"))) == 1


def test_not_found_lists_the_formats(tmp_path: Path) -> None:
    message = one_line_error(tmp_path, tmp_path)
    assert "train.csv/val.csv/test.csv" in message and "mini-imagenet-cache" in message
    assert "miniImageNet_category_split" in message and "metarun data download miniimagenet" in message
    (tmp_path / "train.csv").write_text("filename,label\n")
    assert "(found only train.csv)" in one_line_error(tmp_path, tmp_path)
    assert "is not a folder" in one_line_error(tmp_path / "absent", tmp_path)


def test_truncated_pickle_is_one_line(roots: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    mini_metaoptnet_pickles(data)
    bad = truncate(data / "miniImageNet_category_split_test.pickle", keep=0.7)
    message = one_line_error(data, tmp_path / "cache")
    assert f"cannot read {bad}: truncated or not a miniImageNet pickle" in message


def test_missing_and_corrupt_images_are_named(tmp_path: Path) -> None:
    data = mini_csv(tmp_path / "data")
    victim = sorted((data / "images").iterdir())[3]
    truncate(victim, keep=0.3)
    assert f"cannot decode image {victim}" in one_line_error(data, tmp_path / "c1")
    victim.unlink()
    assert f"1 images listed in train.csv are missing from {data / 'images'} (e.g. {victim.name})" in \
        one_line_error(data, tmp_path / "c2")


def test_uneven_classes_and_episode_limits(roots: dict[str, Path], tmp_path: Path) -> None:
    assert "val split of miniimagenet has only 5 classes" in one_line_error(roots["cache-pkl"], tmp_path, ways=6)
    assert "= 21 but miniimagenet has 20 examples per class" in one_line_error(roots["cache-pkl"], tmp_path,
                                                                              shots=5, queries=16)
    data = mini_folders(tmp_path / "uneven")
    next((data / "val" / MINI_CLASSES["val"][2]).iterdir()).unlink()
    assert f"val class {MINI_CLASSES['val'][2]} has 19" in one_line_error(data, tmp_path / "c3")


def test_cli_smoke_run_trains_on_the_fixture(cli_runs: dict[str, object]) -> None:
    proc = finish(cli_runs["miniimagenet"])  # type: ignore[arg-type]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "miniimagenet: found cache-pkl format" in proc.stdout
    assert (cli_runs["mini_dir"] / "results.json").is_file()  # type: ignore[operator]


def test_images_are_class_coloured(roots: dict[str, Path], tmp_path: Path) -> None:
    """Decoded JPEGs keep their class colour (RGB order, no channel swap)."""
    bench = make(roots["folders"], tmp_path, image_size=16)
    means = bench.sampler.flat.view(16, MINI_PER_CLASS, 3, -1).float().mean(dim=(1, 3))
    colours = torch.tensor([[(i * 53) % 256, (i * 97) % 256, (i * 151) % 256] for i in range(16)], dtype=torch.float32)
    assert torch.equal(torch.cdist(means, colours).argmin(dim=1), torch.arange(16))
