"""Process-wide settings that decide speed and reproducibility, applied once at start-up.

Measured on the 2-core CPU (see DESIGN.md): denormal floats slowed sine MAML about 3x mid-training,
and glibc returning large freed buffers to the OS on every step made batched Conv-4 MAML 4x slower.
Both are handled here, not left to the user's shell.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from metarun.errors import UserInputError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc malloc to serve big tensors from the heap and keep freed memory for reuse, instead of
    mmapping and page-faulting every large activation afresh each step. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune


def configure_runtime(threads: int | None = None) -> None:
    """Flush denormals (bit-identical results here, 3x faster once weights get tiny), keep freed memory,
    and use `threads` CPU threads when given (None: PyTorch's default)."""
    torch.set_flush_denormal(True)
    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda without CUDA is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device=cuda but this machine has no usable CUDA GPU; use device=cpu or device=auto")
    return torch.device(name)


# Tasks per forward/backward on CPU for image models (trainer.task_chunk=null). scripts/bench.py, second-order
# MAML, strided Conv-4, Omniglot 5-way 1-shot 15 queries, meta-batch 32, 2 threads, against a per-task loop
# (0.74 it/s, 70 MiB): chunks of 1 0.93x (1.0x memory), 2 1.23x (1.85x), 4 1.36x (3.4x), 32 1.37x (21x). The
# Conv-4 is compute-bound on CPU, so 4 takes nearly all of batching's gain at a sixth of its memory. An older
# max-pool measurement agrees: whole batch 0.052 it/s at 6.9 GB, chunks of 4 0.112 it/s, loop 0.095 it/s.
# On GPUs and for vector inputs (sine: 13x faster than the loop batched whole) the whole meta-batch goes at once.
CPU_IMAGE_TASK_CHUNK = 4


def auto_task_chunk(device: torch.device, is_image: bool) -> int | None:
    """The task chunk trainer.task_chunk=null chooses: batch over tasks where it pays, chunk where it does not."""
    return CPU_IMAGE_TASK_CHUNK if device.type == "cpu" and is_image else None
