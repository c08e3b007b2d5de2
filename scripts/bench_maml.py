"""Meta-iterations/s of metarun's batched MAML against the naive per-task loop, on sine regression.

Same process, same config, same data, interleaved rounds after warm-up; prints medians and ratios
for both orders. Before timing, both variants' meta-gradients are checked equal in float64, so no
speed comes from a wrong answer.

    python scripts/bench_maml.py [--rounds 5] [--seconds 2] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from metarun.algorithms.maml import MAML
from metarun.benchmarks.sine import SineBenchmark
from metarun.episodes import TaskBatch
from metarun.models.mlp import MLP
from metarun.runtime import configure_runtime


def per_task_loop_loss(maml: MAML, batch: TaskBatch) -> torch.Tensor:
    """How most paper code does it: one task at a time, torch.autograd.grad(create_graph=not first_order)."""
    names, params = zip(*maml.net.named_parameters())
    total = torch.zeros(())
    for t in range(batch.num_tasks):
        fast = list(params)
        for _ in range(maml.inner_steps):
            out = torch.func.functional_call(maml.net, dict(zip(names, fast)), (batch.support_x[t],))
            grads = torch.autograd.grad(F.mse_loss(out, batch.support_y[t]), fast, create_graph=not maml.first_order)
            fast = [p - maml.inner_lr * g for p, g in zip(fast, grads)]
        out = torch.func.functional_call(maml.net, dict(zip(names, fast)), (batch.query_x[t],))
        total = total + F.mse_loss(out, batch.query_y[t])
    return total / batch.num_tasks


def batched_loss(maml: MAML, batch: TaskBatch) -> torch.Tensor:
    return maml.meta_loss(batch)[0]


def check_same_gradient(first_order: bool) -> float:
    bench = SineBenchmark()
    maml = MAML(MLP([1], [40, 40]), bench.spec, inner_steps=1, inner_lr=0.01, first_order=first_order).double()
    batch = bench.sample("train", 25, torch.Generator().manual_seed(0)).to("cpu", torch.float64)
    params = list(maml.parameters())
    a = torch.autograd.grad(batched_loss(maml, batch), params)
    b = torch.autograd.grad(per_task_loop_loss(maml, batch), params)
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def iterations_per_second(step: Callable[[], None], seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant per round")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--meta-batch", type=int, default=25)
    args = parser.parse_args()
    configure_runtime()
    console = Console()
    table = Table(title=f"MAML sine, MLP 40-40, meta-batch {args.meta_batch}, K=10, 1 inner step "
                        f"(median of {args.rounds} interleaved rounds, it/s)")
    for col in ("order", "threads", "per-task loop", "metarun (vmap)", "ratio", "grad rel. err (float64)"):
        table.add_column(col, justify="right")
    bench = SineBenchmark()
    for first_order in (False, True):
        error = check_same_gradient(first_order)
        for threads in dict.fromkeys(args.threads):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            maml = MAML(MLP([1], [40, 40]), bench.spec, inner_steps=1, inner_lr=0.01, first_order=first_order)
            optimizer = torch.optim.Adam(maml.parameters(), 1e-3)
            generator = torch.Generator().manual_seed(0)

            def make_step(loss_fn: Callable[[MAML, TaskBatch], torch.Tensor]) -> Callable[[], None]:
                def step() -> None:
                    batch = bench.sample("train", args.meta_batch, generator)
                    loss = loss_fn(maml, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                return step

            variants = {"loop": make_step(per_task_loop_loss), "vmap": make_step(batched_loss)}
            for step in variants.values():  # warm-up
                iterations_per_second(step, 0.5)
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, step in variants.items():
                    rates[name].append(iterations_per_second(step, args.seconds))
            loop, vmap = statistics.median(rates["loop"]), statistics.median(rates["vmap"])
            table.add_row("first" if first_order else "second", str(threads), f"{loop:.1f}", f"{vmap:.1f}",
                          f"{vmap / loop:.1f}x", f"{error:.1e}")
    console.print(table)


if __name__ == "__main__":
    main()
