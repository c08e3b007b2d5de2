"""How `metarun eval` composes the config it scores a checkpoint under: as `train` composes one, through Hydra.

The checkpoint's training overrides (recorded in it, else in its run directory's .hydra/overrides.yaml), then
the command line's. What wins over what, key by key:
  1. a key the command line names (benchmark.ways=20), and every key of a group whose option changes
     (benchmark=omniglot, or an experiment= preset that picks another benchmark): the new composition;
  2. any other key the new overrides change (debug=smoke's trainer.eval_tasks): the new composition;
  3. every other key: the checkpoint's saved config, even where today's config files would compose
     something else (a default edited since it was trained).
A checkpoint that records no overrides (saved before they were recorded, away from its run directory) gets
its saved config with plain key=value overrides merged in, and a group override is refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metarun import config as config_mod
from metarun.checkpoint import checkpoint_run_dir, load_checkpoint, run_overrides
from metarun.errors import UserInputError

EVAL_OWN_KEYS = ("ckpt_path", "split", "support", "query", "output")  # eval/predict set these; never composed
_ABSENT = object()


def _parse_overrides(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as ex:
        raise UserInputError(config_mod.describe_composition_error(ex)) from None


def _key_of(override: Any) -> str:
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def override_key(text: str) -> str:
    """`+a.b=1` -> a.b, `~c` -> c, `benchmark=omniglot` -> benchmark (without parsing: any text)."""
    return text.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _choice(value: Any) -> str | None:
    return None if value is None or str(value) == "null" else str(value)


def _recorded_overrides(state: dict[str, Any], ckpt: Path) -> list[str] | None:
    """The overrides the checkpoint was trained with: its own record (state["overrides"]), else its run
    directory's .hydra/overrides.yaml; None when it has neither."""
    if state.get("overrides") is not None:
        recorded = [str(o) for o in state["overrides"]]
    elif (checkpoint_run_dir(ckpt) / ".hydra" / "overrides.yaml").is_file():
        recorded = run_overrides(checkpoint_run_dir(ckpt))
    else:
        return None
    return [o for o in recorded if override_key(o) not in EVAL_OWN_KEYS and not o.lstrip("+~").startswith("hydra")]


def _compose_train(overrides: list[str], extra: list[str] = ()) -> tuple[dict[str, Any], dict[str, str | None]]:
    """`train`'s config composed with these overrides (inside the running Hydra app: its search path, so a
    --config-dir counts), resolved, with the option chosen in each group. Bad input: UserInputError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        else:
            try:
                with initialize_config_dir(config_dir=str(config_mod.config_dir()), version_base="1.3"):
                    cfg = compose(config_name="train", overrides=[*overrides, *extra], return_hydra_config=True)
            finally:
                GlobalHydra.instance().clear()
        choices = {str(k): _choice(v) for k, v in cfg.hydra.runtime.choices.items()}
        with open_dict(cfg):
            del cfg["hydra"]
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except UserInputError:
        raise
    except Exception as ex:  # Hydra composition, a malformed YAML, an interpolation that does not resolve
        raise UserInputError(config_mod.describe_composition_error(ex)) from None
    assert isinstance(resolved, dict)
    return resolved, choices


def _combine_overrides(recorded: list[str], overrides: list[str], regrouped: set[str] = frozenset()) -> list[str]:
    """The recorded training overrides less those the new ones replace, then the new ones (Hydra applies them
    in this order). A new override replaces a recorded one of the same key; a recorded `+key=` (the key exists
    only because training added it) makes a new `key=` a `++key=`; a `~key` comes after the recorded ones, so
    it deletes what they made. Recorded overrides inside a group in `regrouped` (whose option changes) go:
    a sine run's benchmark.amplitude does not apply to benchmark=omniglot."""
    new = _parse_overrides(overrides)
    replaced = {_key_of(o) for o in new if not o.is_delete()}
    deleted = {_key_of(o) for o in new if o.is_delete()}
    added: set[str] = set()
    kept = []
    for override in _parse_overrides(recorded):
        key = _key_of(override)
        if any(key.startswith(group + ".") for group in regrouped):
            continue
        if key in replaced:
            if override.is_add() or override.is_force_add():
                added.add(key)
            continue
        if key in deleted and override.is_delete():
            continue
        kept.append(override.input_line)
    for override in new:
        line = override.input_line
        if _key_of(override) in added and not (override.is_add() or override.is_force_add()):
            line = "++" + line
        kept.append(line)
    return kept


def _regrouped(base_choices: dict[str, str | None], new_choices: dict[str, str | None]) -> set[str]:
    """Config paths of the groups whose option the new overrides change (hydra's own groups aside)."""
    return {group.replace("/", ".") for group, option in new_choices.items()
            if not group.startswith("hydra") and base_choices.get(group) != option}


def _eval_overrides(recorded: list[str], overrides: list[str], base_choices: dict[str, str | None],
                    extra: list[str] = ()) -> tuple[list[str], set[str]]:
    """The overrides eval composes with, and the groups whose option they change. Only group overrides decide
    the options, so when the command line has none, no option changes and nothing needs composing here."""
    parsed = _parse_overrides(overrides)
    if not any(o.key_or_group in base_choices for o in parsed):
        return _combine_overrides(recorded, overrides), set()
    combined = _combine_overrides(recorded, overrides)
    groups_only = [line for line, o in zip(combined, _parse_overrides(combined)) if o.key_or_group in base_choices]
    regrouped = _regrouped(base_choices, _compose_train(groups_only, extra)[1])
    return _combine_overrides(recorded, overrides, regrouped), regrouped


def eval_command_overrides(ckpt: str | Path, overrides: list[str], extra: list[str] = ()) -> list[str]:
    """For the CLI, before Hydra composes eval.yaml: the command line with the checkpoint's training overrides
    in front (those it does not replace), so that eval accepts every override train does (algo.distance=cosine
    on a ProtoNet checkpoint, whose default composition has no such key). The command line unchanged when the
    checkpoint records no overrides, or they no longer compose (evaluate then says why, if it matters).
    `extra`: overrides for composing only (the --config-dir search path)."""
    state = load_checkpoint(ckpt)
    recorded = _recorded_overrides(state, Path(ckpt).expanduser())
    if recorded is None:
        return list(overrides)
    try:
        _, base_choices = _compose_train(recorded, extra)
        combined, _ = _eval_overrides(recorded, overrides, base_choices, extra)
    except UserInputError:
        return list(overrides)
    return combined


def _three_way(saved: Any, base: Any, new: Any, forced: set[str], path: str = "") -> Any:
    """The checkpoint's config (`saved`) with the change the new overrides make (`base` -> `new`) applied:
    a value the overrides leave as it was is the checkpoint's; one they change, add or force is new; a key
    they remove goes; a key only the checkpoint has stays."""
    if path in forced:
        return new
    forced_below = any(not path or f.startswith(path + ".") for f in forced)
    if new == base and saved is not _ABSENT and not forced_below:
        return saved
    if not (isinstance(new, dict) and isinstance(base, dict)):
        return new
    own = saved if isinstance(saved, dict) else {}
    out = {}
    for key in [*new, *(k for k in own if k not in new)]:
        sub = f"{path}.{key}" if path else str(key)
        if key in new:
            out[key] = _three_way(own.get(key, _ABSENT), base[key], new[key], forced, sub) if key in base else new[key]
        elif key not in base:
            out[key] = own[key]
    return out


def eval_config(state: dict[str, Any], ckpt: Path, overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The config to score the checkpoint under, and the option of each group (for results.json)."""
    saved = OmegaConf.create(state["config"])
    recorded = _recorded_overrides(state, ckpt)
    parsed = _parse_overrides(overrides)
    if recorded is not None:
        try:
            base, base_choices = _compose_train(recorded)
        except UserInputError as ex:
            broken = f"its training overrides no longer compose ({ex})"
        else:
            combined, regrouped = _eval_overrides(recorded, overrides, base_choices)
            new, choices = _compose_train(combined)
            forced = regrouped | {o.key_or_group for o in parsed if o.key_or_group not in base_choices}
            merged = _three_way(OmegaConf.to_container(saved), base, new, forced)
            return OmegaConf.create(merged), {g: str(choices.get(g)) for g in ("algo", "model", "benchmark")}
    else:
        broken = ("it records no training overrides (saved before checkpoints kept them, and its run directory "
                  "has no .hydra/overrides.yaml)")
    groups = _group_names()
    refused = [o.input_line for o in parsed if o.key_or_group.split("/")[0] in groups]
    if refused:
        raise UserInputError(f"cannot compose the group override '{refused[0]}' on checkpoint {ckpt}: {broken}; "
                             f"override keys instead (benchmark.ways=20, algo.eval_inner_steps=10)")
    # the checkpoint's saved config with plain key=value overrides
    merged = OmegaConf.merge(saved, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides if "=" in o]))
    return merged, _saved_names(ckpt, merged)


def _group_names() -> set[str]:
    """The config groups Hydra knows (the running app's, with any --config-dir; else the packaged ones)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return set(GlobalHydra.instance().config_loader().list_groups(""))
    return {p.name for p in config_mod.config_dir().iterdir() if p.is_dir() and not p.name.startswith("_")}


def _saved_names(ckpt: Path, cfg: DictConfig) -> dict[str, str]:
    """Group choices of the run that wrote the checkpoint (from its .hydra/hydra.yaml when present)."""
    hydra_file = checkpoint_run_dir(ckpt) / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        choices = OmegaConf.load(hydra_file).hydra.runtime.choices
        return {g: str(choices.get(g)) for g in ("algo", "model", "benchmark")}
    return {g: cfg[g]._target_.rsplit(".", 1)[-1].lower() for g in ("algo", "model", "benchmark")}
