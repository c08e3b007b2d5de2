"""Words on the figures and their file names: axis labels with units, short labels that tell a figure's
settings apart (full settings go to captions and figures.json), and deterministic file stems."""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Sequence

from metarun.report import Group, setting_base

_BASE_PARTS = ("algo", "model", "benchmark")
TITLE_WIDTH = 50  # characters of 7 pt text across a column-wide axes


def metric_scale(metric: str) -> float:
    """Accuracy is drawn in percent, as the table prints it; errors and losses as they are."""
    return 100.0 if metric.split("@")[0] == "accuracy" else 1.0


def metric_label(metric: str) -> str:
    """`accuracy` -> `accuracy (%)`, `mse` -> `MSE`: the axis label with its unit."""
    base = metric.split("@")[0]
    return {"accuracy": "accuracy (%)", "mse": "MSE", "loss": "loss"}.get(base, base)


def uses_log_scale(values: Sequence[float], metric: str) -> bool:
    """Errors falling over an order of magnitude (MSE 3 -> 0.1) read better on a log axis."""
    positive = [v for v in values if v > 0]
    return metric.split("@")[0] in ("mse", "loss") and bool(positive) and max(positive) / min(positive) > 10


def short_labels(groups: Sequence[Group]) -> list[str]:
    """What tells the groups apart: the differing parts of algo/model/benchmark/split and the overrides not
    shared by all. One group (or nothing differing): its algo/model/benchmark."""
    described = [_parts(g) for g in groups]
    if len(groups) > 1:
        shared = set.intersection(*(set(d) for d in described))
        labels = [" ".join(_shorten(part[1]) for part in d if part not in shared) for d in described]
        if all(labels) and len(set(labels)) == len(labels):
            return labels
    return ["/".join(str(g.runs[0].results.get(k)) for k in _BASE_PARTS) for g in groups]


def _parts(group: Group) -> list[tuple[str, str]]:
    results = group.runs[0].results
    base = [(k, str(results.get(k))) for k in _BASE_PARTS] + [("split", f"({results.get('split', 'test')})")]
    overrides = group.setting[len(setting_base(results)):].split()
    return base + [("override", o) for o in overrides]


def _shorten(token: str) -> str:
    """`algo.init_from=/runs/a/b/checkpoints/best.pt` -> `algo.init_from=…/checkpoints/best.pt` (labels only)."""
    key, sep, value = token.partition("=")
    if sep and len(value) > 30 and "/" in value:
        return f"{key}=…/{'/'.join(value.rstrip('/').split('/')[-2:])}"
    return token


def wrap(text: str, width: int) -> str:
    """Lines of at most `width` characters, broken between words only (`trainer.meta_batch_size=1` stays whole)."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)) or text


def figure_stem(kind: str, key: str) -> str:
    """`curves-protonet-cnn-omniglot-test-trainer-steps-1000-3f2a9c1e`: readable, short, and unique (the
    hash is of the full key, so settings that share their first 48 characters still differ)."""
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")[:48].rstrip("-") or "figure"
    return f"{kind}-{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
