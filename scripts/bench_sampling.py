"""Tasks/s of metarun's episode sampler (index arithmetic on a uint8 store) against the per-image pipeline
most meta-learning code uses (torchmeta / learn2learn style: a Dataset that opens one PNG per item, a
task sampler, a DataLoader that collates each task), and against that same per-image pipeline fed
preloaded tensors (which isolates the Python per-item cost from the PIL cost).

Same process, same data (real Omniglot background characters, 964 classes x 20 drawings at 28x28,
no rotations), same episode shapes; rounds are interleaved and medians reported.

Two more tables (benchmark=folder's machinery, issue 20):
- `mmap`: the same sampler on the same store held in memory vs memory-mapped from a raw cache file (as
  benchmark=folder maps a store over benchmark.ram_share of RAM). The file was just written, so its pages are
  in the page cache: this is the cost of the mapping itself, not of a disk read (a cold store larger than RAM
  reads each chosen image's page from disk instead).
- `decode`: images/s decoding real Omniglot PNGs (105x105 -> 28x28 LANCZOS) in one process vs the process pool
  over every core (decode_into, as benchmark=folder decodes).

    python scripts/bench_sampling.py [--root ../shared/data/omniglot] [--rounds 3] [--seconds 1] [--threads N]
                                     [--only pipeline,mmap,decode] [--decode-images 6000]

Process settings are the program's own (metarun.runtime.configure_runtime), applied to every variant.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset, Sampler

from metarun.benchmarks.decode import RESAMPLE, Preprocess, decode_all, decode_into, usable_cores
from metarun.benchmarks.omniglot_source import locate
from metarun.benchmarks.sampler import EpisodeSampler
from metarun.episodes import TaskBatch
from metarun.runtime import configure_runtime

REPO = Path(__file__).resolve().parent.parent
SIZE = 28
CONFIGS = [(5, 1, 15), (20, 5, 15)]  # (ways, shots, queries)
TASKS_PER_BATCH = [32, 1]


class PngImages(Dataset):
    """One item = one PNG decoded, resized and inverted on access, as torchvision-style datasets do."""

    def __init__(self, paths: list[str], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            array = np.asarray(image.convert("L").resize((SIZE, SIZE), RESAMPLE), dtype=np.float32)
        return torch.from_numpy(1.0 - array / 255.0).unsqueeze(0), self.labels[index]


class PreloadedImages(Dataset):
    """The same per-item interface over tensors decoded beforehand (a 'cached' torchmeta/learn2learn dataset)."""

    def __init__(self, images: torch.Tensor, labels: list[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]


class TaskIndices(Sampler[list[int]]):
    """Yields the dataset indices of one N-way (K+Q)-per-class task at a time, class-major, like
    learn2learn's NWays/KShots transforms or torchmeta's ClassSplitter."""

    def __init__(self, by_class: list[list[int]], ways: int, per_class: int, seed: int) -> None:
        self.by_class, self.ways, self.per_class = by_class, ways, per_class
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            classes = self.rng.sample(range(len(self.by_class)), self.ways)
            yield [i for c in classes for i in self.rng.sample(self.by_class[c], self.per_class)]


def per_image_batches(dataset: Dataset, by_class: list[list[int]], ways: int, shots: int, queries: int,
                      tasks: int) -> Callable[[], TaskBatch]:
    """A DataLoader (in-process, as on a 2-core machine) over per-task index lists; each call stacks `tasks`
    tasks, remaps labels to 0..N-1 and splits support from query."""
    tasks_sampler = TaskIndices(by_class, ways, shots + queries, seed=0)
    loader = iter(DataLoader(dataset, batch_sampler=tasks_sampler, num_workers=0))
    per = shots + queries

    def next_batch() -> TaskBatch:
        xs = []
        for _ in range(tasks):
            x, _ = next(loader)  # [N*(K+Q), 1, H, W], class-major
            xs.append(x.view(ways, per, *x.shape[1:]))
        x = torch.stack(xs)  # [T, N, K+Q, ...]
        labels = torch.arange(ways)
        support = x[:, :, :shots].reshape(tasks, ways * shots, *x.shape[3:])
        query = x[:, :, shots:].reshape(tasks, ways * queries, *x.shape[3:])
        return TaskBatch(support, labels.repeat_interleave(shots).repeat(tasks, 1),
                         query, labels.repeat_interleave(queries).repeat(tasks, 1))

    return next_batch


def tasks_per_second(make_batch: Callable[[], TaskBatch], tasks: int, seconds: float) -> float:
    make_batch()  # warm-up
    count, start = 0, time.perf_counter()
    while True:
        make_batch()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * tasks / elapsed


def mmap_table(store: torch.Tensor, characters: int, rounds: int, seconds: float) -> Table:
    """Tasks/s of one sampler over the store in memory and over the same bytes memory-mapped from a file."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "store.u8"
        store.numpy().tofile(path)
        mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=tuple(store.shape)))
        for ways, shots, queries in CONFIGS:
            samplers = {"memory": EpisodeSampler(store, {"train": (0, characters)}, ways, shots, queries),
                        "mapped": EpisodeSampler(mapped, {"train": (0, characters)}, ways, shots, queries,
                                                 keep_store_on_host=True)}
            for tasks in TASKS_PER_BATCH:
                results: dict[str, list[float]] = {name: [] for name in samplers}
                for _ in range(rounds):
                    for name, sampler in samplers.items():
                        generator = torch.Generator().manual_seed(0)
                        results[name].append(tasks_per_second(lambda: sampler.sample("train", tasks, generator),
                                                              tasks, seconds))
                m = {name: statistics.median(v) for name, v in results.items()}
                rows.append((f"{ways}w {shots}s {queries}q", tasks, m))
        del mapped
    table = Table(title="tasks/s, median of interleaved rounds: the same sampler on a store in memory vs memory-mapped "
                        "(page cache warm)")
    for column in ("episode", "T", "memory", "mapped", "mapped/memory"):
        table.add_column(column, justify="right")
    for name, tasks, m in rows:
        table.add_row(name, str(tasks), f"{m['memory']:,.0f}", f"{m['mapped']:,.0f}",
                      f"{m['mapped'] / m['memory']:.2f}x")
    return table


def decode_table(refs: list, images: int, rounds: int) -> Table:
    """Images/s of decode_into with one process and with the pool over every core, interleaved rounds."""
    refs = refs[:images]
    prep = Preprocess(SIZE, "L", invert=True)
    variants = {"1 process": 1, f"pool ({usable_cores()} processes)": 0}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, workers in variants.items():
            out = np.empty((len(refs), 1, SIZE, SIZE), dtype=np.uint8)
            started = time.perf_counter()
            decode_into(out, refs, prep, workers)
            results[name].append(len(refs) / (time.perf_counter() - started))
    table = Table(title=f"decoding {len(refs):,} real Omniglot PNGs (105x105 -> {SIZE}x{SIZE} LANCZOS), images/s, "
                        f"median of {rounds} interleaved rounds")
    for column in ("variant", "images/s", "min-max", "vs 1 process"):
        table.add_column(column, justify="right")
    base = statistics.median(results["1 process"])
    for name, values in results.items():
        table.add_row(name, f"{statistics.median(values):,.0f}", f"{min(values):,.0f}-{max(values):,.0f}",
                      f"{statistics.median(values) / base:.2f}x")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--only", default="pipeline,mmap,decode", help="tables to measure, comma-separated")
    parser.add_argument("--decode-images", type=int, default=6000, help="PNGs decoded per decode measurement")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    console = Console()
    configure_runtime()
    if args.threads:
        torch.set_num_threads(args.threads)

    characters = [c for c in locate(args.root).characters if c.set == "background"]
    refs = [ref for c in characters for ref in c.images]
    paths = [ref.path for ref in refs]
    labels = [i for i, c in enumerate(characters) for _ in c.images]
    by_class = [list(range(i * 20, (i + 1) * 20)) for i in range(len(characters))]
    started = time.perf_counter()
    store = torch.from_numpy(decode_all(refs, Preprocess(SIZE, "L", invert=True), workers=2))
    decode_s = time.perf_counter() - started
    store = store.view(len(characters), 20, 1, SIZE, SIZE)
    preloaded = store.reshape(-1, 1, SIZE, SIZE).float().div(255.0)
    console.print(f"{len(characters)} background characters, {len(refs)} PNGs decoded into the store in "
                  f"{decode_s:.1f} s "
                  f"(2 processes); torch threads: {torch.get_num_threads()}")

    if "decode" in parts:
        console.print(decode_table(refs, args.decode_images, args.rounds))
    if "mmap" in parts:
        console.print(mmap_table(store, len(characters), args.rounds, args.seconds))
    if "pipeline" not in parts:
        return
    rows = []
    for ways, shots, queries in CONFIGS:
        sampler = EpisodeSampler(store, {"train": (0, len(characters))}, ways, shots, queries, name="omniglot")
        for tasks in TASKS_PER_BATCH:
            generator = torch.Generator().manual_seed(0)
            variants = {
                "store": lambda: sampler.sample("train", tasks, generator),
                "preloaded": per_image_batches(PreloadedImages(preloaded, labels), by_class, ways, shots, queries,
                                               tasks),
                "pil": per_image_batches(PngImages(paths, labels), by_class, ways, shots, queries, tasks),
            }
            results: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
                for name, make in variants.items():
                    results[name].append(tasks_per_second(make, tasks, args.seconds))
            medians = {name: statistics.median(values) for name, values in results.items()}
            spread = {name: (max(v) - min(v)) / statistics.median(v) for name, v in results.items()}
            rows.append((f"{ways}w {shots}s {queries}q", tasks, medians, spread))

    table = Table(title="tasks/s, median of interleaved rounds (± max-min spread); store = metarun's sampler, "
                        "per-image = Dataset+DataLoader fed by PIL or by preloaded tensors")
    for column in ("episode", "T", "store", "preloaded", "PIL", "store/PIL", "store/preloaded"):
        table.add_column(column, justify="right")
    for name, tasks, m, spread in rows:
        table.add_row(name, str(tasks),
                      f"{m['store']:,.0f} ±{spread['store']:.0%}",
                      f"{m['preloaded']:,.0f} ±{spread['preloaded']:.0%}",
                      f"{m['pil']:,.1f} ±{spread['pil']:.0%}",
                      f"{m['store'] / m['pil']:,.0f}x", f"{m['store'] / m['preloaded']:,.1f}x")
    console.print(table)


if __name__ == "__main__":
    main()
