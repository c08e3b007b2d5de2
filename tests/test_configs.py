"""Every YAML under configs/ is found recursively and composes into a valid run config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from metarun.config import config_dir, validate

ROOT = config_dir()
GROUP_FILES = sorted(p for p in ROOT.rglob("*.yaml") if p.parent != ROOT)


def _overrides_for(path: Path) -> list[str]:
    group = path.parent.relative_to(ROOT).as_posix()
    if group == "algo_benchmark":  # loads itself when algo and benchmark match its name
        algo, _, bench = path.stem.partition("_")
        return [f"algo={algo}", f"benchmark={bench}"]
    return [f"{group}={path.stem}"]


def command_comment(path: Path) -> str:
    """The first line of the file's leading comment block that is not a `# @package` directive ('' if none)."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return ""
        if not line.removeprefix("#").strip().startswith("@package"):
            return line
    return ""


def test_there_are_configs_in_every_group() -> None:
    groups = {p.parent.name for p in GROUP_FILES}
    assert {"algo", "model", "benchmark", "trainer", "logger", "debug", "experiment"} <= groups


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_file_composes_and_validates(path: Path) -> None:
    assert command_comment(path).startswith("# metarun "), (
        "each config starts with a comment showing the command that uses it (after any `# @package` line), "
        f"e.g. '# metarun train {_overrides_for(path)[0]}'; found: {command_comment(path)!r}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name="train", overrides=_overrides_for(path))
    validate(cfg)

