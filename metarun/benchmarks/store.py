"""The decoded uint8 image store, cached on disk so that only the first run pays for decoding.

The data root may be read-only (a shared copy), so the cache lives in `benchmark.cache_dir`, else
$METARUN_CACHE, else ~/.cache/metarun. A cache file is named by a hash of the source listing (paths,
sizes, modification times) and the preprocessing settings: changing either builds a new one, and a
stale file can never be read for the wrong data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarun.errors import UserInputError

FORMAT_VERSION = 1  # bump when the layout of a cache file or the decoding changes


def cache_root(cache_dir: str | None) -> Path:
    """benchmark.cache_dir, else $METARUN_CACHE, else ~/.cache/metarun."""
    chosen = cache_dir or os.environ.get("METARUN_CACHE") or "~/.cache/metarun"
    return Path(chosen).expanduser()


def cache_key(kind: str, listing: list[str], settings: dict[str, Any]) -> str:
    payload = json.dumps({"kind": kind, "version": FORMAT_VERSION, "settings": settings, "listing": listing},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_store(
    kind: str,
    listing: list[str],
    settings: dict[str, Any],
    build: Callable[[], tuple[Tensor, dict[str, Any]]],
    cache_dir: str | None,
) -> tuple[Tensor, dict[str, Any], Path, bool]:
    """(images, meta, cache file, hit): load the cached store for this listing and settings, or `build()` it
    and save it. `meta` is a small JSON-able dict stored beside the tensor (class names, split ranges).

    Loading memory-maps the file, so a cache hit costs about the time to read it once.
    """
    path = cache_root(cache_dir) / f"{kind}-{cache_key(kind, listing, settings)}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return saved["images"], json.loads(saved["meta"]), path, True
        except Exception:  # a damaged cache file (disk full, killed writer): rebuild it, it is only a cache
            pass
    images, meta = build()
    _save_atomically({"images": images.contiguous(), "meta": json.dumps(meta)}, path)
    return images, meta, path, False


def _save_atomically(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written cache.
    An unwritable cache directory is not fatal; the run just decodes again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(obj, tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is as readable as the data it came from
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as ex:
        from metarun.console import console

        console.print(f"[yellow]warning: cannot write the image cache {path} ({ex.strerror}); "
                      "set benchmark.cache_dir or METARUN_CACHE to a writable folder")



# Raw stores: for stores that may not fit in memory (benchmark=folder) ------------------------------------------
#
# A raw store is two files in the cache folder: `<kind>-<key>.u8`, the images as uint8 bytes in store order
# (no header, so it can be memory-mapped as it is), and `<kind>-<key>.json`, written last, which holds the
# shape, the byte count and a CRC-32 of the bytes: the completeness marker. Decoding writes into
# `<kind>-<key>.u8.<pid>.partial` (memory-mapped, so not even the decoder holds the whole store in RAM),
# which is renamed into place only once every image is in it. So:
# - a run killed while decoding leaves only a .partial file, which no run reads; the next run removes it
#   (its process is gone) and decodes again, saying so in one line;
# - a .u8 file without its marker, or shorter than its marker says, was written by an interrupted run (or
#   copied incompletely): one line naming the file to delete, exit 2; never trusted;
# - a loaded (not mapped) store is checked against its CRC as it is read.

RAW_FORMAT_VERSION = 1
CRC_BLOCK = 64 << 20  # bytes per CRC update when checking a cache file


@dataclass
class RawStore:
    """The images uint8 [n, C, H, W] (in RAM, or memory-mapped from `path`), with the metadata built beside them."""

    images: Tensor
    meta: dict[str, Any]
    path: Path
    hit: bool
    memory_mapped: bool
    notes: list[str] = field(default_factory=list)  # one-line remarks for the user (a stale partial removed...)


class Checksum:
    """A running CRC-32 over chunks seen in store order (decode_into's `written` hook)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, chunk: np.ndarray) -> None:
        self.value = zlib.crc32(np.ascontiguousarray(chunk).data, self.value)


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def should_map(nbytes: int, memory_map: str, ram_share: float) -> bool:
    """`memory_map`: always | never | auto (map when the store exceeds `ram_share` of physical memory)."""
    if memory_map not in ("auto", "always", "never"):
        raise UserInputError(f"benchmark.memory_map must be auto, always or never (got '{memory_map}')")
    if memory_map != "auto":
        return memory_map == "always"
    if not 0 < ram_share:
        raise UserInputError(f"benchmark.ram_share must be a positive fraction of RAM (got {ram_share})")
    total = physical_memory()
    return total is not None and nbytes > ram_share * total


def raw_store_paths(kind: str, listing: list[str], settings: dict[str, Any],
                    cache_dir: str | None) -> tuple[Path, Path]:
    """(data file, marker file) of the raw store for this listing and settings."""
    stem = f"{kind}-{cache_key(kind, listing, {**settings, 'raw_version': RAW_FORMAT_VERSION})}"
    folder = cache_root(cache_dir)
    return folder / f"{stem}.u8", folder / f"{stem}.json"


def cached_raw_store(
    kind: str,
    listing: list[str],
    settings: dict[str, Any],
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray, Checksum], dict[str, Any]],
    cache_dir: str | None,
    memory_map: str = "auto",
    ram_share: float = 0.5,
) -> RawStore:
    """Load the raw store for this listing and settings, or build it: `fill(out, checksum)` decodes every image
    into `out` (uint8 `shape`, a memory-mapped partial file), feeding each chunk in order to `checksum.update`,
    and returns the metadata to keep (class names, statistics)."""
    data, marker = raw_store_paths(kind, listing, settings, cache_dir)
    nbytes = int(np.prod(shape))
    mapped = should_map(nbytes, memory_map, ram_share)
    notes = _remove_stale_partials(data)
    if data.is_file():
        images, meta = _open_raw(data, marker, shape, mapped)
        return RawStore(images, meta, data, True, mapped, notes)
    if marker.is_file():  # a marker whose data file was deleted: nothing to trust, nothing to keep
        marker.unlink(missing_ok=True)
    partial = data.with_name(f"{data.name}.{os.getpid()}.partial")
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
        out = np.memmap(partial, dtype=np.uint8, mode="w+", shape=shape)
    except OSError as ex:  # an unwritable cache folder: decode into memory, as the .pt caches do
        from metarun.console import console

        console.print(f"[yellow]warning: cannot write the image cache {data} ({ex.strerror}); decoding into memory; "
                      "set benchmark.cache_dir or METARUN_CACHE to a writable folder")
        checksum = Checksum()
        array = np.empty(shape, dtype=np.uint8)
        meta = fill(array, checksum)
        return RawStore(torch.from_numpy(array), meta, data, False, False, notes)
    try:
        checksum = Checksum()
        meta = fill(out, checksum)
        out.flush()  # msync: the bytes are on disk before the marker says they are complete
        del out
        os.chmod(partial, 0o644)
        os.replace(partial, data)
        info = {"version": RAW_FORMAT_VERSION, "kind": kind, "shape": list(shape), "bytes": nbytes,
                "crc32": checksum.value, "meta": meta}
        handle, tmp = tempfile.mkstemp(dir=data.parent, prefix=marker.name, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump(info, stream)
        os.chmod(tmp, 0o644)
        os.replace(tmp, marker)
    finally:
        if partial.exists():  # interrupted or failed (bad image, Ctrl-C): leave nothing a later run could read
            partial.unlink()
    images, meta = _open_raw(data, marker, shape, mapped)
    return RawStore(images, meta, data, False, mapped, notes)


def _open_raw(data: Path, marker: Path, shape: tuple[int, ...], mapped: bool) -> tuple[Tensor, dict[str, Any]]:
    delete = f"delete it (rm '{data}') and run again"
    if not marker.is_file():
        raise UserInputError(f"the image cache {data} was written by an interrupted run (no completeness marker "
                             f"{marker.name} beside it); {delete}")
    try:
        info = json.loads(marker.read_text())
        expected, crc = int(info["bytes"]), int(info["crc32"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserInputError(f"the image cache marker {marker} is unreadable (an interrupted run?); "
                             f"delete it and {data.name} (rm '{marker}' '{data}') and run again") from None
    size = data.stat().st_size
    if size != expected or list(info.get("shape", [])) != list(shape):
        raise UserInputError(f"the image cache {data} was written by an interrupted run: it holds {size:,} of the "
                             f"{expected:,} bytes its marker names; {delete}")
    if mapped:
        # mode 'c' (copy-on-write): a writable array (torch.from_numpy warns on read-only ones) that never writes back
        array = np.memmap(data, dtype=np.uint8, mode="c", shape=shape)
    else:
        array = np.fromfile(data, dtype=np.uint8)
        value = 0
        for start in range(0, array.size, CRC_BLOCK):
            value = zlib.crc32(array[start:start + CRC_BLOCK].data, value)
        if value != crc:
            raise UserInputError(f"the image cache {data} is damaged (its CRC-32 does not match its marker); {delete}")
        array = array.reshape(shape)
    return torch.from_numpy(array), dict(info.get("meta", {}))


def _remove_stale_partials(data: Path) -> list[str]:
    """Partial files of this store left by runs that are gone (killed while decoding); a live run's are kept."""
    notes = []
    for partial in data.parent.glob(f"{data.name}.*.partial") if data.parent.is_dir() else []:
        pid = partial.name[len(data.name) + 1:-len(".partial")]
        if pid.isdigit() and pid != str(os.getpid()) and not _alive(int(pid)):
            try:
                partial.unlink()
                notes.append(f"an interrupted decode (process {pid}) left {partial.name}; removed it, decoding again")
            except OSError:
                pass
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
