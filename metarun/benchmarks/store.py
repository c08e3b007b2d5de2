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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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

