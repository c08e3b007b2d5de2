"""`metarun train|eval ...`: dispatch only. Hydra parses the overrides; we pre-check them so that a bad
one is a single line and exit status 2 instead of Hydra's multi-line report and exit 1."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from metarun.errors import UserInputError, closest

USAGE = """\
usage: metarun <command> [overrides...]

commands:
  train   train a meta-learner: metarun train algo=maml model=mlp benchmark=sine [key=value ...]
          sweeps: metarun train -m seed=0,1,2 algo=maml,fomaml
  eval    score a checkpoint on the fixed test pool: metarun eval ckpt_path=<run>/checkpoints/best.pt
  predict label your own files: metarun predict ckpt_path=<run>/checkpoints/best.pt support=<dir of class dirs>
          query=<dir or file> [output=predictions.csv]
  report  tabulate results over seeds: metarun report outputs/ multirun/ [--paper] [--format md|csv|json|html -o FILE]
          figures: [--plot DIR] [--x step|time] (pip install ".[plot]")
  compare runs task by task on the same pool, difference with a 95% CI: metarun compare BASELINE_RUN RUN... [--plot DIR]
  check   CI regression guard: metarun check results.json --baseline baseline.json [--update]
  data    get and check datasets: metarun data download omniglot root=PATH; metarun data verify omniglot root=PATH
          (metarun data --help for more)

`metarun train --help` lists the config groups and their options; `metarun train --cfg job` prints the
composed config. Exit status: 0 success, 2 bad input (config or data), 1 internal error
(HYDRA_FULL_ERROR=1 shows full traces), 130/143 interrupted (last.pt saved)."""

COMMANDS = ("train", "eval", "predict", "report", "compare", "check", "data")
HYDRA_COMMANDS = ("train", "eval", "predict")  # composed by Hydra; the others are plain argument parsers
_HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from metarun import __version__

        print(f"metarun {__version__}")
        return
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'{closest(command, COMMANDS)}; commands: {', '.join(COMMANDS)}")
    if command in HYDRA_COMMANDS:
        _run_hydra(command, args)
        return
    # plain commands: no config to compose
    from importlib import import_module

    module = import_module({"report": "metarun.report", "compare": "metarun.compare", "check": "metarun.check",
                           "data": "metarun.data_cli"}[command])
    try:
        module.main(args)
    except UserInputError as ex:
        if _full_errors():
            raise
        _fail(str(ex))


def _fail(message: str) -> None:
    from metarun.console import print_error

    print_error(message)
    sys.exit(2)


def _full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _run_hydra(command: str, args: list[str]) -> None:
    import hydra

    from metarun.config import config_dir

    overrides = _overrides_only(args)
    user_dirs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config-dir", "-cd")]
    multirun = "-m" in args or "--multirun" in args
    if not _HYDRA_INFO_FLAGS.intersection(args):
        try:
            if command in ("eval", "predict"):
                args, overrides = _with_training_overrides(args, overrides, user_dirs)
            precheck(command, overrides, multirun, user_dirs)
        except UserInputError as ex:
            if _full_errors():
                raise
            _fail(str(ex))
    if command == "train":
        args = args + _resume_dir_override(overrides) + _torchrun_dir_override(overrides)
    config_name = command  # configs/train.yaml, eval.yaml, predict.yaml
    task = _guarded({"train": _train_task, "eval": _eval_task, "predict": _predict_task}[command])
    sys.argv = [f"metarun {command}", *args]
    hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(task)()


# Hydra flags that take a value: the value is not an override.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}


def _overrides_only(args: list[str]) -> list[str]:
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _with_training_overrides(args: list[str], overrides: list[str],
                             user_dirs: list[str]) -> tuple[list[str], list[str]]:
    """`metarun eval ckpt_path=X ...`: X's training overrides go in front of the command line's (less those it
    replaces), so Hydra composes eval.yaml the way train composed X's config, and eval accepts every override
    train would (algo.distance=cosine on a ProtoNet checkpoint; benchmark=omniglot; debug=smoke). Unchanged
    for several checkpoints (a sweep: each job's evaluate composes its own) or a missing one (precheck says)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return args, overrides  # precheck reports it
    ckpts = [o for o in parsed if o.key_or_group == "ckpt_path"]
    if len(ckpts) != 1 or ckpts[0].is_sweep_override() or ckpts[0].is_delete():
        return args, overrides
    path = Path(ckpts[0].get_value_element_as_str()).expanduser()
    if not path.is_file():
        return args, overrides
    from metarun.eval_config import eval_command_overrides

    combined = eval_command_overrides(path, overrides, _search_path(user_dirs))
    return _flags_only(args) + combined, combined


def _flags_only(args: list[str]) -> list[str]:
    """What _overrides_only leaves out: the flags and their values."""
    flags, take = [], False
    for arg in args:
        if take or arg.startswith("-"):
            flags.append(arg)
            take = not take and arg in _VALUE_FLAGS
    return flags


def _search_path(user_dirs: list[str]) -> list[str]:
    """--config-dir: the user's own config files join the search path, as Hydra will do."""
    if not user_dirs:
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{Path(d).expanduser().absolute()}" for d in user_dirs) + "]"]


def precheck(command: str, overrides: list[str], multirun: bool, user_dirs: list[str] = ()) -> None:
    """Compose once with the given overrides (first value of each sweep) and validate; raise UserInputError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from metarun.config import config_dir, describe_composition_error, validate

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as ex:
        raise UserInputError(describe_composition_error(ex)) from None
    single: list[str] = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            if not multirun:
                raise UserInputError(f"'{text}' is a sweep: add -m (metarun {command} -m ...) to run one job per value")
            if not override.is_discrete_sweep():
                continue  # a search space (interval): checked when the sweeper samples it
            text = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        if override.key_or_group.startswith("hydra"):
            continue
        single.append(text)
    single += _search_path(user_dirs)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name=command, overrides=single)
    except Exception as ex:  # Hydra composition, a user's malformed YAML, omegaconf errors
        raise UserInputError(_with_suggestion(describe_composition_error(ex), command, single)) from None
    finally:
        GlobalHydra.instance().clear()
    _check_output_dir(overrides, multirun, command)
    if command == "train":
        validate(cfg)
    elif not cfg.get("ckpt_path"):
        raise UserInputError(f"metarun {command} needs ckpt_path=<run dir>/checkpoints/best.pt")
    elif not Path(str(cfg.ckpt_path)).expanduser().is_file():
        raise UserInputError(f"checkpoint not found: {cfg.ckpt_path} (expected <run dir>/checkpoints/best.pt)")


def _check_output_dir(overrides: list[str], multirun: bool, command: str) -> None:
    """Hydra creates the run (or sweep) directory before any of our code runs, so a directory that cannot be
    made would be its traceback: create it here (then remove what was created) and write a file in it.
    Permission bits alone prove nothing (root passes them; /proc, /sys, a name too long still refuse)."""
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    chosen = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(key)), None)
    target = _static_dir(chosen) if chosen else Path("multirun" if multirun else f"outputs/{command}")
    target = Path(os.path.abspath(target.expanduser()))
    try:
        _try_create(target)
    except OSError as ex:
        failed = Path(ex.filename) if isinstance(ex.filename, str) else target
        if ex.errno == errno.ENOTDIR:
            blocker = next((p for p in failed.parents if os.path.lexists(p) and not os.path.isdir(p)), failed)
            reason = f"{_short(blocker)} is not a directory"
        elif ex.errno == errno.ENOENT and os.path.isdir(failed.parent):
            reason = f"{_short(failed.parent)} refuses new entries"
        elif ex.errno == errno.ENAMETOOLONG:
            reason = "a name in it is too long"
        else:
            reason = f"{_short(failed)}: {ex.strerror or ex}"
        raise UserInputError(f"cannot write the output directory {_short(target)} ({reason}); "
                             f"choose another with {key}PATH or run from a writable directory") from None


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 120 else text[:60] + "..." + text[-40:]


def _static_dir(chosen: str) -> Path:
    """The directory Hydra will make from `hydra.run.dir=...`: ${now:FMT} as Hydra resolves it (strftime now);
    for any other interpolation, the part of the path before it."""
    import re
    from datetime import datetime

    text = re.sub(r"\$\{now:([^}]*)\}", lambda m: datetime.now().strftime(m.group(1)), chosen)
    if "${" in text:
        text = text[:text.index("${")].rpartition("/")[0] or ("/" if chosen.startswith("/") else ".")
    return Path(text)


def _try_create(target: Path) -> None:
    """Make `target` as Hydra would (with its parents), create and delete a file in it, then remove the
    directories this made. Raises the OSError that Hydra would have hit."""
    import tempfile

    made: list[Path] = []
    path = target
    while True:
        try:
            os.stat(path)
            break
        except FileNotFoundError:
            made.append(path)
        except OSError as ex:
            if ex.errno != errno.ENAMETOOLONG:
                raise
            made.append(path)
        if path == path.parent:
            break
        path = path.parent
    try:
        os.makedirs(target, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".metarun-write-test-", dir=target)
        os.close(fd)
        os.unlink(probe)
    finally:
        for path in made:  # deepest first; another process may be using one by now: leave it then
            try:
                os.rmdir(path)
            except OSError:
                break


def _with_suggestion(message: str, command: str, overrides: list[str]) -> str:
    """For an unknown key, compose without it and name the closest existing key."""
    import re

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import DictConfig, OmegaConf

    from metarun.config import config_dir

    match = re.match(r"unknown config key '([^']+)'", message)
    if not match:
        return message
    key = match.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train" if command == "train" else "eval", overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        options = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:
        return message
    finally:
        GlobalHydra.instance().clear()
    hint = closest(leaf, options).replace("'", f"'{parent}.", 1) if parent else closest(leaf, options)
    return f"unknown config key '{key}'{hint or ' (see `metarun train --cfg job` for the keys)'}"


def _resume_dir_override(overrides: list[str]) -> list[str]:
    """`metarun train ckpt_path=<run>/checkpoints/last.pt` continues in that run's own directory."""
    ckpt = next((o.split("=", 1)[1] for o in overrides if o.startswith("ckpt_path=")), None)
    if not ckpt or any(o.startswith("hydra.run.dir=") for o in overrides):
        return []
    from metarun.checkpoint import checkpoint_run_dir  # torch-free CLI start-up: import only when resuming

    run_dir = checkpoint_run_dir(Path(ckpt).expanduser().resolve())
    return [f"hydra.run.dir={run_dir}"] if (run_dir / ".hydra").is_dir() else []


def _torchrun_dir_override(overrides: list[str]) -> list[str]:
    """Under torchrun every rank composes its own config; one shared run directory (the launch's id, not a
    per-process timestamp) keeps rank 0's outputs where the others expect them."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or not run_id or any(o.startswith("hydra.") for o in overrides):
        return []
    return [f"hydra.run.dir=outputs/train/torchrun-{run_id}"]


def _train_task(cfg) -> float:  # type: ignore[no-untyped-def]
    from metarun.run import train

    return train(cfg)


def _eval_task(cfg) -> float:  # type: ignore[no-untyped-def]
    from metarun.run import evaluate

    return evaluate(cfg)


def _predict_task(cfg) -> float:  # type: ignore[no-untyped-def]
    from metarun.run import predict

    return predict(cfg)


def _guarded(task):  # type: ignore[no-untyped-def]
    """Bad input inside a run: one line, exit 2 (Hydra would print a traceback and exit 1)."""

    def wrapper(cfg):  # type: ignore[no-untyped-def]
        try:
            return task(cfg)
        except UserInputError as ex:
            if _full_errors():
                raise
            _fail(str(ex))
        except KeyboardInterrupt:
            # Ctrl-C before the trainer's handler is installed (building, decoding a dataset: its partial cache
            # is removed by the decoder) or a second Ctrl-C inside training: one line, no traceback
            if _full_errors():
                raise
            from metarun.console import print_error

            print_error("interrupted (Ctrl-C); any checkpoint already saved is kept, a half-built data cache is not")
            sys.exit(130)

    wrapper.__name__ = task.__name__
    wrapper.__module__ = task.__module__
    return wrapper
