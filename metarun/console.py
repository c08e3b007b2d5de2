"""What a person reads on the terminal: the resolved config once, a results table at the end, errors."""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

# Piped into a file (run logs, CI), rich would fold tables to 80 columns; keep them whole there.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """The one line a bad input gets."""
    from rich.markup import escape

    # escaped: a message naming `pip install ".[rl]"` or "gymnasium[mujoco]" must keep its brackets
    error_console.print(f"[bold red]metarun: error:[/] {escape(message)}", markup=True)
    sys.stderr.flush()


def print_config(cfg: DictConfig) -> None:
    """The resolved config as a tree: one branch per group."""
    tree = Tree("[bold]config")
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            branch = tree.add(f"[bold cyan]{key}")
            branch.add(OmegaConf.to_yaml(value).rstrip())
        else:
            tree.add(f"{key}: {value}")
    console.print(tree)


def print_results(results: dict[str, Any]) -> None:
    """The final table: the main metric with its CI, and any per-step breakdown."""
    metric = results["metric"]
    table = Table(title=f"{results['split']} result: {results['algo']} / {results['model']} / {results['benchmark']}")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("± 95% CI", justify="right")
    table.add_column("tasks", justify="right")
    table.add_column("diverged", justify="right")
    for key, est in results["metrics"].items():
        percent = key.startswith("accuracy")  # accuracies as percentages; losses and MSE as they are
        scale, unit = (100.0, " %") if percent else (1.0, "")
        table.add_row(key + unit, f"{est['mean'] * scale:.4f}", f"{est['ci95'] * scale:.4f}", str(est["tasks"]),
                      str(est["nonfinite_tasks"]), style="bold" if key == metric else None)
    console.print(table)
    bad = results["metrics"][metric]["nonfinite_tasks"]
    if bad:
        console.print(f"[yellow]warning: {bad} of {results['tasks']} tasks diverged (non-finite {metric}); "
                      f"the mean is over the {results['tasks'] - bad} finite ones")
