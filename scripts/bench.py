"""metarun's second-order MAML against the per-task loop and `higher`, its convex heads against qpth: one process.

For each setup, every variant's meta-gradient is first checked against the per-task loop in float64
(relative error <= 1e-8), so no speed comes from a wrong answer. Then the variants run interleaved
rounds after a warm-up (medians of meta-iterations/s, optimizer step included), and each variant's peak
memory is measured in a fresh subprocess (CPU: growth of peak RSS over the set-up; CUDA: peak allocated).
For the Conv-4, the meta-iteration's FLOPs (counted by torch's FlopCounterMode) give the achieved GFLOP/s,
printed against a float32 matmul's measured in the same run: how close to the machine's limit we are.

    python scripts/bench.py                          # sine, Conv-4 and the convex heads on CPU
    python scripts/bench.py --setup conv4 --device cuda
    python scripts/bench.py --setup sine conv4 --device cuda --json bench.json   # the figures as JSON too
    python scripts/bench.py --setup convex --convex-setup mini-5w1s mini-5w5s
    pip install ".[bench]"                           # adds `higher` (0.2.1) as a comparison; optional
    pip install qpth                                 # the convex heads' comparison (optional; needs numpy<2)

Setups: `sine` (MLP 40-40, meta-batch 25, K=10, 1 inner step, Finn et al.'s sine protocol) and `conv4`
(Omniglot 5-way 1-shot, 15 queries, meta-batch 32, Conv-4 with strided convolutions, 64 filters,
transductive BatchNorm, 1 inner step at lr 0.4: the MAML paper's Omniglot network). The Conv-4 runs on
random 28x28 images (the work does not depend on the pixels) unless --omniglot-root points at the data.

`convex` is scripts/bench_convex.py's measurement, its functions imported (one implementation): per setup, the
float32 forward and backward pass of the SVM head with metarun's solver (the one algo=metaoptnet uses) against
qpth (MetaOptNet's) on the same batch of tasks' features, and of the ridge heads (MetaOptNet-RR, R2-D2), every
gradient checked in float64 first (finite differences; qpth against metarun), in episodes/s. Without qpth its row
says so and the rest runs. bench_convex.py has more setups and cvxpylayers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from metarun.algorithms.base import task_loss
from metarun.algorithms.maml import MAML
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.sine import SineBenchmark
from metarun.episodes import TaskBatch
from metarun.models.cnn import ConvNet
from metarun.models.mlp import MLP
from metarun.runtime import CPU_IMAGE_TASK_CHUNK, configure_runtime

OMNIGLOT_5W1S = TaskSpec(name="omniglot", kind="classification", input_shape=(1, 28, 28), output_size=5,
                         ways=5, shots=1, queries=15)
GRADIENT_TOLERANCE = 1e-8
Step = Callable[[MAML, TaskBatch], None]  # one meta-gradient: accumulates into the parameters' .grad
# the convex heads' setups timed here (bench_convex.SETUPS): MetaOptNet's miniImageNet test episodes (Conv-4
# features) and its training episodes (5-way 15-shot, ResNet-12's 16000-d features), where qpth is compared
CONVEX_SETUPS = ["mini-5w1s", "mini-5w5s", "mini-train-5w15s"]


def convex_module() -> ModuleType:
    """scripts/bench_convex.py, imported from beside this file (scripts/ is no package; a test loads this file by
    path): its heads, checks and timing are the convex table's, not a copy."""
    name = "bench_convex"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("bench_convex.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


# -- the setups ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    meta_batch: int
    make_maml: Callable[[], MAML]
    sample: Callable[[int, torch.Generator], TaskBatch]
    description: str


def sine_setup(args: argparse.Namespace) -> Setup:
    bench = SineBenchmark()
    return Setup(
        "sine", 25,
        lambda: MAML(MLP([1], [40, 40]), bench.spec, inner_steps=1, inner_lr=0.01),
        lambda tasks, generator: bench.sample("train", tasks, generator),
        "MAML sine, MLP 40-40, meta-batch 25, K=10, 1 inner step, second order",
    )


def conv4_setup(args: argparse.Namespace) -> Setup:
    spec = OMNIGLOT_5W1S
    if args.omniglot_root:
        from metarun.benchmarks.omniglot import OmniglotBenchmark

        omniglot = OmniglotBenchmark(root=args.omniglot_root, ways=5, shots=1, queries=15, split_scheme="random")

        def sample(tasks: int, generator: torch.Generator) -> TaskBatch:
            return omniglot.sample("train", tasks, generator)
        source = "real Omniglot"
    else:
        def sample(tasks: int, generator: torch.Generator) -> TaskBatch:
            ways, shots, queries = spec.ways, spec.shots, spec.queries
            labels = torch.arange(ways).repeat_interleave
            return TaskBatch(
                support_x=torch.rand(tasks, ways * shots, *spec.input_shape, generator=generator),
                support_y=labels(shots).expand(tasks, -1).contiguous(),
                query_x=torch.rand(tasks, ways * queries, *spec.input_shape, generator=generator),
                query_y=labels(queries).expand(tasks, -1).contiguous(),
            )
        source = "random 28x28 images"
    return Setup(
        "conv4", 32,
        lambda: MAML(ConvNet(spec.input_shape, filters=64, stride=2, bn="transductive"), spec,
                     inner_steps=1, inner_lr=0.4),
        sample,
        f"MAML Conv-4 (strided, 64 filters) Omniglot 5w1s 15 queries, meta-batch 32, second order, {source}",
    )


SETUPS = {"sine": sine_setup, "conv4": conv4_setup}


def make_setup(name: str, args: argparse.Namespace) -> Setup:
    """SETUPS[name], its meta-batch replaced by --meta-batch when given (small runs: scripts/gpu_check.py --cpu)."""
    setup = SETUPS[name](args)
    if getattr(args, "meta_batch", None):
        setup.meta_batch = args.meta_batch
    return setup


# -- the variants ----------------------------------------------------------------------------------------------


def per_task_loop(maml: MAML, batch: TaskBatch) -> None:
    """How most paper code does it (and learn2learn's and higher's examples): one task at a time,
    torch.autograd.grad(create_graph=True) for the inner step, the task's query loss backpropagated at once."""
    names, params = zip(*maml.net.named_parameters())
    buffers = dict(maml.net.named_buffers())
    for t in range(batch.num_tasks):
        fast = list(params)
        for _ in range(maml.inner_steps):
            out = torch.func.functional_call(maml.net, ({**dict(zip(names, fast)), **buffers},), (batch.support_x[t],))
            grads = torch.autograd.grad(task_loss(maml.spec, out, batch.support_y[t])[0], fast,
                                        create_graph=not maml.first_order)
            fast = [p - maml.inner_lr * g for p, g in zip(fast, grads)]
        out = torch.func.functional_call(maml.net, ({**dict(zip(names, fast)), **buffers},), (batch.query_x[t],))
        (task_loss(maml.spec, out, batch.query_y[t])[0] / batch.num_tasks).backward()


def higher_loop(maml: MAML, batch: TaskBatch) -> None:
    """higher 0.2.1's MAML recipe: a differentiable SGD over a monkey-patched copy of the net, per task."""
    import higher

    inner = torch.optim.SGD(maml.net.parameters(), lr=maml.inner_lr)
    for t in range(batch.num_tasks):
        with higher.innerloop_ctx(maml.net, inner, copy_initial_weights=False,
                                  track_higher_grads=not maml.first_order) as (fnet, diffopt):
            for _ in range(maml.inner_steps):
                diffopt.step(task_loss(maml.spec, fnet(batch.support_x[t]), batch.support_y[t])[0])
            (task_loss(maml.spec, fnet(batch.query_x[t]), batch.query_y[t])[0] / batch.num_tasks).backward()


def metarun_step(chunk: int | None) -> Step:
    """metarun's MAML.meta_loss, in chunks of `chunk` tasks as the trainer runs it (None: all at once)."""
    def step(maml: MAML, batch: TaskBatch) -> None:
        size = chunk or batch.num_tasks
        for start in range(0, batch.num_tasks, size):
            part = batch.slice(start, start + size)
            (maml.meta_loss(part)[0] * (part.num_tasks / batch.num_tasks)).backward()
    return step


def grad_inside_vmap(maml: MAML, batch: TaskBatch) -> None:
    """The textbook torch.func formulation (vmap of a function that calls torch.func.grad), for reference."""
    params = dict(maml.net.named_parameters())
    buffers = dict(maml.net.named_buffers())

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return task_loss(maml.spec, torch.func.functional_call(maml.net, (p, buffers), (x,)), y)[0]

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        fast = params
        for _ in range(maml.inner_steps):
            grads = torch.func.grad(loss)(fast, sx, sy)
            fast = {k: p - maml.inner_lr * grads[k] for k, p in fast.items()}
        return loss(fast, qx, qy)

    torch.func.vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y).mean().backward()


def variants(setup: Setup, device: torch.device) -> dict[str, Step]:
    found: dict[str, Step] = {"per-task loop": per_task_loop}
    try:
        import higher  # noqa: F401

        found["higher 0.2.1"] = higher_loop
    except ImportError:
        pass
    if setup.name == "sine":
        found["torch.func grad-in-vmap"] = grad_inside_vmap
        found["metarun"] = metarun_step(None)
    else:
        chunks = [1, 2, CPU_IMAGE_TASK_CHUNK, None] if device.type == "cpu" else [None]
        # chunks as large as the meta-batch are the whole batch (None): one variant, not two of one name
        for chunk in dict.fromkeys(c for c in chunks if c is None or c < setup.meta_batch):
            found[f"metarun chunk {chunk or setup.meta_batch}"] = metarun_step(chunk)
    return found


# -- measurements ----------------------------------------------------------------------------------------------


def gradient_errors(setup: Setup, steps: dict[str, Step], device: torch.device) -> dict[str, float]:
    """Max relative error (per parameter tensor) of each variant's float64 meta-gradient against the loop's."""
    torch.manual_seed(0)
    maml = setup.make_maml().double().to(device)
    batch = setup.sample(3, torch.Generator().manual_seed(0)).to(device, torch.float64)

    def gradient(step: Step) -> list[Tensor]:
        maml.zero_grad(set_to_none=True)
        step(maml, batch)
        return [p.grad.clone() for p in maml.parameters()]

    reference = gradient(per_task_loop)
    errors = {}
    for name, step in steps.items():
        got = gradient(step)
        errors[name] = max(float((g - r).norm() / r.norm().clamp_min(1e-300)) for g, r in zip(got, reference))
    return errors


def make_iteration(setup: Setup, step: Step, device: torch.device, batches: list[TaskBatch]) -> Callable[[], None]:
    torch.manual_seed(0)
    maml = setup.make_maml().to(device)
    optimizer = torch.optim.Adam(maml.parameters(), 1e-3, foreach=True)
    cursor = iter(range(10**12))

    def iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        step(maml, batches[next(cursor) % len(batches)])
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iteration


def rate(iteration: Callable[[], None], seconds: float, minimum: int) -> float:
    """Meta-iterations/s over at least `seconds` and `minimum` iterations."""
    count, start = 0, time.perf_counter()
    while count < minimum or time.perf_counter() - start < seconds:
        iteration()
        count += 1
    return count / (time.perf_counter() - start)


def peak_memory_bytes(setup_name: str, variants: list[str], device: str,
                      meta_batch: int | None = None) -> dict[str, float]:
    """Peak memory of two meta-iterations of each variant, each in a fresh process so peaks do not mix. The
    processes run side by side: a peak is its own process's (RSS growth, or CUDA's allocator statistics), so
    running them together changes no figure, only the wall time (on a GPU machine, most of it CUDA start-ups)."""
    # random images: loading the real data would leave heap slack that hides small peaks (memory does not
    # depend on the pixels)
    procs = {}
    for variant in variants:
        command = [sys.executable, __file__, "--probe-memory", variant, "--setup", setup_name, "--device", device,
                   "--threads", str(torch.get_num_threads()),
                   *(["--meta-batch", str(meta_batch)] if meta_batch else [])]
        procs[variant] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    for variant, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
        peaks[variant] = float(json.loads(out.strip().splitlines()[-1])["peak_bytes"])
    return peaks


def probe_memory(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    setup = make_setup(args.setup[0], args)
    batches = [setup.sample(setup.meta_batch, torch.Generator().manual_seed(i)).to(device) for i in range(2)]
    iteration = make_iteration(setup, variants(setup, device)[args.probe_memory], device, batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        iteration(), iteration()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _current_rss_bytes()
        _reset_peak_rss()  # the set-up (data loading) may have peaked higher than any iteration
        iteration(), iteration()
        peak = _peak_rss_bytes() - before
    print(json.dumps({"peak_bytes": peak}))


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def flops_per_iteration(setup: Setup, device: torch.device) -> float:
    """FLOPs of one meta-iteration (forward, inner gradient, meta-gradient), counted by torch on the loop."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    maml = setup.make_maml().to(device)
    batch = setup.sample(setup.meta_batch, torch.Generator().manual_seed(0)).to(device)
    with FlopCounterMode(display=False) as counter:
        per_task_loop(maml, batch)
    return float(counter.get_total_flops())


def matmul_gflops(device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """float32 matmul throughput: the practical peak the Conv-4's GFLOP/s is compared with."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


# -- the report ------------------------------------------------------------------------------------------------


def run_setup(setup: Setup, device: torch.device, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Check, time and measure every variant of `setup`; print its table and return its figures (for --json)."""
    steps = variants(setup, device)
    errors = gradient_errors(setup, steps, device)
    wrong = {name: e for name, e in errors.items() if not e <= GRADIENT_TOLERANCE}
    if wrong:
        raise SystemExit(f"{setup.name}: meta-gradients disagree with the per-task loop: {wrong}")
    batches = [setup.sample(setup.meta_batch, torch.Generator().manual_seed(i)).to(device) for i in range(4)]
    iterations = {name: make_iteration(setup, step, device, batches) for name, step in steps.items()}
    minimum = 2 if setup.name == "conv4" and device.type == "cpu" else 5
    for iteration in iterations.values():  # warm-up
        rate(iteration, args.seconds / 4, 1)
    rates: dict[str, list[float]] = {name: [] for name in iterations}
    for _ in range(args.rounds):
        for name, iteration in iterations.items():
            rates[name].append(rate(iteration, args.seconds, minimum))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    measure_memory = getattr(args, "memory", True)
    meta_batch = getattr(args, "meta_batch", None)
    memory = (peak_memory_bytes(setup.name, list(steps), device.type, meta_batch) if measure_memory
              else {name: math.nan for name in steps})
    flops = flops_per_iteration(setup, device) if setup.name == "conv4" else None
    peak = matmul_gflops(device) if flops else None

    loop = "per-task loop"
    table = Table(title=f"{setup.description}; {device.type}, {torch.get_num_threads()} threads, "
                        f"median of {args.rounds} interleaved rounds")
    for column in ("variant", "meta-it/s", "vs loop", "peak memory", "vs loop", "grad rel. err (f64)",
                   *(["GFLOP/s", "of matmul peak"] if flops else [])):
        table.add_column(column, justify="right")
    for name in steps:
        row = [name, f"{medians[name]:.3g}", f"{medians[name] / medians[loop]:.2f}x",
               *([f"{memory[name] / 2**20:.0f} MiB", f"{memory[name] / memory[loop]:.2f}x"] if measure_memory
                 else ["not measured"] * 2), f"{errors[name]:.1e}"]
        if flops and peak:
            achieved = flops * medians[name] / 1e9
            row += [f"{achieved:.1f}", f"{achieved / peak:.0%}"]
        table.add_row(*row)
    console.print(table)
    if flops and peak:
        console.print(f"{setup.name}: {flops / 1e9:.1f} GFLOP per meta-iteration (FlopCounterMode); "
                      f"float32 matmul 2048^3 peak here: {peak:.1f} GFLOP/s")
    return {
        "setup": setup.name, "description": setup.description, "device": str(device), "meta_batch": setup.meta_batch,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "seconds": args.seconds,
        "gradient_tolerance": GRADIENT_TOLERANCE, "gflop_per_iteration": flops / 1e9 if flops else None,
        "matmul_gflops": peak,
        "variants": {name: {
            "meta_it_per_s": medians[name], "vs_loop": medians[name] / medians[loop],
            "peak_bytes": memory[name] if measure_memory else None,
            "memory_vs_loop": memory[name] / memory[loop] if measure_memory else None,
            "grad_rel_err": errors[name],
            "gflops": flops * medians[name] / 1e9 if flops else None,
        } for name in steps},
    }


def convex_table(names: list[str], device: torch.device, args: argparse.Namespace, console: Console) -> None:
    """The convex heads, one table per bench_convex setup (args: rounds, seconds, qpth_max_variables)."""
    convex = convex_module()
    console.print(f"convex heads: {convex.versions()}")
    for name in names:
        convex.run_setup(convex.SETUPS[name], device, args, console)


def main() -> None:
    convex = convex_module()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", nargs="+", choices=[*sorted(SETUPS), "convex"], default=["sine", "conv4", "convex"])
    parser.add_argument("--convex-setup", nargs="+", choices=sorted(convex.SETUPS), default=CONVEX_SETUPS,
                        help="the convex heads' setups (scripts/bench_convex.py has them all)")
    parser.add_argument("--qpth-max-variables", type=int, default=convex.QPTH_MAX_VARIABLES,
                        help="convex: skip qpth above this many dual variables per task")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant per round (at least 2 iterations)")
    parser.add_argument("--omniglot-root", default=None, help="use real Omniglot episodes for the Conv-4")
    parser.add_argument("--meta-batch", type=int, default=None,
                        help="tasks per meta-iteration for sine and conv4 (default: the setup's, 25 and 32)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the sine/conv4 figures to PATH")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory subprocesses (their columns say 'not measured')")
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_runtime(args.threads)
    if args.probe_memory:
        return probe_memory(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    console = Console(width=max(200, Console().width))  # the tables stay whole in a log file (qpth's row is wide)
    figures = {}
    for name in args.setup:
        if name == "convex":
            convex_table(args.convex_setup, device, args, console)
        else:
            figures[name] = run_setup(make_setup(name, args), device, args, console)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                               "setups": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
