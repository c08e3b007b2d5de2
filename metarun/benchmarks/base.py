"""The benchmark contract and the fixed evaluation pools built on it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.rl.envs import EnvBatch
from metarun.stats import higher_is_better

Kind = Literal["classification", "regression", "reinforcement"]
SPLITS = ("train", "val", "test")

# Pools are drawn in chunks with one generator per chunk, so the tasks of a pool do not depend on
# how many tasks an evaluation processes at once.
POOL_CHUNK = 50


@dataclass(frozen=True)
class TaskSpec:
    """What a benchmark's episodes look like; models and algorithms read it instead of repeating it."""

    name: str
    kind: Kind
    input_shape: tuple[int, ...]
    output_size: int  # ways for classification, target dimension for regression, actions for reinforcement
    ways: int  # supervised episodes' shape; 0 for reinforcement (its data comes from rollouts)
    shots: int
    queries: int
    # reinforcement: a trial is `episodes` episodes of `horizon` steps (metarun/rl/envs.py); 0 otherwise
    horizon: int = 0
    episodes: int = 0
    # reinforcement: actions are `output_size` real numbers (2D navigation) instead of one of `output_size`
    continuous_actions: bool = False

    @property
    def metric(self) -> str:
        return {"classification": "accuracy", "regression": "mse", "reinforcement": "return"}[self.kind]

    @property
    def trial_length(self) -> int:
        """Steps of a reinforcement trial (episodes x horizon)."""
        return self.episodes * self.horizon

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.metric)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


class Benchmark(Protocol):
    """A task distribution with train/val/test splits. Implementations subclass this Protocol explicitly,
    which gives them the default of every optional hook (run.py and the trainer call them directly)."""

    spec: TaskSpec

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> TaskBatch | EnvBatch:
        """`num_tasks` tasks of `split`, drawn only from `generator` (never the global RNG): supervised
        benchmarks give episodes (TaskBatch), reinforcement benchmarks the tasks' environments (EnvBatch, whose
        data the algorithm collects by rollouts). Both are a `Batch` to the trainer.

        `ways`, `shots`, `queries` (None: the spec's) ask for another episode shape than the spec's, e.g. the
        wider meta-training episodes of Prototypical Networks; a benchmark that cannot give a shape raises
        UserInputError naming the key (run.py draws one such episode at start-up, so that is one line)."""
        ...

    def to(self, device: torch.device | str) -> "Benchmark":
        """Move whatever the episodes are built from (an image store) to `device`. Default: nothing to move
        (episodes are drawn on the CPU and the trainer moves them)."""
        return self

    def load_inputs(self, paths: Sequence[Path]) -> torch.Tensor:
        """A user's own example files as this benchmark's model inputs [N, *input_shape], decoded and normalised
        exactly as its own examples are (`metarun predict`): images, or .txt files for text. Default: the benchmark
        reads no files."""
        raise UserInputError(f"benchmark={self.spec.name} does not read example files; metarun predict reads image "
                             f"files for the image benchmarks (omniglot, miniimagenet, folder) and .txt files for text")


def episode_ways(spec: TaskSpec, shape: dict[str, int], training: bool) -> int:
    """The ways of the episodes an algorithm is handed: its meta-training shape overrides `shape` (a
    `train_episode()`) when training, the benchmark's own otherwise. The one rule by which an algorithm knows N
    without reading it back from the labels (which would also cost a device sync)."""
    return int(shape.get("ways", spec.ways)) if training else spec.ways


def pool_seed(base_seed: int, split: str, chunk: int) -> int:
    """A stable 63-bit seed for chunk `chunk` of a split's pool (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{base_seed}/{split}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def task_pool(benchmark: Benchmark, split: str, num_tasks: int, base_seed: int) -> Iterator[TaskBatch | EnvBatch]:
    """The fixed, seeded pool of `num_tasks` tasks of `split`, in chunks of at most POOL_CHUNK.

    Independent of the training stream and of the run's seed, so every run, algorithm and machine
    is scored on the same tasks.
    """
    for chunk, start in enumerate(range(0, num_tasks, POOL_CHUNK)):
        generator = torch.Generator().manual_seed(pool_seed(base_seed, split, chunk))
        yield benchmark.sample(split, min(POOL_CHUNK, num_tasks - start), generator)


def split_ranges(sizes: Mapping[str, Sized]) -> dict[str, tuple[int, int]]:
    """[start, stop) of each split's classes in a store that holds the splits' classes one after another, in
    SPLITS order (`sizes`: each split's classes, or anything whose len() counts them)."""
    ranges, start = {}, 0
    for split in SPLITS:
        ranges[split] = (start, start + len(sizes[split]))
        start = ranges[split][1]
    return ranges


def check_positive(**options: int) -> None:
    """One line for the first option below 1 (`benchmark.<name> must be a positive integer`): every benchmark's
    episode shape and sizes."""
    for name, value in options.items():
        if value < 1:
            raise UserInputError(f"benchmark.{name} must be a positive integer (got {value})")
