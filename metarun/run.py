"""The only place that instantiates: config -> benchmark, backbone, algorithm, trainer.

`train(cfg)` and `evaluate(cfg)` return the metric a sweeper tunes (validation metric for train).
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from metarun import config as config_mod
from metarun.algorithms.base import MetaAlgorithm, incompatibility
from metarun.benchmarks.base import Benchmark
from metarun.checkpoint import checkpoint_run_dir, load_checkpoint, run_overrides
from metarun.config import TrainerSettings
from metarun.console import console, print_config, print_results
from metarun.distributed import Distributed
from metarun.errors import UserInputError
from metarun.evaluation import evaluate_pool
from metarun.loggers import ConsoleLogger, JsonlLogger, MetricLogger, MultiLogger, TensorBoardLogger
from metarun.models.base import Backbone
from metarun.runtime import auto_task_chunk, configure_runtime, resolve_device
from metarun.scores import SCORES_FILE, pool_identity, write_scores
from metarun.stats import Estimate
from metarun.trainer import EpisodicTrainer, Interrupted, write_results


def _instantiate(node: DictConfig, path: str, **runtime: Any) -> Any:
    """instantiate `node`, passing runtime objects (spec, backbone) untouched: Hydra would turn a
    dataclass keyword into a DictConfig, so the config becomes a partial that we call ourselves.
    A constructor's ValueError/UserInputError is reported as bad config (one line)."""
    try:
        made = instantiate(node, _partial_=True) if runtime else instantiate(node)
        return made(**runtime) if runtime else made
    except InstantiationException as ex:
        cause = ex.__cause__
        if isinstance(cause, UserInputError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise UserInputError(f"{path}: {str(cause).splitlines()[0]}") from None
        raise
    except (ValueError, TypeError) as ex:
        if isinstance(ex, UserInputError):
            raise
        raise UserInputError(f"{path}: {str(ex).splitlines()[0]}") from None


def group_names(cfg: DictConfig) -> dict[str, str]:
    """The option chosen in each group (maml, mlp, sine), for results and tables."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
        return {g: str(choices.get(g)) for g in ("algo", "model", "benchmark")}
    except ValueError:  # Python API without Hydra: fall back to class names
        return {g: cfg[g]._target_.rsplit(".", 1)[-1].lower() for g in ("algo", "model", "benchmark")}


def build(cfg: DictConfig, names: dict[str, str],
          generator: torch.Generator | None = None) -> tuple[Benchmark, MetaAlgorithm]:
    """Benchmark, then backbone (input shape from the benchmark), then algorithm (task spec from the benchmark).
    `generator` feeds the algorithm's own random draws (MetaAlgorithm.draws_randomness); None: one seeded from
    `cfg.seed`."""
    benchmark: Benchmark = _instantiate(cfg.benchmark, "benchmark")
    spec = benchmark.spec
    algorithm_class = _contract_class(cfg.algo._target_, MetaAlgorithm, "algo")
    model_class = _contract_class(cfg.model._target_, Backbone, "model")
    reason = incompatibility(algorithm_class, spec, names["algo"], names["benchmark"])
    if reason:
        raise UserInputError(reason)
    kind = "image" if spec.is_image else "vector"
    if kind not in model_class.accepts:
        raise UserInputError(f"model={names['model']} needs {'/'.join(sorted(model_class.accepts))} inputs and "
                             f"benchmark={names['benchmark']} has {kind} inputs; use model=mlp or model=transformer")
    backbone = _instantiate(cfg.model, "model", input_shape=spec.input_shape)
    runtime: dict[str, Any] = {"backbone": backbone, "spec": spec}
    if algorithm_class.draws_randomness:
        runtime["generator"] = generator if generator is not None else algorithm_generator(int(cfg.seed))
    algorithm = _instantiate(cfg.algo, "algo", **runtime)
    _check_train_episode(benchmark, algorithm, names)
    return benchmark, algorithm


def algorithm_generator(seed: int) -> torch.Generator:
    """The generator of an algorithm's own draws: seeded from the run's seed, but another stream than the
    tasks' (the same seed would replay the task sampler's numbers)."""
    digest = hashlib.sha256(f"{seed}/algorithm".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _contract_class(target: str, contract: type, group: str) -> Any:
    """The `_target_` class, which must subclass its contract (MetaAlgorithm, Backbone, Benchmark) explicitly:
    that is where the trainer finds the default of every hook the class leaves out."""
    cls = get_class(target)
    if contract not in getattr(cls, "__mro__", ()):
        raise UserInputError(f"{group}._target_ {target} does not subclass {contract.__module__}.{contract.__name__}; "
                             f"an {group} class declares the contract it implements (see README, Architecture)")
    return cls


def _check_train_episode(benchmark: Benchmark, algorithm: MetaAlgorithm, names: dict[str, str]) -> None:
    """An algorithm that meta-trains on another episode shape (ProtoNet's algo.train_ways) needs a benchmark
    that can sample it: draw one such episode now, so that a shape the train split cannot give (too many
    ways) is one line here rather than a failure at step 1."""
    shape = algorithm.train_episode()
    if shape:
        benchmark.sample("train", 1, torch.Generator().manual_seed(0), **shape)


def _to_device(benchmark: Benchmark, algorithm: MetaAlgorithm, device: torch.device) -> None:
    """Algorithms move like modules; a benchmark with a tensor store moves it too (episodes built on the device)."""
    algorithm.to(device)  # type: ignore[attr-defined]
    benchmark.to(device)


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


def _results(split: str, estimates: dict[str, Estimate], metric: str, cfg: DictConfig, names: dict[str, str],
             steps: int, extra: dict[str, Any]) -> dict[str, Any]:
    main = estimates[metric]
    return {
        "metric": metric, "split": split, "mean": main.mean, "ci95": main.ci95, "tasks": main.tasks,
        "steps": steps, "algo": names["algo"], "model": names["model"], "benchmark": names["benchmark"],
        "seed": int(cfg.seed), "nonfinite_tasks": main.nonfinite,
        "metrics": {k: e.as_dict() for k, e in estimates.items()}, **extra,
        # a preset's published figure (paper) or our own (reference) travels with the result, so
        # `metarun report --paper` finds it for eval runs too
        **({"paper": OmegaConf.to_container(cfg.paper)} if cfg.get("paper") is not None else {}),
        **({"reference": OmegaConf.to_container(cfg.reference)} if cfg.get("reference") is not None else {}),
    }


def _loggers(cfg: DictConfig, run_dir: Path, metric: str, start_step: int | None) -> MetricLogger:
    sinks: list[MetricLogger] = [JsonlLogger(run_dir / "metrics.jsonl", resume_step=start_step)]
    if cfg.logger.tensorboard:
        sinks.append(TensorBoardLogger(run_dir / "tb", resume_step=start_step))
    if cfg.logger.console:
        sinks.append(ConsoleLogger(cfg.trainer.steps, start_step or 0, metric, console=console))
    return MultiLogger(sinks)


# Keys that may differ between a checkpoint's config and the command that resumes it.
_RESUMABLE_CHANGES = ("ckpt_path", "device", "threads", "algo.init_from", "logger", "trainer.steps", "trainer.log_every",
                      "trainer.eval_batch_size", "trainer.optimizer.foreach")  # none changes the mathematics


def _config_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a, b = flat(OmegaConf.to_container(saved)), flat(OmegaConf.to_container(current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in _RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} in checkpoint vs {b.get(key)!r} now")
    return diffs


def build_optimizer(make: Callable[..., torch.optim.Optimizer], algorithm: MetaAlgorithm) -> torch.optim.Optimizer:
    """The configured optimizer over the algorithm's parameters, honouring its `parameter_groups()`
    (each group's lr = the configured lr x its "lr_scale"; set before any scheduler records initial lrs)."""
    groups = algorithm.parameter_groups()
    if groups is None:
        return make(algorithm.parameters())  # type: ignore[attr-defined]
    optimizer = make([{k: v for k, v in group.items() if k != "lr_scale"} for group in groups])
    for group, spec in zip(optimizer.param_groups, groups):
        group["lr"] = group["lr"] * spec.get("lr_scale", 1.0)
    return optimizer


def train(cfg: DictConfig) -> float:
    """Train one run; returns the best validation metric (what a sweeper optimises)."""
    cfg = config_mod.validate(cfg)
    configure_runtime(cfg.threads)
    names = group_names(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = algorithm_generator(int(cfg.seed))
    benchmark, algorithm = build(cfg, names, generator)
    _to_device(benchmark, algorithm, device)
    # optimizer and scheduler configs are partials (_partial_: true): they need runtime objects
    optimizer = build_optimizer(_instantiate(cfg.trainer.optimizer, "trainer.optimizer"), algorithm)
    scheduler = (_instantiate(cfg.trainer.scheduler, "trainer.scheduler")(optimizer)
                 if cfg.trainer.scheduler is not None else None)
    run_dir = _run_dir()
    distributed = Distributed(device)
    distributed.check_divides(cfg.trainer.meta_batch_size)
    if not distributed.is_main:  # other ranks of torchrun: train their share, write nothing
        cfg.logger.console = cfg.logger.tensorboard = False
    resume = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    if resume is not None:
        diffs = _config_differences(OmegaConf.create(resume["config"]), cfg)
        if diffs:
            raise UserInputError(f"checkpoint {cfg.ckpt_path} was trained with a different config: " + "; ".join(diffs))
    if cfg.logger.console:
        print_config(cfg)
    settings = TrainerSettings(**{k: cfg.trainer[k] for k in TrainerSettings.__dataclass_fields__})
    if settings.task_chunk is None:
        settings.task_chunk = auto_task_chunk(device, benchmark.spec.is_image)
    start = None if resume is None else int(resume["step"])
    logger = _loggers(cfg, run_dir, benchmark.spec.metric, start) if distributed.is_main else MultiLogger([])
    trainer = EpisodicTrainer(algorithm, benchmark, optimizer, scheduler, settings, logger, run_dir, device,
                              cfg.seed, OmegaConf.to_yaml(cfg), distributed, algorithm_generator=generator,
                              overrides=_training_overrides(cfg))
    if resume is not None:
        trainer.restore(resume)
    started = time.perf_counter()
    try:
        estimates = trainer.fit()
    except Interrupted as stop:
        logger.close()
        command = resume_command(stop.path)
        saved = "saved" if stop.phase == "training" else "last.pt was saved after it:"
        console.print(f"[yellow]interrupted during {stop.phase} after step {stop.step}; {saved} {stop.path}")
        console.print(f"resume with: {command}", soft_wrap=True, markup=False, highlight=False)
        sys.exit(128 + stop.signum)
    except BaseException:
        logger.close()
        raise
    if not distributed.is_main:
        distributed.close()
        return float("nan")
    metric = benchmark.spec.metric
    results = _results("test", estimates, metric, cfg, names, trainer.step, {
        "best_step": trainer.best.get("step"), "val_best": trainer.best.get("value"),
        "train_seconds": round(time.perf_counter() - started, 2), "device": str(device),
        "world_size": distributed.world_size,
    })
    write_results(run_dir / "results.json", results)
    write_scores(run_dir / SCORES_FILE, pool_identity(cfg, names["benchmark"], "test", results["tasks"]), estimates)
    logger.log_hparams(_hparams(cfg, names), {f"hparam/test_{metric}": results["mean"],
                                              f"hparam/val_{metric}": float(trainer.best.get("value", float("nan")))})
    logger.close()
    if cfg.logger.console:
        print_results(results)
        console.print(f"run directory: {run_dir}")
    distributed.close()
    return float(trainer.best.get("value", results["mean"]))


def _training_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides that made this run (kept in its checkpoints, so `metarun eval` composes the
    run's config the way `train` did); where the weights come from is not part of it."""
    return [o for o in _task_overrides() if not o.startswith(("ckpt_path=", "hydra."))]


def resume_command(ckpt: Path) -> str:
    """The exact command that continues a run: the original overrides plus ckpt_path."""
    overrides = [o for o in run_overrides(checkpoint_run_dir(ckpt)) if not o.startswith("ckpt_path=")]
    return shlex.join(["metarun", "train", *overrides, f"ckpt_path={ckpt}"])


def _hparams(cfg: DictConfig, names: dict[str, str]) -> dict[str, Any]:
    flat: dict[str, Any] = {"seed": cfg.seed, **names}
    for section in ("algo", "model", "benchmark", "trainer"):
        for key, value in cfg[section].items():
            if not str(key).startswith("_") and not isinstance(value, DictConfig):
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def evaluate(cfg: DictConfig) -> float:
    """Score a checkpoint on a split's fixed pool. Its config is composed as `train` composes one, from the
    checkpoint's training overrides and then the command line's; every value the command line leaves alone
    is the checkpoint's own (_eval_config)."""
    if not cfg.ckpt_path:
        raise UserInputError("metarun eval needs ckpt_path=<run dir>/checkpoints/best.pt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    state = load_checkpoint(ckpt)
    overrides = [o for o in _task_overrides() if _override_key(o) not in _EVAL_OWN_KEYS]
    merged, names = _eval_config(state, ckpt, overrides)
    merged.ckpt_path = cfg.ckpt_path
    merged.split = cfg.split
    merged = config_mod.validate(merged)
    if "init_from" in merged.algo:
        merged.algo.init_from = None  # the weights come from the checkpoint being scored
    configure_runtime(merged.threads)
    device = resolve_device(merged.device)
    benchmark, algorithm = build(merged, names)
    try:
        algorithm.load_state_dict(state["model"])
    except RuntimeError as ex:
        raise UserInputError(f"checkpoint weights do not fit the configured model: {str(ex).splitlines()[0][:200]}") from None
    _to_device(benchmark, algorithm, device)
    split = cfg.split or "test"
    if split not in ("train", "val", "test"):
        raise UserInputError(f"split must be train, val or test (got '{split}')")
    num_tasks = merged.trainer.eval_tasks if split == "test" else merged.trainer.val_tasks
    started = time.perf_counter()
    estimates = evaluate_pool(algorithm, benchmark, split, num_tasks, merged.trainer.pool_seed, device,
                              merged.trainer.eval_batch_size)
    metric = benchmark.spec.metric
    results = _results(split, estimates, metric, merged, names, int(state["step"]), {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()), "eval_seconds": round(time.perf_counter() - started, 2),
        "device": str(device),
    })
    run_dir = _run_dir()
    write_results(run_dir / "results.json", results)
    write_scores(run_dir / SCORES_FILE, pool_identity(merged, names["benchmark"], split, num_tasks), estimates)
    print_results(results)
    console.print(f"results: {run_dir / 'results.json'}")
    return results["mean"]


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _saved_names(ckpt: Path, cfg: DictConfig) -> dict[str, str]:
    """Group choices of the run that wrote the checkpoint (from its .hydra/hydra.yaml when present)."""
    hydra_file = checkpoint_run_dir(ckpt) / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        choices = OmegaConf.load(hydra_file).hydra.runtime.choices
        return {g: str(choices.get(g)) for g in ("algo", "model", "benchmark")}
    return {g: cfg[g]._target_.rsplit(".", 1)[-1].lower() for g in ("algo", "model", "benchmark")}


# -- eval's composition ------------------------------------------------------------------------------
# `metarun eval` composes the config as `train` does: the checkpoint's training overrides, then the command
# line's. What wins over what, key by key:
#   1. a key the command line names (benchmark.ways=20), and every key of a group whose option changes
#      (benchmark=omniglot, or an experiment= preset that picks another benchmark): the new composition;
#   2. any other key the new overrides change (debug=smoke's trainer.eval_tasks): the new composition;
#   3. every other key: the checkpoint's saved config, even where today's config files would compose
#      something else (a default edited since it was trained).
# A checkpoint that records no overrides (saved before they were recorded, away from its run directory) gets
# its saved config with plain key=value overrides merged in, and a group override is refused in one line.

_EVAL_OWN_KEYS = ("ckpt_path", "split")  # eval sets these itself; they are never composed
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


def _override_key(text: str) -> str:
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
    return [o for o in recorded if _override_key(o) not in _EVAL_OWN_KEYS and not o.lstrip("+~").startswith("hydra")]


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


def _eval_config(state: dict[str, Any], ckpt: Path, overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
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

