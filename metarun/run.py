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
from metarun.rl.trpo import TrustRegionOptimizer
from metarun.benchmarks.base import Benchmark, TaskSpec
from metarun.checkpoint import checkpoint_run_dir, load_checkpoint, run_overrides
from metarun.config import TrainerSettings
from metarun.console import console, print_config, print_results
from metarun.distributed import Distributed
from metarun.errors import UserInputError
from metarun.eval_config import EVAL_OWN_KEYS, eval_config, override_key
from metarun.evaluation import evaluate_pool
from metarun.loggers import ConsoleLogger, JsonlLogger, MetricLogger, MultiLogger, TensorBoardLogger
from metarun.models.base import Backbone, input_kind
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
    input_shape = algorithm_class.backbone_input_shape(spec)
    kind = input_kind(input_shape)
    if kind not in model_class.accepts:
        source = (f"benchmark={names['benchmark']} has" if input_shape == spec.input_shape else
                  f"algo={names['algo']} on benchmark={names['benchmark']} reads")
        raise UserInputError(f"model={names['model']} needs {'/'.join(sorted(model_class.accepts))} inputs and "
                             f"{source} {kind} inputs; use {_MODELS_FOR[kind]}")
    backbone = _instantiate(cfg.model, "model", input_shape=input_shape)
    runtime: dict[str, Any] = {"backbone": backbone, "spec": spec}
    if algorithm_class.draws_randomness:
        runtime["generator"] = generator if generator is not None else algorithm_generator(int(cfg.seed))
    algorithm = _instantiate(cfg.algo, "algo", **runtime)
    _check_train_episode(benchmark, algorithm, names)
    return benchmark, algorithm


# what run.py suggests for each kind of backbone input (models/base.py input_kind)
_MODELS_FOR = {"vector": "model=mlp or model=transformer", "image": "model=cnn, model=resnet12 or model=transformer",
               "sequence": "model=gru or model=transformer", "tokens": "model=hf"}


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
    if not any(True for _ in algorithm.parameters()):  # type: ignore[attr-defined]
        # an algorithm without parameters (algo=baseline's bandit/MDP policies) is scored, never stepped: an
        # empty optimizer keeps the trainer's checkpoint format (optimizers refuse an empty parameter list)
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=0.0)
    groups = algorithm.parameter_groups()
    if groups is None:
        return make(algorithm.parameters())  # type: ignore[attr-defined]
    optimizer = make([{k: v for k, v in group.items() if k != "lr_scale"} for group in groups])
    for group, spec in zip(optimizer.param_groups, groups):
        group["lr"] = group["lr"] * spec.get("lr_scale", 1.0)
    return optimizer


def _check_trust_region(optimizer: torch.optim.Optimizer, algorithm: MetaAlgorithm, spec: TaskSpec,
                        names: dict[str, str]) -> None:
    """TRPO needs a policy with trust-region terms (MetaAlgorithm.trust_region_terms): one line otherwise."""
    if not isinstance(optimizer, TrustRegionOptimizer):
        return
    if not algorithm.trust_region or spec.kind != "reinforcement":
        raise UserInputError(f"trainer/optimizer=trpo steps a policy within a KL trust region: it needs an RL "
                             f"benchmark and an algorithm with trust-region terms (algo=maml on benchmark=navigation2d); "
                             f"got algo={names['algo']} on benchmark={names['benchmark']} ({spec.kind}); use the "
                             f"default trainer/optimizer=adam")


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
    _check_trust_region(optimizer, algorithm, benchmark.spec, names)
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
    overrides = [o for o in _task_overrides() if override_key(o) not in EVAL_OWN_KEYS]
    merged, names, benchmark, algorithm, device, state = restore(str(cfg.ckpt_path), overrides, cfg.split)
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


def predict(cfg: DictConfig) -> float:
    """Label a user's files with a checkpoint's learner adapted to their support set (metarun/predict.py);
    returns the number of files labelled."""
    from metarun.predict import predict as label_files

    overrides = [o for o in _task_overrides() if override_key(o) not in EVAL_OWN_KEYS]
    return float(len(label_files(cfg, overrides, _run_dir())))


def restore(ckpt_path: str, overrides: list[str], split: str | None = None
            ) -> tuple[DictConfig, dict[str, str], Benchmark, MetaAlgorithm, torch.device, dict[str, Any]]:
    """A checkpoint's learner rebuilt as it was trained, with `overrides` applied (`metarun eval`, `metarun
    predict`): its config, group names, benchmark, algorithm (weights loaded, on the device), device, state."""
    ckpt = Path(ckpt_path).expanduser()
    state = load_checkpoint(ckpt)
    merged, names = eval_config(state, ckpt, overrides)
    merged.ckpt_path = ckpt_path
    merged.split = split
    merged = config_mod.validate(merged)
    if "init_from" in merged.algo:
        merged.algo.init_from = None  # the weights come from the checkpoint being scored
    configure_runtime(merged.threads)
    device = resolve_device(merged.device)
    benchmark, algorithm = build(merged, names)
    try:
        algorithm.load_state_dict(state["model"])
    except RuntimeError as ex:
        raise UserInputError(misfit(algorithm, state, benchmark.spec, names) or "checkpoint weights do not fit the "
                             f"configured model: {str(ex).splitlines()[0][:200]}") from None
    _to_device(benchmark, algorithm, device)
    return merged, names, benchmark, algorithm, device, state


def misfit(algorithm: MetaAlgorithm, state: dict[str, Any], spec: TaskSpec, names: dict[str, str]) -> str | None:
    """One line naming the first weight whose shape differs between the checkpoint and the configured model,
    and the inputs each was built for (cross-domain eval: an RGB benchmark for a greyscale checkpoint)."""
    saved = state.get("model") or {}
    here = algorithm.state_dict()  # type: ignore[attr-defined]
    for key, value in here.items():
        if key in saved and tuple(saved[key].shape) != tuple(value.shape):
            trained = OmegaConf.select(OmegaConf.create(state.get("config") or {}), "benchmark._target_", default="?")
            return (f"checkpoint weights do not fit the configured model: {key} is {list(saved[key].shape)} in the "
                    f"checkpoint and {list(value.shape)} here, where benchmark={names['benchmark']} gives "
                    f"{spec.input_shape} inputs and {spec.ways}-way tasks (the checkpoint was trained on "
                    f"{str(trained).rsplit('.', 1)[-1]}; match the channels, or the ways of a fixed output layer)")
    return None


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []
