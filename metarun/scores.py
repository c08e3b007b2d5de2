"""`scores.json`: the per-task values behind a run's results.json, with the identity of the task pool.

A mean and its CI cannot say whether one method beats another when the CIs overlap; the per-task values
can, when both methods were scored on the same tasks (`metarun compare`). The pool is identified by
everything that decides which tasks it holds: the benchmark's settings (less where the data lives and how
it is decoded), the split, the pool seed and the number of tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metarun.errors import UserInputError
from metarun.stats import Estimate

SCORES_FILE = "scores.json"
# Benchmark keys that say where the data is and how it is decoded, not which tasks are drawn.
# where the data is read and cached, and what only meta-training episodes see (augment): not the pool
_NOT_POOL = ("root", "cache_dir", "decode_workers", "augment", "memory_map", "ram_share")


def pool_identity(cfg: DictConfig, benchmark: str, split: str, tasks: int) -> dict[str, Any]:
    """What two runs must share for their per-task values to be paired."""
    settings = OmegaConf.to_container(cfg.benchmark, resolve=True)
    assert isinstance(settings, dict)
    return {"benchmark": benchmark, "split": split, "pool_seed": int(cfg.trainer.pool_seed), "tasks": tasks,
            "settings": {k: v for k, v in sorted(settings.items()) if k not in _NOT_POOL}}


def comparable_pool(pool: dict[str, Any]) -> dict[str, Any]:
    """`pool` as it compares: keys of the pool itself left out, and a benchmark setting the run's scores.json
    does not name (written before the option existed) taken at the option's default, so that adding a benchmark
    option never makes older runs look scored on another pool."""
    from metarun.defaults import option_defaults  # the config tree: only when comparing

    settings = {k: v for k, v in pool.get("settings", {}).items() if k not in _NOT_POOL}
    try:
        defaults = option_defaults("benchmark", str(pool.get("benchmark")))
    except FileNotFoundError:  # a benchmark of a user's own config tree
        defaults = {}
    for key, value in defaults.items():
        if key not in settings and key not in _NOT_POOL and not key.startswith("_"):
            settings[key] = list(value) if isinstance(value, tuple) else value
    return {**pool, "settings": dict(sorted(settings.items()))}


def write_scores(path: Path, pool: dict[str, Any], estimates: dict[str, Estimate]) -> None:
    scores = {key: list(e.values) for key, e in estimates.items()}
    path.write_text(json.dumps({"pool": pool, "scores": scores}) + "\n")


def load_scores(path: Path) -> dict[str, Any]:
    """A run directory or a scores.json; a clear error for runs scored before per-task values were kept."""
    file = path / SCORES_FILE if path.is_dir() else path
    if not file.is_file():
        hint = (f"re-score it: metarun eval ckpt_path={path}/checkpoints/best.pt"
                if (path / "checkpoints" / "best.pt").is_file() else "give a run directory of metarun train or eval")
        raise UserInputError(f"{path}: no {SCORES_FILE} (per-task values); {hint}")
    try:
        data = json.loads(file.read_text())
        return {"pool": dict(data["pool"]), "scores": {k: list(map(float, v)) for k, v in data["scores"].items()}}
    except (ValueError, KeyError, TypeError) as ex:
        raise UserInputError(f"{file}: not a metarun {SCORES_FILE} ({type(ex).__name__}: {ex})") from None
