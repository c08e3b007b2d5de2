"""Atomic checkpoints that load under `torch.load(weights_only=True)`: a checkpoint cannot run code.

Everything non-tensor is stored as plain types: the resolved config as a YAML string, RNG states
as uint8 tensors, counters as ints.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from metarun.errors import UserInputError

FORMAT = "metarun-checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a reader (or a crash) never
    sees a half-written file. A full disk is reported as one line and the previous file is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as ex:
        Path(tmp).unlink(missing_ok=True)
        raise UserInputError(f"cannot write checkpoint {path}: {ex.strerror or ex}; free space or set hydra.run.dir") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True; a missing, truncated or foreign file is one line, exit 2."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"checkpoint not found: {path} (expected <run dir>/checkpoints/last.pt or best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as ex:
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise UserInputError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserInputError(f"{path} is not a metarun checkpoint (format {FORMAT})")
    return state


def checkpoint_run_dir(ckpt: str | Path) -> Path:
    """The run directory that wrote a checkpoint: the trainer saves into <run dir>/checkpoints/."""
    return Path(ckpt).parent.parent


def run_overrides(run_dir: Path) -> list[str]:
    """A run's command-line overrides as Hydra recorded them (<run dir>/.hydra/overrides.yaml); [] if absent."""
    file = run_dir / ".hydra" / "overrides.yaml"
    if not file.exists():
        return []
    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(file))]
