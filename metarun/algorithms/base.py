"""The algorithm contract, and the per-task loss every algorithm shares.

An algorithm is an nn.Module (so the trainer can own its parameters, optimizer and checkpoint)
that turns a TaskBatch into `(loss, metrics)`. It never steps an optimizer, moves data or logs.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from metarun.benchmarks.base import Kind, TaskSpec
from metarun.episodes import TaskBatch


class MetaAlgorithm(Protocol):
    """What the trainer needs from an algorithm (implementations are nn.Modules)."""

    supports: ClassVar[frozenset[Kind]]

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar meta-training loss (mean over tasks) and detached scalar metrics such as `loss`, `accuracy`."""
        ...

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Per-task metrics, each a [T] tensor; `spec.metric` must be among the keys."""
        ...

    # Optional: `parameter_groups() -> list[dict]`, optimizer parameter groups each with "params" and an
    # "lr_scale" (a multiple of trainer.optimizer.lr), for algorithms whose papers train parts at different
    # rates (FEAT's set function at 10x). Without it the optimizer gets `parameters()` at one rate.


def task_loss(spec: TaskSpec, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, metric) of one task's predictions: cross-entropy and accuracy, or MSE and MSE.

    Written for a single task (no task dimension) so it runs unchanged under torch.func.vmap.
    """
    if spec.kind == "classification":
        loss = F.cross_entropy(outputs, targets)
        accuracy = (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()
        return loss, accuracy
    # written out rather than F.mse_loss: under vmap, mse_loss's backward runs as a Python decomposition
    loss = (outputs - targets).square().mean()
    return loss, loss


def task_losses(spec: TaskSpec, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """`task_loss` of T tasks at once (outputs [T, N, ...], targets [T, N, ...]) -> (loss [T], metric [T]),
    as plain batched ops: vmapping task_loss costs more Python than the arithmetic on small models."""
    if spec.kind == "classification":
        loss = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        accuracy = (outputs.argmax(dim=-1) == targets).to(outputs.dtype)
        return loss.mean(dim=1), accuracy.mean(dim=1)
    loss = (outputs - targets).square().flatten(start_dim=1).mean(dim=1)
    return loss, loss


def batch_metrics(spec: TaskSpec, losses: Tensor, metric: Tensor) -> dict[str, Tensor]:
    """Scalar training metrics from per-task values; regression's metric is its loss, so it is logged once."""
    metrics = {"loss": losses.detach().mean()}
    if spec.kind == "classification":
        metrics[spec.metric] = metric.detach().mean()
    return metrics


def incompatibility(algorithm: type, spec: TaskSpec, algo_name: str, bench_name: str) -> str | None:
    """A one-line reason why `algorithm` cannot run on this benchmark, or None when it can."""
    supports: frozenset[str] = getattr(algorithm, "supports", frozenset({"classification", "regression"}))
    if spec.kind in supports:
        return None
    alternatives = getattr(algorithm, "alternatives", "algo=maml")
    return f"algo={algo_name} supports only {'/'.join(sorted(supports))} and benchmark={bench_name} is {spec.kind}; use {alternatives}"



def update_running_statistics(backbone: nn.Module, training: bool, *image_sets: Tensor) -> None:
    """A buffer cannot be written under vmap, so a backbone with running statistics (model=cnn bn=inductive)
    updates them here, outside the vmapped pass, from the episode's images (see ConvNet)."""
    update = getattr(backbone, "update_running_stats", None)
    if training and update is not None:
        update(*image_sets)
