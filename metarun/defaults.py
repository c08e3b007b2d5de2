"""Every default value lives in the YAML config tree; Python constructors read theirs from it.

A class's constructor declares its hyperparameters (names and types: what the config checks keys against),
and takes each default value from the option file that configures it, e.g. `MAML(inner_lr=...)` from
configs/algo/maml.yaml. So the Python API (`MAML(backbone, spec)`) and the command line (`metarun train
algo=maml`) cannot disagree, and a value is changed in exactly one place. tests/test_defaults.py checks that
every constructor's defaults are its option file's values and that no option file sets a key its class lacks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from metarun.config import config_dir


@functools.cache
def option_node(group: str, option: str) -> DictConfig:
    """configs/<group>/<option>.yaml as Hydra composes it on its own: its `defaults:` list of options of the
    same group (e.g. anil -> maml) merged first, a `# @package _global_` file's `<group>` section only."""
    path = config_dir() / group / f"{option}.yaml"
    raw = OmegaConf.load(path)
    package_global = path.read_text().lstrip().startswith("# @package _global_")
    merged = OmegaConf.create()
    for entry in raw.get("defaults", []):
        name = entry if isinstance(entry, str) else None
        if name is not None and name != "_self_":
            merged = OmegaConf.merge(merged, option_node(group, name))
    own = raw.get(group, OmegaConf.create()) if package_global else raw
    own = OmegaConf.masked_copy(own, [k for k in own.keys() if k != "defaults"]) if isinstance(own, DictConfig) else own
    return OmegaConf.merge(merged, own)


@functools.cache
def option_defaults(group: str, option: str) -> Mapping[str, Any]:
    """The plain values of an option file's keys (interpolations such as `${oc.env:METARUN_DATA,data}`
    resolved now; lists as tuples, so a default argument is never a shared mutable list)."""
    node = option_node(group, option)
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    return {k: _frozen(v) for k, v in values.items() if not str(k).startswith("_")}


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple, ListConfig)):
        return tuple(_frozen(v) for v in value)
    return value
