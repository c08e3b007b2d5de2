"""Decode image files (plain files or zip members) into fixed-size uint8 arrays, optionally with 2 processes.

Torch-free on purpose: `metarun data verify` uses it and should start in a fraction of a second.

Resampling is Pillow's LANCZOS, the filter of the MAML reference preprocessing for both Omniglot
(105 -> 28) and miniImageNet (-> 84), so our numbers are comparable with the published ones. It is
an antialiasing filter when shrinking (its support grows with the scale factor), which a 4x
reduction of thin pen strokes needs; its slight overshoot is clipped to 0..255.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.LANCZOS
RESAMPLE_NAME = "lanczos"
# Small jobs decode in-process: starting workers costs more than it saves below this many images.
MIN_IMAGES_FOR_POOL = 2000
# decode_into: images per work item; small enough for a smooth progress bar, big enough to amortise pickling
STREAM_CHUNK = 256
# Pillow exceptions for a damaged file: truncated data, bad header, bad chunk CRC, decompression bombs.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, zipfile.BadZipFile)


@dataclass(frozen=True)
class ImageRef:
    """One image: a plain file (`archive` empty) or a member of a zip archive."""

    path: str
    archive: str = ""

    def __str__(self) -> str:
        return f"{self.archive}:{self.path}" if self.archive else self.path


@dataclass(frozen=True)
class Preprocess:
    """What decoding produces: `mode` 'L' (1 channel) or 'RGB', a square `size`, ink-as-1 `invert`."""

    size: int
    mode: str = "L"
    invert: bool = False

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def as_dict(self) -> dict[str, object]:
        return {"size": self.size, "mode": self.mode, "invert": self.invert, "resample": RESAMPLE_NAME}


class DecodeError(Exception):
    """A file that cannot be decoded; the message names it (callers turn it into a UserInputError)."""


_open_archives: dict[str, zipfile.ZipFile] = {}  # per process: each worker opens an archive once


def read_bytes(ref: ImageRef) -> bytes:
    if not ref.archive:
        with open(ref.path, "rb") as handle:
            return handle.read()
    archive = _open_archives.get(ref.archive)
    if archive is None:
        archive = _open_archives[ref.archive] = zipfile.ZipFile(ref.archive)
    return archive.read(ref.path)


def to_array(image: Image.Image, prep: Preprocess) -> np.ndarray:
    """A PIL image -> uint8 [C, size, size]; JPEGs are first reduced in the DCT domain to >= 2x the target
    (`draft`), which makes decoding large ImageNet JPEGs several times faster while LANCZOS still does the
    final, antialiased reduction."""
    if image.format == "JPEG":
        image.draft(prep.mode, (2 * prep.size, 2 * prep.size))
    image = image.convert(prep.mode)  # mode '1' (Omniglot's 1-bit PNGs) -> 0/255 grey
    if image.size != (prep.size, prep.size):
        image = image.resize((prep.size, prep.size), RESAMPLE)
    array = np.asarray(image, dtype=np.uint8)
    if prep.invert:
        array = 255 - array
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_one(ref: ImageRef, prep: Preprocess) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(read_bytes(ref))) as image:
            return to_array(image, prep)
    except DECODE_ERRORS as ex:
        reason = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
        raise DecodeError(f"cannot decode image {ref}: {reason}") from None


def _decode_chunk(refs: Sequence[ImageRef], prep: Preprocess) -> np.ndarray | str:
    """Worker body: the chunk's images stacked, or the error message (exceptions cross processes badly)."""
    out = np.empty((len(refs), prep.channels, prep.size, prep.size), dtype=np.uint8)
    try:
        for i, ref in enumerate(refs):
            out[i] = decode_one(ref, prep)
    except DecodeError as ex:
        return str(ex)
    return out


def decode_all(refs: Sequence[ImageRef], prep: Preprocess, workers: int = 2) -> np.ndarray:
    """All images as uint8 [len(refs), C, size, size], in order. Raises DecodeError naming the first bad file.

    Uses a pool of `workers` processes (fork: the workers only run Pillow and numpy) for big jobs.
    """
    out = np.empty((len(refs), prep.channels, prep.size, prep.size), dtype=np.uint8)
    if workers <= 1 or len(refs) < MIN_IMAGES_FOR_POOL:
        result = _decode_chunk(refs, prep)
        if isinstance(result, str):
            raise DecodeError(result)
        return result
    step = max(64, len(refs) // (workers * 16))  # enough chunks to balance, few enough to amortise pickling
    starts = range(0, len(refs), step)
    with _pool(workers) as pool:
        chunks = pool.map(_decode_chunk, [refs[s:s + step] for s in starts], [prep] * len(starts))
        for start, result in zip(starts, chunks):
            if isinstance(result, str):
                raise DecodeError(result)
            out[start:start + len(result)] = result
    return out


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decode_into(out: np.ndarray, refs: Sequence[ImageRef], prep: Preprocess, workers: int = 0,
                progress: Callable[[int], None] | None = None,
                written: Callable[[int, np.ndarray], None] | None = None) -> int:
    """Decode `refs` into `out[i]` in order (`out` may be a np.memmap of a cache file being written, so a store
    larger than memory never exists whole in RAM). `workers` 0: every usable core. `progress(n)` is called
    after each `n` images; `written(start, chunk)` sees every chunk in store order (running checksums and
    statistics). Raises DecodeError naming the first bad file. Unlike decode_all it streams: results are
    consumed as the pool produces them, at most ~2 chunks per worker in flight. Returns the processes used."""
    if out.shape != (len(refs), prep.channels, prep.size, prep.size) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {(len(refs), prep.channels, prep.size, prep.size)}, "
                         f"not {out.dtype} {out.shape}")
    workers = usable_cores() if workers <= 0 else workers
    starts = list(range(0, len(refs), STREAM_CHUNK))

    def take(start: int, result: np.ndarray | str) -> None:
        if isinstance(result, str):
            raise DecodeError(result)
        out[start:start + len(result)] = result
        if written is not None:
            written(start, result)
        if progress is not None:
            progress(len(result))

    if workers <= 1 or len(refs) < MIN_IMAGES_FOR_POOL:
        for start in starts:
            take(start, _decode_chunk(refs[start:start + STREAM_CHUNK], prep))
        return 1
    pool = _pool(workers, parent_handles_interrupt=True)
    try:
        pending: dict[int, object] = {}
        ahead = 2 * workers
        next_submit = 0
        for start in starts:
            while next_submit < len(starts) and len(pending) < ahead:
                s = starts[next_submit]
                pending[s] = pool.submit(_decode_chunk, refs[s:s + STREAM_CHUNK], prep)
                next_submit += 1
            take(start, pending.pop(start).result())  # type: ignore[attr-defined]
    finally:  # an error or Ctrl-C: drop the queued chunks instead of decoding them first
        pool.shutdown(wait=True, cancel_futures=True)
    return workers


def check_all(refs: Sequence[ImageRef], workers: int = 2) -> list[str]:
    """Fully decode every image (no resize); the messages of the ones that fail (for `metarun data verify`)."""
    errors: list[str] = []
    step = 512
    chunks = [refs[s:s + step] for s in range(0, len(refs), step)]
    if workers <= 1 or len(refs) < MIN_IMAGES_FOR_POOL:
        for chunk in chunks:
            errors += _check_chunk(chunk)
        return errors
    with _pool(workers) as pool:
        for result in pool.map(_check_chunk, chunks):
            errors += result
    return errors


def _pool(workers: int, parent_handles_interrupt: bool = False) -> ProcessPoolExecutor:
    """Fork where available: the workers run only Pillow and numpy, and fork starts in milliseconds."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    start = _quiet_worker if parent_handles_interrupt else _forget_archives
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=start)


def _forget_archives() -> None:
    """A forked worker must open its own zip handles: one inherited from the parent shares the file offset
    with it and with the other workers, and concurrent seek+read pairs would interleave."""
    _open_archives.clear()


def _quiet_worker() -> None:
    """decode_into's workers also ignore Ctrl-C: the terminal sends SIGINT to the whole process group, and the
    parent alone stops the pool (cancelling the queued chunks, removing its partial cache) instead of every
    worker dying with its own traceback."""
    _forget_archives()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_chunk(refs: Sequence[ImageRef]) -> list[str]:
    errors = []
    for ref in refs:
        try:
            with Image.open(io.BytesIO(read_bytes(ref))) as image:
                image.load()
        except (*DECODE_ERRORS, KeyError) as ex:
            errors.append(f"{ref}: {str(ex).splitlines()[0] if str(ex) else type(ex).__name__}")
    return errors
