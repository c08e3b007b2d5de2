"""Where the configs live, and the checks that turn a bad config into one line and exit status 2.

Two layers: a structured schema (dataclasses below) for the sections every run has, and, for
nodes with a `_target_`, a schema derived from the target's own signature, so a hyperparameter
is declared exactly once (in the class) and a misspelt key or wrong type is still caught.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.errors import UserInputError, closest

# Keys that run.py passes at the call site; a config must not set them.
CALL_SITE_KEYWORDS = {"backbone", "spec", "input_shape", "params"}
DEVICES = ("auto", "cpu", "cuda")


def config_dir() -> Path:
    """The config tree: packaged as `metarun.configs` in a wheel, `configs/` beside `metarun/` in a checkout."""
    try:
        packaged = Path(str(resources.files("metarun.configs")))
        if (packaged / "train.yaml").is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "configs"


# The schema says which keys exist and what type each holds; it holds no values. Every default lives in the
# YAML tree (configs/), so a key missing from the composed config is an error here, never a silent default.

@dataclass
class TrainerSettings:
    """The trainer section, typed (configs/trainer/default.yaml holds the values; the trainer reads these)."""

    steps: int
    meta_batch_size: int
    log_every: int
    eval_every: int
    val_tasks: int
    eval_tasks: int
    eval_batch_size: int
    pool_seed: int
    checkpoint_every: int
    grad_clip: Optional[float]  # max gradient norm: global, or each tensor's with grad_clip_per_tensor
    grad_clip_per_tensor: bool
    grad_clip_value: Optional[float]  # clip each gradient entry to [-v, v] first (LEO's code: 0.1)
    task_chunk: Optional[int]  # tasks per forward/backward; None: auto (metarun/runtime.py)
    on_nan: str  # "stop": one-line error naming the step; "skip": drop the batch and count it; "fallback": skip it
    # and step on the algorithm's nan_fallback_loss (LEO: its L2 penalty alone, as the paper's code)


@dataclass
class TrainerSchema(TrainerSettings):
    optimizer: Any  # partial `_target_` nodes: they need the parameters (and the optimizer) at run time
    scheduler: Any


@dataclass
class LoggerSchema:
    tensorboard: bool
    console: bool


@dataclass
class RunSchema:
    seed: int
    device: str
    threads: Optional[int]
    ckpt_path: Optional[str]
    algo: Any
    model: Any
    benchmark: Any
    trainer: TrainerSchema
    logger: LoggerSchema
    # keys only some configs have (None: absent)
    split: Optional[str] = None  # eval only
    support: Optional[str] = None  # predict only: a folder of class folders
    query: Optional[str] = None  # predict only: a folder of files, or one file
    output: Optional[str] = None  # predict only: also write the predictions here (.csv or .json)
    paper: Any = None  # experiment presets: a published figure with its source (only published ones)
    reference: Any = None  # experiment presets: our own measured reference figure (labelled as ours)


# trainer.steps may be 0: score the initial weights on the test pool (algo=baseline's policies train nothing)
NON_NEGATIVE_KEYS = ("trainer.steps",)
POSITIVE_KEYS = (
    "trainer.meta_batch_size", "trainer.log_every", "trainer.eval_every", "trainer.val_tasks",
    "trainer.eval_tasks", "trainer.eval_batch_size", "trainer.checkpoint_every",
    "benchmark.ways", "benchmark.shots", "benchmark.queries",
)


def validate(cfg: DictConfig) -> DictConfig:
    """Check a composed config against the schema; return it typed (e.g. '10' -> 10). Raises UserInputError."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    schema = OmegaConf.structured(RunSchema)
    if "hydra" in plain:
        del plain["hydra"]
    try:
        typed = OmegaConf.merge(schema, plain)
    except OmegaConfBaseException as ex:
        raise UserInputError(describe_omegaconf_error(ex)) from None
    missing = OmegaConf.missing_keys(typed)
    if missing:
        raise UserInputError(f"config value(s) missing: {', '.join(sorted(missing))} (set them on the command line or "
                             f"in the config file that should hold them; `metarun train --cfg job` shows the config)")
    for section in ("algo", "model", "benchmark"):
        if not isinstance(typed[section], DictConfig) or "_target_" not in typed[section]:
            raise UserInputError(f"config group '{section}' is missing: add {section}=<option> (see metarun train --help)")
        typed[section] = _check_target_node(typed[section], section)
    for name in ("optimizer", "scheduler"):
        node = typed.trainer[name]
        if node is not None:
            typed.trainer[name] = _check_target_node(node, f"trainer.{name}")
    if typed.trainer.on_nan not in ("stop", "skip", "fallback"):
        raise UserInputError(f"trainer.on_nan must be 'stop', 'skip' or 'fallback' (got '{typed.trainer.on_nan}')")
    for key in ("grad_clip", "grad_clip_value"):
        value = typed.trainer[key]
        if value is not None and not value > 0:
            raise UserInputError(f"trainer.{key} must be positive or null for no clipping (got {value})")
    if typed.threads is not None and typed.threads < 1:
        raise UserInputError(f"threads must be a positive integer or null (got {typed.threads})")
    if typed.device not in DEVICES:
        raise UserInputError(f"device must be one of {', '.join(DEVICES)} (got '{typed.device}')")
    for key in (*NON_NEGATIVE_KEYS, *POSITIVE_KEYS):
        value, least = OmegaConf.select(typed, key), 0 if key in NON_NEGATIVE_KEYS else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise UserInputError(f"{key} must be a {'non-negative' if least == 0 else 'positive'} integer (got {value})")
    return typed


def schema_keys(parent: str, schema: type = None) -> list[str]:  # type: ignore[assignment]
    """The keys the schema declares under `parent` ("" for the top level, "trainer", "logger")."""
    node: Any = RunSchema if schema is None else schema
    for part in [p for p in parent.split(".") if p]:
        field_types = {f.name: f.type for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        node = typing.get_type_hints(node).get(part) if part in field_types else None
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def describe_omegaconf_error(ex: OmegaConfBaseException) -> str:
    """One line for an OmegaConf key or type error, with the closest valid key when one is near."""
    key = getattr(ex, "full_key", None) or ""
    msg = str(ex).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "struct" in msg:
        parent, _, leaf = key.rpartition(".")
        return f"unknown config key '{key}'{closest(leaf, schema_keys(parent))}"
    if "could not be converted" in msg or "Value '" in msg:
        return f"wrong type for '{key}': {msg}"
    return f"invalid config at '{key}': {msg}" if key else f"invalid config: {msg}"


def _check_target_node(node: DictConfig, path: str) -> DictConfig:
    """Keys of a `_target_` node must be parameters of the target; values must fit their annotations."""
    from hydra.utils import get_object

    try:
        target = get_object(node._target_)
    except Exception:
        raise UserInputError(f"{path}._target_ '{node._target_}' cannot be imported; check the spelling") from None
    init = target.__init__ if inspect.isclass(target) else target
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(init)
    except Exception:
        hints = {}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    names = [n for n in signature.parameters if n not in CALL_SITE_KEYWORDS]
    fields = []
    for key in node.keys():
        if str(key).startswith("_"):
            continue
        if key in CALL_SITE_KEYWORDS:
            raise UserInputError(f"{path}.{key} is set by metarun from the benchmark; remove it from the config")
        if key not in signature.parameters:
            if accepts_any:
                continue
            raise UserInputError(f"unknown config key '{path}.{key}'{closest(str(key), names)}; "
                                 f"{path} accepts: {', '.join(names)}")
        fields.append((str(key), _omegaconf_type(hints.get(str(key), Any))))
    schema = OmegaConf.structured(dataclasses.make_dataclass(f"{path}_schema", fields))
    values = {k: v for k, v in node.items() if not str(k).startswith("_")}
    try:
        typed = OmegaConf.merge(schema, values)
    except OmegaConfBaseException as ex:
        full_key = f"{path}.{getattr(ex, 'full_key', '')}".rstrip(".")
        raise UserInputError(f"wrong type for '{full_key}': {str(ex).splitlines()[0]}") from None
    meta = {k: v for k, v in node.items() if str(k).startswith("_")}
    return OmegaConf.merge(OmegaConf.create(meta), OmegaConf.create(OmegaConf.to_container(typed)))


_PRIMITIVES = (int, float, bool, str)


def _omegaconf_type(annotation: Any) -> Any:
    """The nearest type OmegaConf can check: primitives, Optional primitives and lists of them, else Any."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _PRIMITIVES:
        return annotation
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = _omegaconf_type(rest[0])
            return Optional[inner] if inner is not Any else Any
        return Any
    if origin in (list, Sequence, typing.Sequence) and len(args) == 1 and args[0] in _PRIMITIVES:
        return Optional[list[args[0]]]  # type: ignore[valid-type]
    return Any


_OVERRIDE_RE = re.compile(r"Could not override '([^']+)'")


def describe_composition_error(ex: Exception) -> str:
    """One line for an error Hydra raises while composing (unknown option, unknown key, bad syntax, bad YAML)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(ex)
    if isinstance(ex, MissingConfigException) and getattr(ex, "missing_cfg_file", None):
        group, _, option = str(ex.missing_cfg_file).rpartition("/")
        options = [o for o in (ex.options or []) if o]
        if group and options:
            return (f"unknown {group} '{option}'{closest(option, options)}; "
                    f"choose one of: {', '.join(sorted(options))}")
    match = _OVERRIDE_RE.search(text)
    if match:
        key = match.group(1)
        return f"unknown config key '{key}' (see `metarun train --cfg job` for the keys; prefix with + to add one)"
    if isinstance(ex, OverrideParseException):
        return f"cannot parse command-line override: {text.splitlines()[0]}"
    cause = ex.__cause__
    if cause is not None and "yaml" in type(cause).__module__:
        where = getattr(cause, "problem_mark", None)
        return f"malformed YAML{f' at {where}'.replace(chr(10), ' ') if where else ''}: {str(cause).splitlines()[0]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(word in text for word in ("while parsing", "while scanning", "mapping values are not allowed")):
        return "malformed YAML: " + " ".join(lines[:3]) + " (fix the file or remove it from --config-dir)"
    return "invalid config: " + (" ".join(lines[:2]) if lines else type(ex).__name__)
