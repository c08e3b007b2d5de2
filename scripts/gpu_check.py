"""The GPU check of issue 22: every figure a lent GPU is asked for, in one command that fits a device lease.

    scripts/gpu_check.sh --out DIR                  # on the GPU machine: under 8 minutes on one H200
    scripts/gpu_check.sh --cpu --out DIR            # the whole check on the CPU, small sizes, a few minutes
    scripts/gpu_check.sh --cpu --size tiny --out DIR    # smallest sizes (tests/test_gpu_check.py)
    scripts/gpu_check.sh --prepare                  # here, before a device run: pack what the device lacks

A GPU is lent for a few minutes in all, so the check must not spend them on a typo: `--cpu` runs every line
of it on the CPU (tests/test_gpu_check.py does, at the smallest sizes), writing the same JSON.

Sections (in this order; `--sections` picks some):
  reference  float64 and float32 meta-gradients of sine and Conv-4 MAML on the device against the CPU's per-task
             loop in float64 (scripts/bench.py's setups): the device computes the CPU's numbers.
  bench      scripts/bench.py --device cuda: sine and Conv-4 MAML, per-task loop against metarun, every meta-gradient
             checked equal before timing, peak memory of each (target: Conv-4 MAML >= 5x the loop).
  train      `metarun train experiment=maml_omniglot_5w1s trainer.steps=1000 device=cuda`: it/s from metrics.jsonl's
             `time` column and the projected time of the paper's 60,000 (target: under 10 minutes); its first
             steps' training losses against the same steps on the CPU.
  episodes   ProtoNet 60-way Omniglot episodes/s (the protonet_omniglot_5w1s preset), its float64 gradient against
             the CPU's.
  precision  fp32 (TF32 off), TF32 and bf16 autocast: MAML Conv-4 training it/s, peak memory and accuracy on the
             fixed test pool (weights of the train section's run), each against the CPU's fp32 accuracy.
  compile    torch.compile on/off: MAML second order (double backward), first order, ProtoNet 60-way; a compile
             that fails is recorded as a result, not a crash; a compiled gradient must equal the eager one.

Every figure goes to DIR/gpu_check.json (schema below) and one Markdown table, DIR/gpu_check.md; DIR/gpu_check.log
holds each subprocess's command and the end of its output. Exit status: 0 every check within tolerance; 1 a result
differs from its CPU reference beyond tolerance; 2 bad usage or a missing package (one line says what to install);
3 a section crashed, timed out or was skipped for the time budget (the rest was still measured and written).

Data: real Omniglot when found (--data, $METARUN_DATA/omniglot, shared/data/omniglot in or beside the checkout, or
the copy --prepare packs into build/gpu_check/), else a generated fixture in the real on-disk format
(tests/image_fixtures.py): at --size full one with the real alphabets and character counts (so the Vinyals and
random splits of the presets apply unchanged), else a small one. The JSON and the table say which was used.

`--perturb-reference` scales every CPU reference (gradients, losses) by 1.05 and adds 5 points to reference
accuracies: the run must then exit 1 (how the tests show that a wrong result cannot pass).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / "build" / "gpu_check"  # what --prepare writes (build/ is git-ignored): carry it to the device
PACKED_OMNIGLOT = PREPARED / "omniglot.tar.gz"
CARRIED_SITE = PREPARED / "site"
SCHEMA = 1
JSON_NAME, MARKDOWN_NAME, LOG_NAME = "gpu_check.json", "gpu_check.md", "gpu_check.log"
SECTIONS = ("reference", "bench", "train", "episodes", "precision", "compile")
STATUSES = ("ok", "failed", "unsupported", "error", "skipped")
PRESET_MAML = "maml_omniglot_5w1s"
PRESET_PROTONET = "protonet_omniglot_5w1s"
PAPER_STEPS = 60_000  # Finn et al. 2017's meta-iterations for Omniglot
TARGET_60K_MINUTES = 10.0
TARGET_CONV4_VS_LOOP = 5.0
PERTURBATION = 0.05  # --perturb-reference: references x 1.05, accuracies + 5 points

# Tolerances (relative errors unless said): what "differs from the CPU reference" means.
TOL_FLOAT64 = 1e-8  # float64 meta-gradients, device vs CPU (scripts/bench.py's GRADIENT_TOLERANCE)
TOL_FLOAT32 = 1e-4  # float32 with TF32 off vs CPU float64 (measured on CPU: 1e-7 sine, 1.2e-6 Conv-4)
TOL_TRAIN_LOSS = 1e-2  # training losses of the first steps, device (torch defaults: cuDNN convs in TF32) vs CPU
TOL_COMPILED = 1e-3  # compiled vs eager meta-gradient, both TF32 off (fusion reorders float32 sums)
TOL_ACCURACY_POINTS = {"fp32": 0.5, "tf32": 1.0, "bf16": 2.0}  # test-pool accuracy vs CPU fp32, in points


# -- sizes -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much of each measurement a run does: `full` on the GPU, `small` (--cpu default) and `tiny` (the test)."""

    budget_s: float  # the whole run; sections that would start past it are skipped (exit 3)
    fixture: str  # "full" (real alphabets and counts, 32,460 PNGs) or "small" (40 characters)
    bench_rounds: int
    bench_seconds: float
    bench_meta_batch: int | None  # None: bench.py's own (25 sine, 32 Conv-4)
    bench_memory: bool  # bench.py's peak-memory subprocesses
    train_steps: int
    train_overrides: tuple[str, ...]  # added to the preset's command (smaller pools and batches below full)
    reference_steps: int  # training steps compared with the CPU
    seconds: float  # each in-process rate is timed over at least this long ...
    min_steps: int  # ... and this many steps, after `warmup` steps
    warmup: int
    maml_meta_batch: int | None  # precision/compile MAML batches; None: the preset's 32
    protonet_batches: tuple[int, ...]  # episodes per step timed (the preset takes 1)
    pool_tasks: int  # the fixed test pool of the precision section
    compile_models: tuple[str, ...]
    threads: int | None = None  # torch threads of every process (tiny: 1; None: torch's default)
    protonet_ways: int | None = None  # ProtoNet's training ways; None: the preset's 60 (tiny: 10, seconds not minutes)


SIZES = {
    "full": Sizes(budget_s=450, fixture="full", bench_rounds=3, bench_seconds=1.5, bench_meta_batch=None,
                  bench_memory=True, train_steps=1000, train_overrides=(), reference_steps=3, seconds=2.0,
                  min_steps=10, warmup=5, maml_meta_batch=None, protonet_batches=(1, 32), pool_tasks=600,
                  compile_models=("maml-second-order", "maml-first-order", "protonet-60way")),
    "small": Sizes(budget_s=900, fixture="small", bench_rounds=1, bench_seconds=0.5, bench_meta_batch=4,
                   bench_memory=True, train_steps=20,
                   train_overrides=("trainer.meta_batch_size=4", "trainer.log_every=5", "trainer.val_tasks=20",
                                    "trainer.eval_tasks=20"),
                   reference_steps=3, seconds=0.5, min_steps=3, warmup=1, maml_meta_batch=4, protonet_batches=(1, 4),
                   pool_tasks=40, compile_models=("maml-second-order", "maml-first-order", "protonet-60way")),
    "tiny": Sizes(budget_s=600, fixture="small", bench_rounds=1, bench_seconds=0.01, bench_meta_batch=2,
                  bench_memory=False, train_steps=4,
                  train_overrides=("trainer.meta_batch_size=2", "trainer.log_every=2", "trainer.val_tasks=4",
                                   "trainer.eval_tasks=4", "logger.tensorboard=false"),
                  reference_steps=2, seconds=0.0, min_steps=1, warmup=1, maml_meta_batch=2, protonet_batches=(1,),
                  pool_tasks=4, compile_models=("maml-sine-second-order",), threads=1, protonet_ways=10),
}
# each section's own time limit (seconds), capped by what is left of the budget
SECTION_LIMIT_S = {"reference": 120, "bench": 220, "train": 260, "episodes": 120, "precision": 180, "compile": 200}
SECTION_MIN_S = 15  # a section is not started with less than this left
COMPILE_MODEL_LIMIT_S = 110  # CUDA: one model's compile, checks and timing


# -- bootstrapping: the one line that says what to install -----------------------------------------------------


REQUIRED = (("torch", "torch"), ("hydra", "hydra-core>=1.3,<1.4"), ("omegaconf", "omegaconf>=2.3"),
            ("rich", "rich>=13"), ("numpy", "numpy>=1.24"), ("PIL", "pillow>=10"), ("yaml", "pyyaml"),
            ("packaging", "packaging"))


def bootstrap() -> str | None:
    """Make the checkout's metarun and its dependencies importable (also in every subprocess, through PYTHONPATH);
    None, or one line saying what is missing and the pip command that installs it.

    The device machine has torch but not hydra-core/omegaconf, and cannot reach a registry: --prepare copies those
    (pure Python) into build/gpu_check/site here, and they are used only when the interpreter lacks them."""
    paths = [str(ROOT)]
    missing = [pip for module, pip in REQUIRED if importlib.util.find_spec(module) is None]
    if missing and CARRIED_SITE.is_dir():
        sys.path.append(str(CARRIED_SITE))  # after site-packages: an installed copy wins
        paths.append(str(CARRIED_SITE))
        importlib.invalidate_caches()
        missing = [pip for module, pip in REQUIRED if importlib.util.find_spec(module) is None]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    if missing:
        offline = ("" if CARRIED_SITE.is_dir() else
                   "; on a machine without a registry, run scripts/gpu_check.sh --prepare where they are installed "
                   "and carry build/gpu_check")
        return f"missing for {sys.executable}: {', '.join(missing)}: python3 -m pip install " \
               + " ".join(f"'{m}'" for m in missing) + offline
    try:
        import metarun.run  # noqa: F401
    except ImportError as ex:
        return f"metarun does not import from {ROOT} ({ex}): python3 -m pip install -e {ROOT}"
    return None


def prepare() -> int:
    """Here, before a device run: copy hydra-core, omegaconf, antlr4 and packaging (pure Python) into build/gpu_check/site and
    pack the real Omniglot images (if found) into build/gpu_check/omniglot.tar.gz, so that a device machine with
    torch alone and no network runs the check on real data. Prints what to carry."""
    from importlib import metadata

    site = CARRIED_SITE
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "packaging"):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            print(f"gpu_check --prepare: {name} is not installed here: python3 -m pip install {name}", file=sys.stderr)
            return 2
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts or file.suffix == ".pyc":
                continue  # console scripts outside site-packages; bytecode is rebuilt there
            source = Path(str(file.locate()))
            if source.is_file():
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    data = next((c for c in data_candidates(None) if (c / "omniglot-py").is_dir()), None)
    PACKED_OMNIGLOT.unlink(missing_ok=True)
    if data is not None:
        with tarfile.open(PACKED_OMNIGLOT, "w:gz") as archive:
            archive.add(data / "omniglot-py", arcname="omniglot/omniglot-py")
    size = sum(p.stat().st_size for p in PREPARED.rglob("*") if p.is_file())
    print(f"prepared {PREPARED.relative_to(ROOT)} ({size / 2**20:.1f} MiB): hydra-core, omegaconf, antlr4, packaging"
          + (f" and real Omniglot from {data}" if data else " (no real Omniglot found: the device will use a fixture)"))
    print(f"device run: carry [\"{PREPARED.relative_to(ROOT)}\"] and run scripts/gpu_check.sh --out $OUT")
    return 0


# -- rows: one figure each -------------------------------------------------------------------------------------


def check(what: str, error: float, tolerance: float) -> dict[str, Any]:
    """A comparison with a reference: passed when `error` is finite and at most `tolerance`."""
    error = float(error)
    return {"what": what, "error": error, "tolerance": tolerance, "passed": math.isfinite(error) and error <= tolerance}


def make_row(section: str, name: str, value: float | None = None, unit: str = "", *, peak_gpu_mib: float | None = None,
             target: str | None = None, target_met: bool | None = None, check: dict[str, Any] | None = None,
             status: str | None = None, note: str = "", **details: Any) -> dict[str, Any]:
    """One line of the table. status: ok; failed (its check is beyond tolerance); unsupported (a negative result,
    e.g. torch.compile refusing double backward); error (crashed); skipped."""
    if status is None:
        status = "failed" if check is not None and not check["passed"] else "ok"
    assert status in STATUSES, status
    return {"section": section, "name": name, "value": None if value is None else float(value), "unit": unit,
            "peak_gpu_mib": None if peak_gpu_mib is None else round(float(peak_gpu_mib), 1),
            "target": target, "target_met": target_met, "check": check, "status": status, "note": note,
            "details": {k: v for k, v in details.items() if v is not None}}


class RowSink:
    """Rows appended to a JSON-lines file as they are measured, so a worker killed at its time limit loses only
    what it had not measured yet."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def mark(self, section: str, seconds: float) -> None:
        self.add({"section_done": section, "seconds": round(seconds, 2)})


def read_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows, done = [], {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                if "section_done" in item:
                    done[item["section_done"]] = item["seconds"]
                else:
                    rows.append(item)
    return rows, done


def first_line(ex: BaseException) -> str:
    text = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {text[0] if text else ''}"[:300]


# -- torch helpers (imported lazily: the orchestrator reports a missing torch in one line) ---------------------


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def tf32_state() -> dict[str, Any]:
    """The TF32 switches as torch reports them (torch >= 2.9 also has the fp32_precision settings)."""
    import torch

    state: dict[str, Any] = {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    for name, obj in (("matmul_fp32_precision", torch.backends.cuda.matmul),
                      ("cudnn_conv_fp32_precision", getattr(torch.backends.cudnn, "conv", None))):
        if obj is not None and hasattr(obj, "fp32_precision"):
            state[name] = obj.fp32_precision
    return state


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for matmuls and cuDNN convolutions on or off inside the block, restored after (the legacy flags, which
    every torch since 1.7 honours and which newer ones map onto their fp32_precision settings)."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def peak_memory(device: Any, out: dict[str, float]) -> Iterator[None]:
    """torch.cuda.max_memory_allocated over the block (MiB, everything resident included) into out["peak"];
    nothing on CPU."""
    import gc

    import torch

    if device.type != "cuda":
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out["resident"] = torch.cuda.memory_allocated() / 2**20
    yield
    torch.cuda.synchronize()
    out["peak"] = torch.cuda.max_memory_allocated() / 2**20


def rate(step: Callable[[], None], device: Any, sizes: Sizes) -> float:
    """Steps/s over at least `sizes.seconds` and `sizes.min_steps` steps after `sizes.warmup` (each step ends in a
    synchronisation, as the trainer's NaN check does)."""
    for _ in range(sizes.warmup):
        step()
    sync(device)
    count, start = 0, time.perf_counter()
    while count < sizes.min_steps or time.perf_counter() - start < sizes.seconds:
        step()
        count += 1
    sync(device)
    return count / (time.perf_counter() - start)


def relative_error(got: list[Any], reference: list[Any]) -> float:
    """Max over tensors of |got - ref| / |ref| (in float64, on the CPU)."""
    worst = 0.0
    for g, r in zip(got, reference, strict=True):
        g, r = g.detach().double().cpu(), r.detach().double().cpu()
        worst = max(worst, float((g - r).norm() / r.norm().clamp_min(1e-300)))
    return worst


def gradients(module: Any, compute: Callable[[], Any]) -> list[Any]:
    """The .grad of every parameter after `compute()` (which runs the backward)."""
    module.zero_grad(set_to_none=True)
    compute()
    return [p.grad.detach().clone() if p.grad is not None else p.detach().new_zeros(p.shape)
            for p in module.parameters()]


def load_bench() -> Any:
    """scripts/bench.py, loaded by path (scripts/ is no package): its setups and variants, not copies."""
    name = "metarun_bench_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "bench.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def compose(preset: str, overrides: list[str]) -> Any:
    """The preset's config as `metarun train experiment=<preset> <overrides>` composes it, validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metarun.config import config_dir, validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[f"experiment={preset}", *overrides])
    GlobalHydra.instance().clear()
    return validate(cfg)


def build_preset(preset: str, overrides: list[str], device: Any) -> tuple[Any, Any, Any, Any]:
    """(cfg, benchmark, algorithm, optimizer) of the preset, built by metarun.run as `metarun train` builds them,
    on `device`."""
    import torch
    from hydra.utils import instantiate

    from metarun.run import build, build_optimizer, group_names

    cfg = compose(preset, overrides)
    torch.manual_seed(int(cfg.seed))
    benchmark, algorithm = build(cfg, group_names(cfg))
    algorithm.to(device)
    benchmark.to(device)
    optimizer = build_optimizer(instantiate(cfg.trainer.optimizer), algorithm)
    return cfg, benchmark, algorithm, optimizer


# -- the worker's sections (in-process, on the device) ---------------------------------------------------------


@dataclass
class Context:
    """What a worker section needs: the device, the sizes, the data, where rows go, and the switches."""

    device: Any
    sizes: Sizes
    data_root: str
    data_overrides: list[str]  # what the data needs on top of a preset (a small fixture: benchmark.split_scheme=random)
    sink: RowSink
    perturb: bool
    checkpoint: str | None  # the train section's best.pt, for the precision section's weights
    compile_backend: str

    def reference(self, tensors: list[Any]) -> list[Any]:
        """CPU reference tensors, scaled by 1.05 under --perturb-reference."""
        return [t * (1 + PERTURBATION) for t in tensors] if self.perturb else tensors

    def reference_accuracy(self, value: float) -> float:
        return value + PERTURBATION if self.perturb else value

    def train_step(self, benchmark: Any, algorithm: Any, optimizer: Any, tasks: int,
                   autocast: Callable[[], Any] = contextlib.nullcontext,
                   meta_loss: Callable[[Any], Any] | None = None) -> Callable[[], None]:
        """One training step as EpisodicTrainer takes it on a GPU (whole meta-batch, no chunks): sample on the device,
        meta-loss (under `autocast`), backward, the finite check (a synchronisation), optimizer step."""
        import torch

        generator = torch.Generator().manual_seed(0)
        shape = dict(algorithm.train_episode())
        loss_of = meta_loss or algorithm.meta_loss

        def step() -> None:
            batch = benchmark.sample("train", tasks, generator, **shape).to(self.device)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = loss_of(batch)
            loss.backward()
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError("non-finite meta-loss while timing")
            optimizer.step()
        return step


def section_reference(ctx: Context) -> None:
    """sine and Conv-4 MAML (scripts/bench.py's setups, 3 tasks): the device's meta-gradient against the CPU's
    per-task loop in float64 (float64 and float32 with TF32 off on the device)."""
    import torch

    bench = load_bench()
    device = ctx.device
    for name in ("sine", "conv4"):
        setup = bench.make_setup(name, argparse.Namespace(omniglot_root=None, meta_batch=None))
        torch.manual_seed(0)
        cpu = setup.make_maml().double()
        batch = setup.sample(3, torch.Generator().manual_seed(0))
        batch64 = batch.to("cpu", torch.float64)
        reference = ctx.reference(gradients(cpu, lambda: bench.per_task_loop(cpu, batch64)))
        for dtype, tolerance in ((torch.float64, TOL_FLOAT64), (torch.float32, TOL_FLOAT32)):
            model = copy.deepcopy(cpu).to(device, dtype)
            on_device = batch.to(device, dtype)
            with tf32(False):
                got = gradients(model, lambda: bench.metarun_step(None)(model, on_device))
            label = "float64" if dtype == torch.float64 else "float32, TF32 off"
            ctx.sink.add(make_row(
                "reference", f"{name} MAML meta-gradient, {label}: metarun on {device.type} vs CPU per-task loop",
                relative_error(got, reference), "rel. error",
                check=check("relative error vs CPU float64 per-task loop", relative_error(got, reference), tolerance),
                note=f"3 tasks of: {setup.description}"))


def section_episodes(ctx: Context) -> None:
    """ProtoNet 60-way episodes/s as its Omniglot preset trains (1 episode per step), and batched; its float64
    gradient on one 60-way episode against the CPU's."""
    import torch

    device = ctx.device
    overrides = [f"benchmark.root={ctx.data_root}", *ctx.data_overrides]
    if ctx.sizes.protonet_ways:
        overrides.append(f"algo.train_ways={ctx.sizes.protonet_ways}")
    cfg, benchmark, algorithm, optimizer = build_preset(PRESET_PROTONET, overrides, device)
    shape = dict(algorithm.train_episode())
    for tasks in ctx.sizes.protonet_batches:
        memory: dict[str, float] = {}
        step = ctx.train_step(benchmark, algorithm, optimizer, tasks)
        with peak_memory(device, memory):
            steps_per_s = rate(step, device, ctx.sizes)
        preset = " (the preset)" if tasks == cfg.trainer.meta_batch_size else ""
        ctx.sink.add(make_row(
            "episodes", f"ProtoNet {shape.get('ways')}-way {benchmark.spec.shots}-shot {shape.get('queries')}-query "
                        f"Conv-4, {tasks} episode{'s' if tasks > 1 else ''}/step{preset}",
            steps_per_s * tasks, "episodes/s", peak_gpu_mib=memory.get("peak"), steps_per_s=round(steps_per_s, 2),
            resident_mib=memory.get("resident")))
    episode = benchmark.sample("train", 1, torch.Generator().manual_seed(1), **shape)
    cpu = copy.deepcopy(algorithm).to("cpu", torch.float64)
    reference = ctx.reference(gradients(cpu, lambda: cpu.meta_loss(episode.to("cpu", torch.float64))[0].backward()))
    model = copy.deepcopy(cpu).to(device)
    got = gradients(model, lambda: model.meta_loss(episode.to(device, torch.float64))[0].backward())
    error = relative_error(got, reference)
    ctx.sink.add(make_row("episodes", f"ProtoNet {shape.get('ways')}-way gradient, float64: {device.type} vs CPU",
                          error, "rel. error", check=check("relative error vs CPU float64", error, TOL_FLOAT64)))


PRECISIONS = {"fp32": "fp32, TF32 off", "tf32": "TF32 on (matmul and cuDNN)", "bf16": "bf16 autocast, TF32 off"}


def section_precision(ctx: Context) -> None:
    """fp32 (TF32 off), TF32 and bf16 autocast on MAML Conv-4 (the maml_omniglot_5w1s preset, weights of the train
    section's run when it ran): training it/s and peak memory; the fixed test pool's accuracy, against the CPU's fp32
    accuracy on the same pool with the same weights; the meta-gradient's relative error against the CPU's float64."""
    import torch

    from metarun.checkpoint import load_checkpoint
    from metarun.evaluation import evaluate_pool

    device, sizes = ctx.device, ctx.sizes
    overrides = [f"benchmark.root={ctx.data_root}", *ctx.data_overrides]
    if sizes.maml_meta_batch:
        overrides.append(f"trainer.meta_batch_size={sizes.maml_meta_batch}")
    cfg, benchmark, algorithm, optimizer = build_preset(PRESET_MAML, overrides, device)
    weights = "fresh initialisation (no train section checkpoint)"
    if ctx.checkpoint and Path(ctx.checkpoint).is_file():
        algorithm.load_state_dict(load_checkpoint(ctx.checkpoint)["model"])
        weights = f"weights of {Path(ctx.checkpoint).parent.parent.name}/{Path(ctx.checkpoint).name}"
    trained = {k: v.detach().clone() for k, v in algorithm.state_dict().items()}
    tasks, pool, seed = int(cfg.trainer.meta_batch_size), sizes.pool_tasks, int(cfg.trainer.pool_seed)
    metric = benchmark.spec.metric

    # the CPU references: fp32 accuracy on the pool; the float64 meta-gradient of one fixed batch
    cpu = copy.deepcopy(algorithm).to("cpu")
    cpu_benchmark = copy.deepcopy(benchmark).to("cpu")
    started = time.perf_counter()
    cpu_accuracy = evaluate_pool(cpu, cpu_benchmark, "test", pool, seed, torch.device("cpu"),
                                 int(cfg.trainer.eval_batch_size))[metric].mean
    cpu_seconds = time.perf_counter() - started
    reference_accuracy = ctx.reference_accuracy(cpu_accuracy)
    batch = cpu_benchmark.sample("train", tasks, torch.Generator().manual_seed(2))
    cpu64 = cpu.double()
    reference_grad = ctx.reference(gradients(cpu64, lambda: cpu64.meta_loss(batch.to("cpu", torch.float64))[0].backward()))
    del cpu, cpu64, cpu_benchmark
    ctx.sink.add(make_row("precision", f"MAML Conv-4 test-pool accuracy, fp32 on the CPU (the reference; {weights})",
                          cpu_accuracy, metric, tasks=pool, eval_s=round(cpu_seconds, 2)))

    fp32_accuracy = None
    for mode, label in PRECISIONS.items():
        algorithm.load_state_dict(trained)

        def autocast(mode: str = mode) -> Any:
            if mode == "bf16":
                return torch.autocast(device.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        with tf32(mode == "tf32"):
            on_device = batch.to(device)

            def meta_gradient() -> None:
                with autocast():
                    loss = algorithm.meta_loss(on_device)[0]
                loss.backward()
            got = gradients(algorithm, meta_gradient)
            grad_error = relative_error(got, reference_grad)
            train_memory: dict[str, float] = {}
            with peak_memory(device, train_memory):
                steps_per_s = rate(ctx.train_step(benchmark, algorithm, optimizer, tasks, autocast), device, sizes)
            algorithm.load_state_dict(trained)  # the pool is scored with the run's weights, not the timed steps'
            eval_memory: dict[str, float] = {}
            started = time.perf_counter()
            with peak_memory(device, eval_memory), autocast():
                accuracy = evaluate_pool(algorithm, benchmark, "test", pool, seed, device,
                                         int(cfg.trainer.eval_batch_size))[metric].mean
            eval_seconds = time.perf_counter() - started
        if mode == "fp32":
            fp32_accuracy = accuracy
        difference = abs(accuracy - reference_accuracy) * 100
        ctx.sink.add(make_row(
            "precision", f"MAML Conv-4, {label}: test-pool accuracy (meta-batch {tasks}, {pool} tasks)",
            accuracy, metric, peak_gpu_mib=max(train_memory.get("peak", 0), eval_memory.get("peak", 0)) or None,
            check=check(f"abs(accuracy - CPU fp32) in points ({pool} tasks)", difference, TOL_ACCURACY_POINTS[mode]),
            note="TF32 is a CUDA setting: no effect on the CPU" if mode == "tf32" and device.type == "cpu" else "",
            vs_fp32_points=None if fp32_accuracy is None else round((accuracy - fp32_accuracy) * 100, 3),
            meta_it_per_s=round(steps_per_s, 3), train_peak_mib=train_memory.get("peak"),
            eval_peak_mib=eval_memory.get("peak"), eval_s=round(eval_seconds, 2),
            grad_rel_err_vs_cpu_f64=float(f"{grad_error:.3g}")))


COMPILE_MODELS = {
    "maml-second-order": ("MAML Conv-4 second order (double backward)", PRESET_MAML, ["algo.first_order=false"]),
    # the smallest graph with a double backward (tiny: the test compiles this one, seconds instead of a minute)
    "maml-sine-second-order": ("MAML sine MLP second order (double backward)", "maml_sine", []),
    "maml-first-order": ("MAML Conv-4 first order", PRESET_MAML, ["algo.first_order=true"]),
    "protonet-60way": ("ProtoNet 60-way Conv-4", PRESET_PROTONET, []),
}


def section_compile(ctx: Context) -> None:
    """torch.compile(meta_loss) on/off for each model: compile time, compiled and eager it/s, peak memory, and the
    compiled meta-gradient against the eager one (TF32 off for both). An exception while compiling or running the
    compiled step (double backward through AOTAutograd is refused) is the row's result: `unsupported`."""
    import torch

    device, sizes = ctx.device, ctx.sizes
    for key in sizes.compile_models:
        label, preset, extra = COMPILE_MODELS[key]
        on_omniglot = preset != "maml_sine"
        overrides = [*([f"benchmark.root={ctx.data_root}", *ctx.data_overrides] if on_omniglot else []), *extra]
        if preset == PRESET_MAML and sizes.maml_meta_batch:
            overrides.append(f"trainer.meta_batch_size={sizes.maml_meta_batch}")
        if preset == PRESET_PROTONET and sizes.protonet_ways:
            overrides.append(f"algo.train_ways={sizes.protonet_ways}")
        torch._dynamo.reset()
        cfg, benchmark, algorithm, optimizer = build_preset(preset, overrides, device)
        tasks = int(cfg.trainer.meta_batch_size)
        initial = {k: v.detach().clone() for k, v in algorithm.state_dict().items()}
        shape = dict(algorithm.train_episode())
        batch = benchmark.sample("train", tasks, torch.Generator().manual_seed(3), **shape).to(device)
        name = f"torch.compile({key}: {label}), backend {ctx.compile_backend}, {tasks} task{'s' if tasks > 1 else ''}/step"
        with tf32(False):
            eager_grads = gradients(algorithm, lambda: algorithm.meta_loss(batch)[0].backward())
            eager_memory: dict[str, float] = {}
            with peak_memory(device, eager_memory):
                eager_rate = rate(ctx.train_step(benchmark, algorithm, optimizer, tasks), device, sizes)
            algorithm.load_state_dict(initial)
            compiled = torch.compile(algorithm.meta_loss, backend=ctx.compile_backend, dynamic=False)
            started = time.perf_counter()
            try:
                compiled_grads = gradients(algorithm, lambda: compiled(batch)[0].backward())
                sync(device)
            except Exception as ex:  # the result being measured: does compile work with this model?
                ctx.sink.add(make_row("compile", name, None, "it/s", status="unsupported", note=first_line(ex),
                                      eager_it_per_s=round(eager_rate, 3), eager_peak_mib=eager_memory.get("peak"),
                                      failed_after_s=round(time.perf_counter() - started, 1)))
                continue
            compile_seconds = time.perf_counter() - started
            error = relative_error(compiled_grads, eager_grads)
            compiled_memory: dict[str, float] = {}
            with peak_memory(device, compiled_memory):
                compiled_rate = rate(ctx.train_step(benchmark, algorithm, optimizer, tasks, meta_loss=compiled),
                                     device, sizes)
        ctx.sink.add(make_row(
            "compile", name, compiled_rate, "it/s", peak_gpu_mib=compiled_memory.get("peak"),
            check=check("compiled vs eager meta-gradient, rel. error (TF32 off)", error, TOL_COMPILED),
            eager_it_per_s=round(eager_rate, 3), speedup=round(compiled_rate / eager_rate, 3),
            compile_s=round(compile_seconds, 1), eager_peak_mib=eager_memory.get("peak")))


WORKER_SECTIONS: dict[str, Callable[[Context], None]] = {
    "reference": section_reference, "episodes": section_episodes, "precision": section_precision,
    "compile": section_compile}


def worker(args: argparse.Namespace) -> int:
    """A subprocess running some in-process sections on the device, its rows appended to --rows as measured."""
    import torch

    from metarun.runtime import configure_runtime

    configure_runtime(SIZES[json.loads(args.worker_settings)["size"]].threads)
    settings = json.loads(args.worker_settings)
    sizes = SIZES[settings["size"]]
    if settings.get("compile_models"):
        sizes = dataclasses.replace(sizes, compile_models=tuple(settings["compile_models"]))
    ctx = Context(device=torch.device(settings["device"]), sizes=sizes,
                  data_root=settings["data_root"], data_overrides=settings["data_overrides"],
                  sink=RowSink(Path(args.rows)), perturb=settings["perturb"], checkpoint=settings["checkpoint"],
                  compile_backend=settings["compile_backend"])
    for section in args.worker.split(","):
        started = time.perf_counter()
        try:
            WORKER_SECTIONS[section](ctx)
        except Exception as ex:  # recorded as the section's error row; the other sections still run
            traceback.print_exc()
            ctx.sink.add(make_row(section, f"{section} section", status="error", note=first_line(ex)))
        ctx.sink.mark(section, time.perf_counter() - started)
    return 0


# -- the metarun CLI, with peak GPU memory recorded --------------------------------------------------------------


def exec_metarun(peak_file: str, argv: list[str]) -> None:
    """`metarun <argv>` exactly as the console script runs it, writing torch.cuda.max_memory_allocated at exit
    (the CLI itself reports no memory)."""
    import atexit

    import torch

    def record() -> None:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        Path(peak_file).write_text(json.dumps({"peak_bytes": peak}))

    atexit.register(record)
    from metarun.cli import main

    sys.argv = ["metarun", *argv]
    main(argv)


# -- data ------------------------------------------------------------------------------------------------------


def data_candidates(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit).expanduser()]
    found = [Path(os.environ["METARUN_DATA"]) / "omniglot"] if os.environ.get("METARUN_DATA") else []
    return [*found, ROOT / "shared" / "data" / "omniglot", ROOT.parent / "shared" / "data" / "omniglot"]


def full_fixture_alphabets() -> tuple[dict[str, int], dict[str, int]]:
    """The real alphabets and their character counts, read off the shipped Vinyals lists (background: alphabets
    without test characters): a fixture with these names takes the presets' Vinyals and random splits unchanged."""
    from metarun.benchmarks.omniglot_source import vinyals_lines

    counts: dict[str, set[str]] = {}
    tested: set[str] = set()
    for split in ("train", "val", "test"):
        for line in vinyals_lines(split):
            alphabet, character, _ = line.split("/")
            counts.setdefault(alphabet, set()).add(character)
            if split == "test":
                tested.add(alphabet)
    sizes = {alphabet: len(chars) for alphabet, chars in sorted(counts.items())}
    return ({a: n for a, n in sizes.items() if a not in tested}, {a: n for a, n in sizes.items() if a in tested})


def prepare_data(args: argparse.Namespace, sizes: Sizes, work: Path) -> dict[str, Any]:
    """The Omniglot root the check uses, and what it is (real or fixture); decodes it once into the work cache."""
    explicit = args.data
    real = None
    if not args.fixture and (explicit or sizes.fixture == "full"):
        real = next((c for c in data_candidates(explicit) if (c / "omniglot-py").is_dir()), None)
        if explicit and real is None:
            raise UsageError(f"--data {explicit}: no omniglot-py/ folder there (torchvision layout)")
    info: dict[str, Any]
    if real is not None:
        info = {"kind": "real", "root": str(real), "source": f"real Omniglot at {real}"}
    elif not args.fixture and sizes.fixture == "full" and PACKED_OMNIGLOT.is_file():
        with tarfile.open(PACKED_OMNIGLOT) as archive:
            archive.extractall(work, filter="data") if sys.version_info >= (3, 12) else archive.extractall(work)
        info = {"kind": "real", "root": str(work / "omniglot"),
                "source": f"real Omniglot unpacked from {PACKED_OMNIGLOT.relative_to(ROOT)}"}
    else:
        from tests.image_fixtures import omniglot_tree

        root = work / "fixture-omniglot"
        if sizes.fixture == "full":
            background, evaluation = full_fixture_alphabets()
            what = "1,623 characters with the real alphabets' names and counts, 20 drawers, 28x28 random strokes"
        else:
            background, evaluation = {f"Alphabet_{c}": 6 for c in "ABCDEF"}, {"Script_X": 2, "Script_Y": 2}
            what = "40 characters, 20 drawers, 14x14 random strokes"
        omniglot_tree(root, background, evaluation, size=28 if sizes.fixture == "full" else 14)
        info = {"kind": "fixture", "root": str(root),
                "source": f"generated fixture (tests/image_fixtures.py, real on-disk format): {what}"}
    # a small fixture cannot give the Vinyals split ProtoNet's preset names: MAML's random split instead
    info["overrides"] = ["benchmark.split_scheme=random"] if info["kind"] == "fixture" and sizes.fixture == "small" else []
    started = time.perf_counter()
    from metarun.benchmarks.omniglot import OmniglotBenchmark

    OmniglotBenchmark(root=info["root"], split_scheme="random", decode_workers=min(8, os.cpu_count() or 1))
    info["decode_s"] = round(time.perf_counter() - started, 1)
    return info


class UsageError(Exception):
    """Bad command-line input: one line, exit 2."""


# -- the orchestrator ------------------------------------------------------------------------------------------


class Run:
    """One invocation: its settings, the rows gathered, the sections' outcomes and the log."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, work: Path, out: Path) -> None:
        self.args, self.sizes, self.work, self.out = args, sizes, work, out
        self.device = "cpu" if args.cpu else "cuda"
        self.rows: list[dict[str, Any]] = []
        self.sections: dict[str, dict[str, Any]] = {}
        self.started = time.perf_counter()
        self.log = open(out / LOG_NAME, "w")
        self.data: dict[str, Any] = {}
        self.checkpoint: str | None = None
        self.environment = environment(self.device, args.compile_backend)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.started)

    def note(self, text: str) -> None:
        stamp = f"[{time.perf_counter() - self.started:6.1f} s] "
        print(stamp + text, flush=True)
        self.log.write(stamp + text + "\n")
        self.log.flush()

    def limit(self, section: str) -> float | None:
        """This section's time limit (on CUDA its own, within what is left of the budget; on the CPU what is left),
        or None when too little of the budget is left to start it."""
        left = self.left()
        if left < SECTION_MIN_S:
            return None
        return left if self.device == "cpu" else min(SECTION_LIMIT_S[section], left)

    def start(self, argv: list[str], timeout: float, name: str) -> tuple[subprocess.Popen[str], Path, float, str]:
        """Start a subprocess (output to work/logs/<name>.log); `finish` waits for it."""
        self.note(f"{name}: {' '.join(argv)} (limit {timeout:.0f} s)")
        log_path = self.work / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "w") as handle:
            # a session of its own: a timeout kills its children too (bench.py's memory probes, decode workers)
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=self.work,
                                    start_new_session=True)
        return proc, log_path, time.perf_counter() + timeout, name

    def finish(self, started: tuple[subprocess.Popen[str], Path, float, str]) -> subprocess.CompletedProcess[str] | None:
        """Wait for a started subprocess until its deadline (then kill it); the end of its output goes to the log.
        None: it timed out."""
        proc, log_path, deadline, name = started
        timed_out = False
        try:
            proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        text = log_path.read_text(errors="replace")
        verdict = "timed out" if timed_out else f"exit {proc.returncode}"
        self.log.write(f"--- {name}: {verdict}; last lines of {log_path}:\n{text[-4000:]}\n---\n")
        self.log.flush()
        return None if timed_out else subprocess.CompletedProcess(proc.args, proc.returncode, text, "")

    def command(self, argv: list[str], timeout: float, name: str) -> subprocess.CompletedProcess[str] | None:
        """Run a subprocess to its end or its timeout (None)."""
        return self.finish(self.start(argv, timeout, name))

    def settle(self, section: str, status: str, seconds: float, note: str = "") -> None:
        self.sections[section] = {"status": status, "seconds": round(seconds, 1), "note": note}
        self.note(f"{section}: {status} in {seconds:.1f} s{': ' + note if note else ''}")

    def skip(self, section: str, why: str) -> None:
        self.rows.append(make_row(section, f"{section} section", status="skipped", note=why))
        self.settle(section, "skipped", 0.0, why)

    # -- sections run as subprocesses ------------------------------------------------------------------------

    def run_worker(self, sections: list[str], timeout: float, label: str, **extra: Any
                   ) -> tuple[subprocess.CompletedProcess[str] | None, list[dict[str, Any]], dict[str, float]]:
        """One worker process running `sections` in-process; (process or None if timed out, rows, sections done)."""
        rows_file = self.work / f"rows-{label}.jsonl"
        rows_file.unlink(missing_ok=True)
        settings = {"device": self.device, "size": self.args.size, "data_root": self.data["root"],
                    "data_overrides": self.data["overrides"], "perturb": self.args.perturb_reference,
                    "checkpoint": self.checkpoint, "compile_backend": self.args.compile_backend, **extra}
        proc = self.command([sys.executable, __file__, "--worker", ",".join(sections), "--rows", str(rows_file),
                             "--worker-settings", json.dumps(settings)], timeout, f"worker-{label}")
        rows, done = read_rows(rows_file)
        return proc, rows, done

    def worker_sections(self, names: list[str]) -> None:
        """In-process sections in one worker process (rows appended as measured)."""
        limits = [self.limit(n) for n in names]
        runnable = [n for n, lim in zip(names, limits) if lim is not None]
        for n in names:
            if n not in runnable:
                self.skip(n, f"time budget of {self.args.budget:.0f} s spent")
        if not runnable:
            return
        timeout = self.left() if self.device == "cpu" else min(sum(SECTION_LIMIT_S[n] for n in runnable), self.left())
        started = time.perf_counter()
        proc, rows, done = self.run_worker(runnable, timeout, "-".join(runnable))
        self.rows += rows
        for n in runnable:
            if n in done:
                errored = any(r["section"] == n and r["status"] == "error" for r in rows)
                self.settle(n, "error" if errored else "ok", done[n])
            else:
                why = (f"timed out after {timeout:.0f} s" if proc is None else
                       f"worker exited {proc.returncode} before finishing it (see {LOG_NAME})")
                self.rows.append(make_row(n, f"{n} section", status="error", note=why))
                self.settle(n, "error", time.perf_counter() - started, why)

    def compile_section(self) -> None:
        """Each model's torch.compile measurement in a worker of its own, under its own time limit: a compile that
        crashes the process or does not finish in time is that model's result (`unsupported`), not the check's end."""
        if self.limit("compile") is None:
            return self.skip("compile", f"time budget of {self.args.budget:.0f} s spent")
        started = time.perf_counter()
        errors = []
        for model in self.sizes.compile_models:
            left = self.left()
            if left < SECTION_MIN_S:
                self.rows.append(make_row("compile", f"torch.compile({model})", status="skipped",
                                          note=f"time budget of {self.args.budget:.0f} s spent"))
                errors.append(model)
                continue
            timeout = left if self.device == "cpu" else min(COMPILE_MODEL_LIMIT_S, left)
            proc, rows, done = self.run_worker(["compile"], timeout, f"compile-{model}", compile_models=[model])
            self.rows += rows
            if "compile" not in done:
                why = (f"compiling and running did not finish within {timeout:.0f} s (killed)" if proc is None else
                       f"the process died (exit {proc.returncode}) while compiling or running (see {LOG_NAME})")
                self.rows.append(make_row("compile", f"torch.compile({model}: {COMPILE_MODELS[model][0]})", None,
                                          "it/s", status="unsupported", note=why))
            if any(r["status"] == "error" for r in rows):
                errors.append(model)
        self.settle("compile", "error" if errors else "ok", time.perf_counter() - started)

    def start_bench(self) -> dict[str, Any] | None:
        """Start scripts/bench.py on the device (None: no time left for it)."""
        limit = self.limit("bench")
        if limit is None:
            self.skip("bench", f"time budget of {self.args.budget:.0f} s spent")
            return None
        sizes = self.sizes
        figures_file = self.work / "bench.json"
        figures_file.unlink(missing_ok=True)
        argv = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", self.device, "--setup", "sine", "conv4",
                "--rounds", str(sizes.bench_rounds), "--seconds", str(sizes.bench_seconds), "--json", str(figures_file),
                *(["--meta-batch", str(sizes.bench_meta_batch)] if sizes.bench_meta_batch else []),
                *([] if sizes.bench_memory else ["--no-memory"]),
                *(["--threads", str(sizes.threads)] if sizes.threads else [])]
        return {"started": time.perf_counter(), "file": figures_file, "handle": self.start(argv, limit, "bench")}

    def finish_bench(self, state: dict[str, Any] | None) -> None:
        """bench.py's figures, read from its --json: one row per setup and variant."""
        if state is None:
            return
        proc = self.finish(state["handle"])
        seconds, figures_file = time.perf_counter() - state["started"], state["file"]
        if proc is None or proc.returncode != 0 or not figures_file.is_file():
            output = "" if proc is None else proc.stdout
            disagree = "meta-gradients disagree" in output
            why = "timed out" if proc is None else (output.strip().splitlines() or ["no output"])[-1][:300]
            self.rows.append(make_row("bench", "scripts/bench.py --device " + self.device,
                                      status="failed" if disagree else "error", note=why,
                                      check=check("bench.py's float64 check", math.inf, TOL_FLOAT64) if disagree else None))
            return self.settle("bench", "failed" if disagree else "error", seconds, why)
        figures = json.loads(figures_file.read_text())
        for setup, table in figures["setups"].items():
            tolerance = table["gradient_tolerance"]
            for variant, f in table["variants"].items():
                on_gpu = self.device == "cuda"
                target = met = None
                if on_gpu and setup == "conv4" and variant.startswith("metarun"):
                    target, met = f">= {TARGET_CONV4_VS_LOOP:g}x the loop", f["vs_loop"] >= TARGET_CONV4_VS_LOOP
                peak = None if f["peak_bytes"] is None else f["peak_bytes"] / 2**20
                self.rows.append(make_row(
                    "bench", f"{setup}: {variant} (meta-batch {table['meta_batch']})", f["meta_it_per_s"], "meta-it/s",
                    peak_gpu_mib=peak if on_gpu else None, target=target, target_met=met,
                    check=check(f"float64 meta-gradient vs the per-task loop on {self.device}", f["grad_rel_err"],
                                tolerance),
                    vs_loop=round(f["vs_loop"], 3), memory_vs_loop=f["memory_vs_loop"] and round(f["memory_vs_loop"], 3),
                    peak_rss_growth_mib=None if on_gpu or peak is None else round(peak, 1),
                    gflops=f["gflops"] and round(f["gflops"], 1),
                    matmul_gflops=table["matmul_gflops"] and round(table["matmul_gflops"], 1)))
        self.settle("bench", "ok", seconds)

    def start_train(self, name: str, overrides: dict[str, str], timeout: float) -> dict[str, Any]:
        """Start `metarun train` with these overrides (through exec_metarun, which records peak GPU memory)."""
        run_dir = self.work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        peak_file = self.work / f"peak-{name}.json"
        peak_file.unlink(missing_ok=True)
        argv = ["train", *(f"{k}={v}" for k, v in overrides.items()), f"hydra.run.dir={run_dir}"]
        return {"run_dir": run_dir, "peak_file": peak_file, "started": time.perf_counter(),
                "handle": self.start([sys.executable, __file__, "--exec-metarun", str(peak_file), *argv], timeout, name)}

    def finish_train(self, run: dict[str, Any]) -> dict[str, Any]:
        """Wait for a started `metarun train`: adds proc (None: timed out), seconds and peak (MiB or None)."""
        run["proc"] = self.finish(run["handle"])
        run["seconds"] = time.perf_counter() - run["started"]
        run["peak"] = None
        if run["peak_file"].is_file():
            value = json.loads(run["peak_file"].read_text())["peak_bytes"]
            run["peak"] = None if value is None else value / 2**20
        return run

    @staticmethod
    def failure(proc: subprocess.CompletedProcess[str] | None) -> str | None:
        """None when the process succeeded, else why not (its last output line)."""
        if proc is None:
            return "timed out"
        if proc.returncode != 0:
            return f"exit {proc.returncode}: " + (proc.stdout.strip().splitlines() or [""])[-1][:300]
        return None

    def start_train_section(self) -> dict[str, Any] | None:
        """The runs of the train section: the maml_omniglot_5w1s preset for `train_steps` on the device, and its
        first `reference_steps` steps again on the device and on the CPU (the same episodes and initial weights: the
        task stream and the initialisation are seeded on the CPU). On the CPU the three start at once; on CUDA they
        run one at a time in finish_train_section, the timed run first and alone. None: no time left."""
        limit = self.limit("train")
        if limit is None:
            self.skip("train", f"time budget of {self.args.budget:.0f} s spent")
            return None
        sizes = self.sizes
        base = {"experiment": PRESET_MAML, "benchmark.root": self.data["root"],
                **dict(o.split("=", 1) for o in (*self.data["overrides"], *sizes.train_overrides))}
        main = {**base, "trainer.steps": str(sizes.train_steps), "device": self.device}
        short = {**base, "trainer.steps": str(sizes.reference_steps), "trainer.log_every": "1",
                 "trainer.val_tasks": "4", "trainer.eval_tasks": "4", "logger.tensorboard": "false",
                 "logger.console": "false"}
        state: dict[str, Any] = {
            "started": time.perf_counter(), "shown": "metarun train " + " ".join(f"{k}={v}" for k, v in main.items()),
            "runs": {"preset": main, "first-steps-device": {**short, "device": self.device},
                     "first-steps-cpu": {**short, "device": "cpu"}}, "pending": {}}
        if self.device == "cpu":  # timings on the CPU mean nothing here: the three runs side by side
            state["pending"] = {name: self.start_train(name, o, limit) for name, o in state["runs"].items()}
        return state

    def finish_train_section(self, state: dict[str, Any] | None) -> None:
        """Wait for (or run) the train section's runs; its rows: the preset's rate, projection, accuracy and peak
        memory, and the first steps' losses against the CPU's."""
        if state is None:
            return
        sizes = self.sizes
        done: dict[str, dict[str, Any]] = {}
        if not state["pending"]:  # CUDA: the timed run alone, then the two short ones side by side (nothing timed)
            left = min(self.left(), SECTION_LIMIT_S["train"])
            runs = state["runs"]
            state["pending"]["preset"] = self.start_train("preset", runs["preset"], left)
            done["preset"] = self.finish_train(state["pending"]["preset"])
            left = min(self.left(), SECTION_LIMIT_S["train"])
            for name in ("first-steps-device", "first-steps-cpu"):
                if left >= SECTION_MIN_S:
                    state["pending"][name] = self.start_train(name, runs[name], left)
                else:
                    done[name] = {"proc": None, "skipped": True}
        for name, run in state["pending"].items():
            if name not in done:
                done[name] = self.finish_train(run)
        preset, shown = done["preset"], state["shown"]
        why = "time budget spent" if preset.get("skipped") else self.failure(preset["proc"])
        if why:
            self.rows.append(make_row("train", shown, status="error", note=why))
        else:
            self.rows.append(self._train_row(preset["run_dir"], shown, preset["peak"], preset["seconds"]))
            best = preset["run_dir"] / "checkpoints" / "best.pt"
            self.checkpoint = str(best if best.is_file() else preset["run_dir"] / "checkpoints" / "last.pt")
        name = f"training loss of steps 1-{sizes.reference_steps}: {self.device} vs CPU (same episodes and weights)"
        problems = ["time budget spent" if run.get("skipped") else self.failure(run["proc"])
                    for run in (done["first-steps-device"], done["first-steps-cpu"])]
        if any(problems):
            self.rows.append(make_row("train", name, status="error", note="; ".join(filter(None, problems))))
        else:
            device_losses = self._losses(done["first-steps-device"]["run_dir"])
            cpu_losses = self._losses(done["first-steps-cpu"]["run_dir"])
            reference = [x * (1 + PERTURBATION) for x in cpu_losses] if self.args.perturb_reference else cpu_losses
            if not device_losses or len(device_losses) != len(reference):
                self.rows.append(make_row("train", name, status="error",
                                          note=f"{len(device_losses)} device and {len(reference)} CPU losses logged"))
            else:
                error = max(abs(d - r) / max(abs(r), 1e-12) for d, r in zip(device_losses, reference))
                self.rows.append(make_row(
                    "train", name, error, "rel. error",
                    check=check("max relative difference of the logged train/loss", error, TOL_TRAIN_LOSS),
                    device_losses=[round(x, 6) for x in device_losses], cpu_losses=[round(x, 6) for x in cpu_losses]))
        statuses = {r["status"] for r in self.rows if r["section"] == "train"}
        self.settle("train", "error" if "error" in statuses else "failed" if "failed" in statuses else "ok",
                    time.perf_counter() - state["started"])

    def _losses(self, run_dir: Path) -> list[float]:
        return [line["train/loss"] for line in self._jsonl(run_dir) if "train/loss" in line]

    @staticmethod
    def _jsonl(run_dir: Path) -> list[dict[str, Any]]:
        path = run_dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    def _train_row(self, run_dir: Path, shown: str, peak: float | None, seconds: float) -> dict[str, Any]:
        """it/s between the first and last training log lines (start-up, validation and test excluded), the
        validation's cost (the val line after the last training line), and the 60,000-step projection."""
        lines = self._jsonl(run_dir)
        train = [x for x in lines if "train/loss" in x]
        if len(train) < 2:
            return make_row("train", shown, status="error",
                            note=f"{len(train)} training log lines in metrics.jsonl: no rate")
        first, last = train[0], train[-1]
        its = (last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9)
        val = [x for x in lines if x["step"] == last["step"] and any(k.startswith("val/") for k in x)]
        val_s = val[0]["time"] - last["time"] if val else None
        from omegaconf import OmegaConf

        saved = run_dir / ".hydra" / "config.yaml"
        eval_every = int(OmegaConf.load(saved).trainer.eval_every) if saved.is_file() else 2000
        validations = PAPER_STEPS // eval_every
        projected_min = (PAPER_STEPS / its + (validations * val_s if val_s else 0.0)) / 60
        results_file = run_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        return make_row(
            "train", shown, its, "it/s", peak_gpu_mib=peak if self.device == "cuda" else None,
            target=f"{PAPER_STEPS:,} steps < {TARGET_60K_MINUTES:g} min" if self.device == "cuda" else None,
            target_met=projected_min < TARGET_60K_MINUTES if self.device == "cuda" else None,
            note=f"it/s over steps {first['step']}-{last['step']} from metrics.jsonl `time`; peak GPU memory over the "
                 "whole run (training, validation and test)",
            projected_60k_min=round(projected_min, 2), training_only_60k_min=round(PAPER_STEPS / its / 60, 2),
            validation_s=None if val_s is None else round(val_s, 2), validations_in_60k=validations,
            test_accuracy=results.get("mean"), test_ci95=results.get("ci95"), test_tasks=results.get("tasks"),
            wall_s=round(seconds, 1))

    # -- the whole run ---------------------------------------------------------------------------------------

    def run(self, sections: list[str]) -> int:
        """The sections in order. On CUDA each in-process group has a worker process of its own (a hang or crash in
        one, torch.compile say, costs only its rows); on the CPU one worker runs them all after train (fewer
        start-ups: the test stays short)."""
        chosen = set(sections)
        ordered = [s for s in SECTIONS if s in chosen]
        if self.device == "cuda":
            for group in (["reference"], ["bench"], ["train"], ["episodes", "precision"], ["compile"]):
                group = [s for s in group if s in chosen]
                if group == ["bench"]:
                    self.finish_bench(self.start_bench())
                elif group == ["train"]:
                    self.finish_train_section(self.start_train_section())
                elif group == ["compile"]:
                    self.compile_section()
                elif group:
                    self.worker_sections(group)
                if group:
                    self.write_report(ordered, complete=False)
        else:  # bench.py and the train runs side by side, then one worker for the rest
            bench = self.start_bench() if "bench" in chosen else None
            train = self.start_train_section() if "train" in chosen else None
            self.finish_bench(bench)
            self.finish_train_section(train)
            self.write_report(ordered, complete=False)
            group = [s for s in ("reference", "episodes", "precision") if s in chosen]
            if group:
                self.worker_sections(group)
            if "compile" in chosen:
                self.compile_section()
        return self.finish_run(ordered)

    def finish_run(self, sections: list[str]) -> int:
        """Write the final JSON and Markdown table, print the table; the exit status."""
        code = self.write_report(sections, complete=True)
        print((self.out / MARKDOWN_NAME).read_text(), flush=True)
        self.note(f"wrote {self.out / JSON_NAME} and {self.out / MARKDOWN_NAME}; exit {code}")
        self.log.close()
        return code

    def write_report(self, sections: list[str], complete: bool) -> int:
        """The JSON and the Markdown table of the rows so far (also after each section: a run killed at the device's
        time limit still leaves every figure it measured); returns the exit status they imply."""
        failed = [r["name"] for r in self.rows if r["status"] == "failed"]
        broken = [r["name"] for r in self.rows if r["status"] in ("error", "skipped")]
        code = exit_status(self.rows)
        checks = [r for r in self.rows if r["check"] is not None]
        targets = [r for r in self.rows if r["target"] is not None]
        report = {
            "schema": SCHEMA, "tool": "scripts/gpu_check.sh", "command": self.args.shown_command, "complete": complete,
            "mode": self.device, "size": self.args.size, "sections_run": sections,
            "started_utc": self.args.started_utc, "wall_s": round(time.perf_counter() - self.started, 1),
            "budget_s": self.args.budget, "perturbed_reference": self.args.perturb_reference,
            "environment": self.environment, "data": self.data,
            "tolerances": {"float64_rel": TOL_FLOAT64, "float32_rel": TOL_FLOAT32, "train_loss_rel": TOL_TRAIN_LOSS,
                           "compiled_rel": TOL_COMPILED, "accuracy_points": TOL_ACCURACY_POINTS},
            "sections": self.sections, "rows": self.rows,
            "summary": {"checks": len(checks), "checks_passed": sum(r["check"]["passed"] for r in checks),
                        "failed": failed, "errors_or_skipped": broken,
                        "targets": len(targets), "targets_met": sum(bool(r["target_met"]) for r in targets),
                        "exit_code": code},
        }
        for name, text in ((JSON_NAME, json.dumps(report, indent=2) + "\n"), (MARKDOWN_NAME, render_markdown(report))):
            partial = self.out / f".{name}.tmp"
            partial.write_text(text)
            partial.replace(self.out / name)  # never half a file, whenever the run is stopped
        return code


def exit_status(rows: list[dict[str, Any]]) -> int:
    """1 when a result differs from its reference beyond tolerance (whatever else happened), else 3 when a section
    crashed, timed out or was skipped, else 0 (an `unsupported` result, such as compile refusing double backward, is
    a measured answer, not a failure)."""
    statuses = {r["status"] for r in rows}
    return 1 if "failed" in statuses else 3 if statuses & {"error", "skipped"} else 0


def environment(device: str, backend: str) -> dict[str, Any]:
    import torch

    import metarun

    env: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
                           "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "metarun": metarun.__version__,
                           "tf32_defaults": tf32_state(), "compile_backend": backend, "commit": git_commit()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"sm_{props.major}{props.minor}", multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count())
    else:
        env.update(device_name=f"CPU ({platform.processor() or platform.machine()})")
    return env


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "rel. error":
        return f"{value:.1e}"
    if unit == "accuracy":
        return f"{value:.2%}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def render_markdown(report: dict[str, Any]) -> str:
    """One table with every row of the report, under a header naming the machine, the data and the outcome."""
    env, data, summary = report["environment"], report["data"], report["summary"]
    where = (f"{env['device_name']} ({env.get('gpu_memory_gib')} GiB, {env.get('capability')}), CUDA "
             f"{env['cuda_runtime']}, cuDNN {env.get('cudnn')}" if report["mode"] == "cuda" else env["device_name"])
    lines = [
        f"# metarun GPU check: {env['device_name']} ({report['mode']}, size {report['size']})", "",
        f"`{report['command']}` at {report['started_utc']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s "
        f"budget. {where}; torch {env['torch']}, Python {env['python']}, {env['cpu_count']} CPU cores; metarun "
        f"{env['metarun']}{' at ' + env['commit'] if env.get('commit') else ''}.",
        f"Data: {data.get('source', 'none')}" + (f" (overrides: {' '.join(data['overrides'])})" if data.get("overrides")
                                                 else "") + ".",
        f"TF32 defaults here: {', '.join(f'{k}={v}' for k, v in env['tf32_defaults'].items())}.",
        *(["**Perturbed CPU reference (--perturb-reference): the checks are meant to fail.**"]
          if report["perturbed_reference"] else []),
        *([f"**Partial: written after sections {', '.join(report['sections'])}; the run has not finished.**"]
          if not report["complete"] else []),
        "",
        "| section | measurement | value | unit | details | peak GPU MiB | target | check: error <= tolerance | status |",
        "| --- | --- | ---: | --- | --- | ---: | --- | --- | --- |",
    ]
    for row in report["rows"]:
        details = "; ".join(f"{k}={v}" for k, v in row["details"].items())
        if row["note"]:
            details = f"{details}; {row['note']}" if details else row["note"]
        target = "" if row["target"] is None else f"{row['target']}: {'met' if row['target_met'] else 'NOT met'}"
        c = row["check"]
        checked = "" if c is None else f"{c['what']}: {c['error']:.2g} <= {c['tolerance']:g} " \
                                       f"{'yes' if c['passed'] else 'NO'}"
        cells = [row["section"], row["name"], _number(row["value"], row["unit"]), row["unit"], details,
                 "" if row["peak_gpu_mib"] is None else f"{row['peak_gpu_mib']:,.0f}", target, checked, row["status"]]
        lines.append("| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in cells) + " |")
    verdict = {0: "every check within tolerance", 1: "a result differs from its reference beyond tolerance",
               3: "a section crashed, timed out or was skipped"}[summary["exit_code"]]
    lines += ["", f"{summary['checks_passed']} of {summary['checks']} checks within tolerance; "
                  f"{summary['targets_met']} of {summary['targets']} targets met; exit {summary['exit_code']}: {verdict}.",
              ""]
    return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run everything on the CPU (default size small)")
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json/.md/.log (default %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on CUDA, small with --cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--data", default=None, help="an Omniglot root (holding omniglot-py/); default: found, else a fixture")
    parser.add_argument("--fixture", action="store_true", help="use the generated fixture even when real data is found")
    parser.add_argument("--work", default=None, help="scratch folder (runs, cache, fixture); default a new temp folder")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: by size)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor on CUDA, aot_eager with --cpu: no C++ build)")
    parser.add_argument("--perturb-reference", action="store_true",
                        help="scale every CPU reference by 1.05 (+5 points for accuracies): the run must exit 1")
    parser.add_argument("--prepare", action="store_true",
                        help="pack hydra-core/omegaconf and real Omniglot into build/gpu_check for an offline device")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or ("small" if args.cpu else "full")
    args.budget = args.budget if args.budget is not None else SIZES[args.size].budget_s
    args.compile_backend = args.compile_backend or ("aot_eager" if args.cpu else "inductor")
    return args


def fail(message: str, code: int = 2) -> int:
    print(f"gpu_check: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--exec-metarun"]:
        problem = bootstrap()
        if problem:
            return fail(problem)
        exec_metarun(argv[1], argv[2:])
        return 0
    args = parse(argv)
    if args.prepare:
        return prepare()
    problem = bootstrap()
    if problem:
        return fail(problem)
    if args.worker:
        return worker(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        return fail(f"--sections: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}")
    sections = [s for s in SECTIONS if s in sections]  # the order that lets precision use train's checkpoint
    import torch

    if not args.cpu and not torch.cuda.is_available():
        return fail(f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda}); "
                    "run with --cpu for the CPU check")
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).expanduser().resolve() if args.work else Path(tempfile.mkdtemp(prefix="metarun-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["METARUN_CACHE"] = str(work / "cache")  # decoded once here, then every run's cache hit
    os.environ.setdefault("COLUMNS", "200")
    if SIZES[args.size].threads:  # tiny: one thread each, as the test suite runs (no threads spinning on a busy CPU)
        os.environ["OMP_NUM_THREADS"] = str(SIZES[args.size].threads)
    args.started_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.shown_command = "scripts/gpu_check.sh " + " ".join(argv)
    run = Run(args, SIZES[args.size], work, out)
    run.note(f"gpu_check on {run.device}, size {args.size}, budget {args.budget:.0f} s; work folder {work}")
    try:
        run.data = prepare_data(args, SIZES[args.size], work)
    except UsageError as ex:
        run.log.close()
        return fail(str(ex))
    run.note(f"data: {run.data['source']} (decoded into the cache in {run.data['decode_s']} s)")
    return run.run(sections)


if __name__ == "__main__":
    sys.exit(main())
