"""Each value lives in one layer of the config tree: group defaults (algo/, model/, benchmark/, trainer/) <
tuned pair files (algo_benchmark/) < paper presets (experiment/) < the command line. A pair file or a preset
states only what it changes, never a value the layers beneath already give (a restated value is a second
source that drifts). What each preset composes to is pinned in tests/golden/presets.json, so a change to a
default that moves a published protocol fails here instead of passing unnoticed.

Re-record after a deliberate change: METARUN_RECORD_GOLDEN=1 python -m pytest tests/test_config_layers.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from metarun.config import config_dir

ROOT = config_dir()
PRESETS = sorted(p.stem for p in (ROOT / "experiment").glob("*.yaml"))
PAIRS = sorted(p.stem for p in (ROOT / "algo_benchmark").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden" / "presets.json"
FIGURES = ("paper", "reference")  # what a preset records, not what it computes


def _compose(overrides: list[str]) -> dict[str, Any]:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra", None)
    return values


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _own_values(group: str, option: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The keys a `# @package _global_` file sets (flattened), and the groups its defaults list chooses."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / group / f"{option}.yaml"))
    choices: dict[str, str] = {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                choices[key.replace("override ", "").strip("/")] = value
    for figure in FIGURES:
        raw.pop(figure, None)
    return _flat(raw), choices


def _restated(own: dict[str, Any], beneath: dict[str, Any]) -> list[str]:
    flat = _flat(beneath)
    return [f"{key}: {value!r}" for key, value in own.items() if key in flat and flat[key] == value]


@pytest.mark.parametrize("pair", PAIRS)
def test_a_pair_file_states_only_what_it_changes(pair: str) -> None:
    algo, _, benchmark = pair.partition("_")
    own, _ = _own_values("algo_benchmark", pair)
    beneath = _compose([f"algo={algo}", f"benchmark={benchmark}", "~algo_benchmark"])
    assert not _restated(own, beneath), f"algo_benchmark/{pair}.yaml restates what algo/, model/, trainer/ give"


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_states_only_what_it_changes(preset: str) -> None:
    own, choices = _own_values("experiment", preset)
    beneath = _compose([f"{group}={option}" for group, option in choices.items()])
    assert not _restated(own, beneath), f"experiment/{preset}.yaml restates what its groups and pair file give"


def test_presets_compose_to_their_pinned_protocols() -> None:
    composed = {preset: {k: v for k, v in _compose([f"experiment={preset}"]).items() if k not in FIGURES}
                for preset in PRESETS}
    if os.environ.get("METARUN_RECORD_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(composed, indent=1, sort_keys=True) + "\n")
    pinned = json.loads(GOLDEN.read_text())
    assert sorted(pinned) == PRESETS, "a preset was added or removed: re-record tests/golden/presets.json"
    for preset in PRESETS:
        a, b = _flat(pinned[preset]), _flat(json.loads(json.dumps(composed[preset])))
        moved = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        assert not moved, f"experiment={preset} now composes differently (pinned, now): {moved}"
