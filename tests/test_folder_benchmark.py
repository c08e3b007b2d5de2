"""benchmark=folder: every layout on fixtures written in its real on-disk format, ragged classes, memory-mapped
stores (the same episodes as loaded ones), the decode cache and its interrupted runs, and the bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.benchmarks import decode as decode_mod
from metarun.benchmarks import folder as folder_mod
from metarun.benchmarks.folder import FolderBenchmark
from metarun.benchmarks.layouts import detect
from metarun.benchmarks.sampler import EpisodeSampler
from metarun.errors import UserInputError
from tests.conftest import run_metarun
from tests.folder_fixtures import (CLASSES, PER_CLASS, SIZE, class_folders, class_lists, easyfsl_json, libfewshot_csv,
                                   pixels, split_folders)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"image_size": SIZE, "queries": 3, "decode_workers": 1}  # 1 shot + 3 queries <= PER_CLASS


def bench(root: Path, cache: Path, **kwargs: object) -> FolderBenchmark:
    return FolderBenchmark(root=str(root), cache_dir=str(cache), **{**SMALL, **kwargs})  # type: ignore[arg-type]


def one_line(ex: pytest.ExceptionInfo[UserInputError]) -> str:
    message = str(ex.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """The same 16 classes x 8 images in each layout: root and extra options."""
    work = tmp_path_factory.mktemp("layouts")
    return {
        "split-folders": {"root": split_folders(work / "split")},
        "csv": {"root": libfewshot_csv(work / "csv")},
        "json": {"root": easyfsl_json(work / "json")},
        "class-folders": {"root": class_folders(work / "classes"), "splits": str(class_lists(work / "lists"))},
    }


@pytest.mark.parametrize("layout", ["split-folders", "csv", "json", "class-folders"])
def test_each_layout_is_detected_and_said_in_one_line(layout: str, layouts: dict[str, dict[str, object]],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = dict(layouts[layout])
    b = bench(options.pop("root"), tmp_path, **options)  # type: ignore[arg-type]
    found = [line for line in capsys.readouterr().out.splitlines() if "found the" in line]
    assert len(found) == 1 and f"found the {layout} layout" in found[0] and "6/5/5 train/val/test classes" in found[0]
    assert b.sampler.ranges == {"train": (0, 6), "val": (6, 11), "test": (11, 16)}
    assert b.names == [c for s in ("train", "val", "test") for c in CLASSES[s]]
    assert b.spec.input_shape == (3, SIZE, SIZE) and not b.memory_mapped


def test_every_layout_gives_the_same_store_and_episodes(layouts: dict[str, dict[str, object]], tmp_path: Path) -> None:
    stores = []
    for layout, options in layouts.items():
        options = dict(options)
        b = bench(options.pop("root"), tmp_path / layout, **options)  # type: ignore[arg-type]
        stores.append((b.sampler.flat, b.sample("test", 4, torch.Generator().manual_seed(3))))
    first, batch = stores[0]
    expected = torch.from_numpy(pixels(0, 0)).permute(2, 0, 1)  # class 0's first image, no resize at SIZE
    assert torch.equal(first[0], expected)
    for flat, other in stores[1:]:
        assert torch.equal(flat, first)
        assert torch.equal(other.support_x, batch.support_x) and torch.equal(other.query_y, batch.query_y)


def test_random_class_split_is_seeded(tmp_path: Path) -> None:
    classes = {"train": [f"c{i:02d}" for i in range(20)], "val": [], "test": []}
    root = class_folders(tmp_path / "data", classes)
    a = detect(root, fractions=(0.5, 0.25, 0.25), seed=0)
    b = detect(root, fractions=(0.5, 0.25, 0.25), seed=0)
    c = detect(root, fractions=(0.5, 0.25, 0.25), seed=1)
    assert [len(a.classes[s]) for s in ("train", "val", "test")] == [10, 5, 5]
    names = {s: [n for n, _ in a.classes[s]] for s in a.classes}
    assert names == {s: [n for n, _ in b.classes[s]] for s in b.classes}
    assert names != {s: [n for n, _ in c.classes[s]] for s in c.classes}
    assert sorted(sum(names.values(), [])) == classes["train"]  # a partition of the classes
    assert "random class split 0.5/0.25/0.25 (benchmark.split_seed=0)" in a.describe()
    with pytest.raises(UserInputError, match="split_fractions must be three non-negative fractions") as ex:
        detect(root, fractions=(0.5, 0.5, 0.5))
    one_line(ex)


def test_any_pillow_format_and_grey_channels(tmp_path: Path) -> None:
    """JPEG, BMP, GIF, TIFF and PNG files in one tree; channels=1 converts to grey, resizing to image_size."""
    root = tmp_path / "data"
    for split, names in CLASSES.items():
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, suffix in enumerate((".jpg", ".bmp", ".gif", ".tiff", ".png")):
                Image.fromarray(pixels(c, i, size=20)).save(folder / f"{i}{suffix.upper() if i == 4 else suffix}")
            (folder / "notes.txt").write_text("not an image")
    b = bench(root, tmp_path / "cache", channels=1, image_size=10, queries=4)
    assert b.sampler.flat.shape == (16 * 5, 1, 10, 10)
    png = np.array(Image.fromarray(pixels(0, 4, size=20)).convert("L").resize((10, 10), Image.Resampling.LANCZOS))
    assert torch.equal(b.sampler.flat[4, 0], torch.from_numpy(png))


# ragged classes -------------------------------------------------------------------------------------------------

def ragged_store(counts: list[int]) -> torch.Tensor:
    """uint8 [sum(counts), 1, 2, 2]: pixel (0,0) is the class, pixel (0,1) the example index within it."""
    rows = [(c, e) for c, n in enumerate(counts) for e in range(n)]
    store = torch.zeros(len(rows), 1, 2, 2, dtype=torch.uint8)
    store[:, 0, 0, 0] = torch.tensor([c for c, _ in rows], dtype=torch.uint8)
    store[:, 0, 0, 1] = torch.tensor([e for _, e in rows], dtype=torch.uint8)
    return store


def identities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels_ = (x * 255).round().long()
    return pixels_[..., 0, 0, 0], pixels_[..., 0, 0, 1]


def test_ragged_episodes_draw_only_eligible_classes_and_their_own_images() -> None:
    counts = [3, 9, 4, 30, 5, 6, 12, 2, 7, 8]  # train: classes 0-5, test: 6-9
    left: list[tuple[str, int, list[int]]] = []
    sampler = EpisodeSampler(ragged_store(counts), {"train": (0, 6), "test": (6, 10)}, 3, 1, 3, name="fixture",
                             counts=torch.tensor(counts), on_left_out=lambda s, p, c: left.append((s, p, c.tolist())))
    assert left == [("train", 4, [0]), ("test", 4, [7])]  # fewer than K+Q = 4 images: reported once per split
    batch = sampler.sample("train", 300, torch.Generator().manual_seed(0))
    s_class, s_example = identities(batch.support_x)
    q_class, q_example = identities(batch.query_x)
    assert set(s_class.flatten().tolist()) == {1, 2, 3, 4, 5}
    for t in range(300):
        for label in range(3):
            cls = s_class[t][batch.support_y[t] == label]
            mask = batch.query_y[t] == label
            assert (q_class[t][mask] == cls[0]).all()
            examples = torch.cat([s_example[t][batch.support_y[t] == label], q_example[t][mask]])
            assert len(set(examples.tolist())) == 4 and int(examples.max()) < counts[int(cls[0])]
    big = torch.cat([s_example[s_class == 3], q_example[q_class == 3]])
    assert set(big.tolist()) == set(range(30)), "every image of the largest class is reachable"
    sampler.sample("train", 2, torch.Generator(), shots=2, queries=3)  # K+Q=5: class 2 joins the left-out
    assert left[-1] == ("train", 5, [0, 2])
    with pytest.raises(UserInputError, match=r"ways=4 but the test split of fixture has only 3 of its 4 classes with "
                                             r"at least benchmark.shots \+ benchmark.queries = 1 \+ 3 = 4 images") as ex:
        EpisodeSampler(ragged_store(counts), {"train": (0, 6), "test": (6, 10)}, 4, 1, 3, name="fixture",
                       counts=torch.tensor(counts))
    one_line(ex)


def test_equal_counts_take_the_rectangular_path_bit_for_bit() -> None:
    """A flat store with equal counts is the 5-D store: the same episodes from the same seeds."""
    rect = torch.randint(0, 256, (10, 6, 1, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ranges = {"train": (0, 6), "test": (6, 10)}
    a = EpisodeSampler(rect, ranges, 3, 2, 3)
    b = EpisodeSampler(rect.reshape(60, 1, 3, 3), ranges, 3, 2, 3, counts=torch.full((10,), 6))
    assert b.counts is None
    for split in ranges:
        x = a.sample(split, 5, torch.Generator().manual_seed(4), queries=4)
        y = b.sample(split, 5, torch.Generator().manual_seed(4), queries=4)
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)


def test_ragged_folder_warns_once_counting_the_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = {"animal/t1": 2, "animal/t4": 3, "stone/s0": 2, "plant/v2": 30}
    root = split_folders(tmp_path / "data", per_class=sizes)
    b = bench(root, tmp_path / "cache", ways=4)  # 4 of the 6 train classes have K+Q = 4 images
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == ["warning: folder: 3 classes (2 train, 1 test) have fewer than shots + queries = 4 images and "
                        "are left out of these episodes (e.g. 'animal/t1' has 2); benchmark.min_examples=strict makes "
                        "this an error"]
    assert b.sampler.counts is not None and b.sampler.flat.shape[0] == 12 * PER_CLASS + 2 + 3 + 2 + 30
    batch = b.sample("val", 50, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (50, 4, 3, SIZE, SIZE)
    with pytest.raises(UserInputError, match=r"min_examples=strict: 2 classes \(2 train\) have fewer than shots \+ "
                                             r"queries = 4 images \(e.g. 'animal/t1' has 2\)") as ex:
        bench(root, tmp_path / "cache", min_examples="strict")
    one_line(ex)


# memory-mapped stores --------------------------------------------------------------------------------------------

def test_memory_mapped_store_gives_the_same_episodes(tmp_path: Path) -> None:
    root = split_folders(tmp_path / "data", per_class={"animal/t0": 5, "plant/v1": 11})
    loaded = bench(root, tmp_path / "cache", memory_map="never")
    mapped = bench(root, tmp_path / "cache", memory_map="always")
    assert mapped.memory_mapped and not loaded.memory_mapped
    assert isinstance(mapped.sampler.flat.numpy().base, np.memmap) or mapped.sampler.flat.numpy().base is not None
    assert torch.equal(loaded.sampler.flat, mapped.sampler.flat)
    for split in ("train", "val", "test"):
        for seed in range(3):
            a = loaded.sample(split, 6, torch.Generator().manual_seed(seed))
            b = mapped.sample(split, 6, torch.Generator().manual_seed(seed))
            assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
            assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
    mapped.to("meta")  # the mapped store stays on the host; the episodes go to the device
    assert mapped.sampler.flat.device.type == "cpu"
    assert mapped.sample("train", 2, torch.Generator().manual_seed(0)).support_x.device.type == "meta"


def test_auto_maps_only_stores_over_the_ram_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = split_folders(tmp_path / "data")
    monkeypatch.setattr("metarun.benchmarks.store.physical_memory", lambda: 10_000)
    nbytes = 16 * PER_CLASS * 3 * SIZE * SIZE  # 55,296 bytes
    assert bench(root, tmp_path / "cache", ram_share=0.5).memory_mapped  # over 5,000 bytes
    assert not bench(root, tmp_path / "cache", ram_share=nbytes / 10_000).memory_mapped
    with pytest.raises(UserInputError, match="memory_map must be auto, always or never"):
        bench(root, tmp_path / "cache", memory_map="sometimes")


# the cache -------------------------------------------------------------------------------------------------------

def store_paths(root: Path, cache: Path, **kwargs: object) -> tuple[Path, Path]:
    bench(root, cache, **kwargs)
    data = next(cache.glob("folder-*.u8"))
    return data, data.with_suffix(".json")


def test_cache_hit_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = split_folders(tmp_path / "data")
    first = bench(root, tmp_path / "cache")

    def no_decoding(*args: object, **kwargs: object) -> int:
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_mod, "decode_into", no_decoding)
    second = bench(root, tmp_path / "cache")
    assert torch.equal(first.sampler.flat, second.sampler.flat)
    assert "loaded from cache" in capsys.readouterr().out
    (root / "train" / "animal/t0" / "animal_t0_000.png").unlink()  # the data changed: a new store
    monkeypatch.undo()
    assert bench(root, tmp_path / "cache").sampler.counts is not None


def test_interrupted_decode_leaves_nothing_a_later_run_trusts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = split_folders(tmp_path / "data")
    cache = tmp_path / "cache"
    real = folder_mod.decode_into

    def interrupted(out: np.ndarray, refs: list, prep: object, workers: int, progress=None, written=None) -> int:
        out[:10] = 7
        raise KeyboardInterrupt

    monkeypatch.setattr(folder_mod, "decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench(root, cache)
    assert list(cache.iterdir()) == []  # the partial file is gone, no store, no marker
    monkeypatch.setattr(folder_mod, "decode_into", real)
    assert bench(root, cache).sampler.flat[:10].float().mean() != 7


def test_a_killed_decoders_partial_file_is_removed_and_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = split_folders(tmp_path / "data")
    data, marker = store_paths(root, tmp_path / "cache")
    expected = data.read_bytes()
    data.unlink()
    marker.unlink()
    dead = 2 ** 22 + 12345  # above the default pid_max of 4,194,304: no such process
    partial = data.with_name(f"{data.name}.{dead}.partial")
    partial.write_bytes(b"half")
    capsys.readouterr()
    bench(root, tmp_path / "cache")
    out = capsys.readouterr().out
    assert f"an interrupted decode (process {dead}) left {partial.name}; removed it, decoding again" in out
    assert not partial.exists() and data.read_bytes() == expected


def test_a_cache_written_by_an_interrupted_run_is_one_line(tmp_path: Path) -> None:
    root = split_folders(tmp_path / "data")
    data, marker = store_paths(root, tmp_path / "cache")
    content = data.read_bytes()
    marker_text = marker.read_text()
    marker.unlink()  # killed between the rename and the marker
    with pytest.raises(UserInputError, match=r"was written by an interrupted run \(no completeness marker") as ex:
        bench(root, tmp_path / "cache")
    assert f"rm '{data}'" in one_line(ex)
    marker.write_text(marker_text)
    data.write_bytes(content[:1000])  # truncated (an interrupted copy)
    with pytest.raises(UserInputError, match=f"holds 1,000 of the {len(content):,} bytes its marker names") as ex:
        bench(root, tmp_path / "cache", memory_map="always")
    one_line(ex)
    data.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # one flipped bit
    with pytest.raises(UserInputError, match="is damaged") as ex:
        bench(root, tmp_path / "cache")
    one_line(ex)


def test_an_unwritable_cache_folder_is_only_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = split_folders(tmp_path / "data")
    (tmp_path / "file").write_text("not a folder")
    b = bench(root, tmp_path / "file" / "cache")
    assert "warning: cannot write the image cache" in capsys.readouterr().out
    assert torch.equal(b.sampler.flat, bench(root, tmp_path / "cache").sampler.flat)


def test_parallel_decoding_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = split_folders(tmp_path / "data", per_class={"animal/t2": 40})
    monkeypatch.setattr(decode_mod, "MIN_IMAGES_FOR_POOL", 1)
    monkeypatch.setattr(decode_mod, "STREAM_CHUNK", 7)  # many chunks, out of step with the classes
    pool = bench(root, tmp_path / "pool", decode_workers=2).sampler.flat
    serial = bench(root, tmp_path / "serial", decode_workers=1).sampler.flat
    assert torch.equal(pool, serial)


# normalisation ---------------------------------------------------------------------------------------------------

def test_normalisation_from_the_training_split_or_given(tmp_path: Path) -> None:
    root = split_folders(tmp_path / "data")
    plain = bench(root, tmp_path / "cache")
    trained = bench(root, tmp_path / "cache", normalize="train")
    train = plain.sampler.flat[: 6 * PER_CLASS].double() / 255
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3), unbiased=False)
    assert np.allclose(trained.normalization[0], mean.numpy()) and np.allclose(trained.normalization[1], std.numpy())
    a = plain.sample("val", 3, torch.Generator().manual_seed(0))
    b = trained.sample("val", 3, torch.Generator().manual_seed(0))
    assert torch.allclose(b.query_x, (a.query_x - mean.float().view(3, 1, 1)) / std.float().view(3, 1, 1), atol=1e-5)
    given = bench(root, tmp_path / "cache", normalize={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    c = given.sample("val", 3, torch.Generator().manual_seed(0))
    assert torch.allclose(c.support_x, (a.support_x - 0.5) / 0.25)
    with pytest.raises(UserInputError, match="benchmark.normalize must be null, train, or") as ex:
        bench(root, tmp_path / "cache", normalize={"mean": [0.5], "std": [0.2]})
    one_line(ex)


# bad inputs ------------------------------------------------------------------------------------------------------

def test_no_recognisable_layout_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "readme.txt").write_text("x")
    with pytest.raises(UserInputError, match=r"no recognisable image layout under .*data \(it holds readme.txt, "
                                             r"train/\); looked for train/ val/ test/ folders of <class>/<images>; "
                                             r"train.csv val.csv test.csv") as ex:
        bench(tmp_path / "data", tmp_path / "cache")
    assert "train.json val.json test.json (class_names, class_roots)" in one_line(ex)
    with pytest.raises(UserInputError, match="is not a folder"):
        bench(tmp_path / "absent", tmp_path / "cache")


def test_a_split_naming_a_missing_class_is_one_line(tmp_path: Path) -> None:
    root = class_folders(tmp_path / "data")
    lists = class_lists(tmp_path / "lists", {**CLASSES, "val": [*CLASSES["val"], "plant/nowhere"]})
    with pytest.raises(UserInputError, match=r"val.txt names 1 class that is not a folder of images under .*"
                                             r"\(e.g. 'plant/nowhere'\)") as ex:
        bench(root, tmp_path / "cache", splits=str(lists))
    one_line(ex)
    lists = class_lists(tmp_path / "twice", {**CLASSES, "test": [*CLASSES["test"], "animal/t0"]})
    with pytest.raises(UserInputError, match="class 'animal/t0' is listed in both train.txt and test.txt"):
        bench(root, tmp_path / "cache", splits=str(lists))
    csv_root = libfewshot_csv(tmp_path / "csv")
    (csv_root / "images" / "stone_s1_002.png").unlink()
    with pytest.raises(UserInputError, match=r"1 images listed in .*test.csv are missing from .*\(e.g. stone_s1_002.png\)"):
        bench(csv_root, tmp_path / "cache")


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    root = split_folders(tmp_path / "data")
    bad = root / "val" / "plant/v3" / "plant_v3_005.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(UserInputError, match=f"cannot decode image {bad}: .*; replace or delete that file") as ex:
        bench(root, tmp_path / "cache")
    one_line(ex)
    assert not any((tmp_path / "cache").glob("*.u8")) and not any((tmp_path / "cache").glob("*.partial"))


def test_a_split_with_fewer_classes_than_ways_is_one_line(tmp_path: Path) -> None:
    root = split_folders(tmp_path / "data")
    with pytest.raises(UserInputError, match="benchmark.ways=6 but the val split of folder has only 5 classes") as ex:
        bench(root, tmp_path / "cache", ways=6)
    one_line(ex)


def test_cli_trains_on_a_folder_and_refuses_a_bad_root_in_one_line(tmp_path: Path) -> None:
    root = split_folders(tmp_path / "data", per_class={"animal/t0": 2})
    common = [f"benchmark.cache_dir={tmp_path / 'cache'}", "benchmark.image_size=16", "benchmark.queries=2",
              "debug=smoke", "logger.tensorboard=false", "logger.console=false"]
    proc = run_metarun("train", "algo=protonet", "model=cnn", "benchmark=folder", f"benchmark.root={root}", *common,
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").is_file()
    assert "found the split-folders layout" in proc.stdout and "1 class (1 train) has fewer" in proc.stdout
    proc = run_metarun("train", "benchmark=folder", f"benchmark.root={tmp_path / 'cache'}", *common,
                       f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no recognisable image layout" in lines[0], proc.stderr


# the folder copy of Omniglot (scripts/make_omniglot_folder.py) ---------------------------------------------------

def test_omniglot_folder_copy_gives_omniglots_store_and_episodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--mode store writes what benchmark=omniglot holds: the folder benchmark then has the same store, ranges and
    episodes (so the same accuracy); --mode original (rotated 105x105 drawings) differs only in rotated classes."""
    import importlib.util
    import sys

    from metarun.benchmarks import omniglot_source
    from metarun.benchmarks.omniglot import OmniglotBenchmark
    from tests.image_fixtures import omniglot_tree

    source = omniglot_tree(tmp_path / "omniglot", {"Alpha": 3, "Beta": 3}, {"Gamma": 3}, size=30)
    chars = [f"{a}/character{n:02d}" for a in ("Alpha", "Beta", "Gamma") for n in (1, 2, 3)]
    lists = {"train": chars[:5], "val": chars[5:7], "test": chars[7:]}
    lines = {s: [f"{c}/rot{r:03d}" for c in names for r in (0, 90, 180, 270)] for s, names in lists.items()}
    (source / "splits" / "vinyals").mkdir(parents=True)
    for split, rows in lines.items():
        (source / "splits" / "vinyals" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (source / "LICENSE").write_text("MIT")
    monkeypatch.setattr(omniglot_source, "vinyals_lines", lambda split: lines[split])
    omniglot = OmniglotBenchmark(root=str(source), cache_dir=str(tmp_path / "cache"), decode_workers=1)

    spec = importlib.util.spec_from_file_location("make_omniglot_folder",
                                                  Path(__file__).parent.parent / "scripts" / "make_omniglot_folder.py")
    script = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "make_omniglot_folder", script)  # its pool pickles _write by module name
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    folders = {}
    for mode in ("store", "original"):
        monkeypatch.setattr(sys, "argv", ["make", "--source", str(source), "--dest", str(tmp_path / mode), "--mode", mode])
        script.main()
        folders[mode] = bench(tmp_path / mode / "images", tmp_path / "cache", splits=str(tmp_path / mode / "splits"),
                              channels=1, image_size=28, invert=mode == "original", queries=15)
    copy = folders["store"]
    assert copy.sampler.ranges == omniglot.sampler.ranges and torch.equal(copy.sampler.flat, omniglot.sampler.flat)
    for split in ("train", "val", "test"):
        a = omniglot.sample(split, 5, torch.Generator().manual_seed(11))
        b = copy.sample(split, 5, torch.Generator().manual_seed(11))
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    differs = (folders["original"].sampler.flat != omniglot.sampler.flat).view(-1, 20, 28 * 28).any(dim=2).any(dim=1)
    rotation = torch.tensor([int(line[-3:]) for s in ("train", "val", "test") for line in lines[s]])
    assert not differs[(rotation == 0) | (rotation == 180)].any()  # LANCZOS commutes with a half turn, not a quarter
