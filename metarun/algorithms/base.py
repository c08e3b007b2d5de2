"""The algorithm contract (MetaAlgorithm), and the per-task loss every algorithm shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

import torch.nn.functional as F
from torch import Tensor

from metarun.benchmarks.base import Kind, TaskSpec
from metarun.episodes import Batch, TaskBatch
from metarun.models.base import Backbone


class MetaAlgorithm(Protocol):
    """What the trainer and run.py ask of an algorithm: the one contract every family enters through.

    Implementations are nn.Modules (the trainer owns their parameters, optimizer and checkpoint) that
    subclass this Protocol explicitly, which gives them the default of every optional member below; the
    trainer and run.py call them directly, never probing with getattr. An algorithm never steps an
    optimizer, moves data, logs or draws from the global RNG.
    """

    # the kinds of task it can learn; run.py refuses any other kind with one line naming `alternatives`
    supports: ClassVar[frozenset[Kind]] = frozenset({"classification", "regression"})
    alternatives: ClassVar[str] = "algo=maml"
    # True: the constructor takes `generator`, the run's seeded generator for the algorithm's own random
    # draws (label permutations, data order), whose state the trainer saves in every checkpoint
    draws_randomness: ClassVar[bool] = False
    # reinforcement: whether it acts in continuous action spaces (run.py refuses the mismatch in one line)
    continuous_actions: ClassVar[bool] = False
    # reinforcement: whether it acts in discrete action spaces (MAML for RL's Gaussian policy does not)
    discrete_actions: ClassVar[bool] = True
    # True: it implements `trust_region_terms`, which TRPO (trainer/optimizer=trpo) needs; run.py refuses TRPO
    # for the others in one line
    trust_region: ClassVar[bool] = False
    # the feature extractor; the trainer updates its running statistics once per step (Backbone protocol)
    backbone: Backbone

    def meta_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar meta-training loss (mean over tasks) and detached scalar metrics such as `loss`, `accuracy`.
        The trainer calls backward on the loss and steps its optimizer. `batch` is what `updates` yielded: by
        default the sampled TaskBatch (supervised) or EnvBatch (reinforcement: tasks to roll out in)."""
        raise NotImplementedError

    def evaluate(self, batch: Batch) -> dict[str, Tensor]:
        """Per-task metrics, each a [T] tensor; `spec.metric` must be among the keys."""
        raise NotImplementedError

    def updates(self, batch: Batch) -> Iterator[Batch]:
        """The batches of one training step's optimizer steps: for each one it yields, the trainer calls
        `meta_loss` on it (in trainer.task_chunk chunks), runs backward, checks for NaN/inf and steps its
        optimizer, before asking for the next. Default: the step's batch, once. RL^2 (PPO) collects rollouts
        once and yields their minibatches epoch after epoch (each a Batch of trials, so chunking, sharding and
        the NaN path are the same); the trainer, not the algorithm, still owns stepping, gradient clipping and
        the scheduler (stepped once per training step)."""
        yield batch

    def trust_region_terms(self, batch: Batch, differentiable: bool = True) -> tuple[Tensor, Tensor]:
        """(surrogate loss, mean KL divergence from the policy that collected `batch`) at the parameters' current
        values: TRPO's closure (metarun/rl/trpo.py). The trainer has already taken the surrogate's gradient
        through `meta_loss`; TRPO differentiates the KL twice (Fisher-vector products) when `differentiable`, and
        compares candidate parameters by both values in its line search (differentiable False: no graph)."""
        raise NotImplementedError

    def fisher_vector_product(self, batch: Batch, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        """v -> F v over `params` flattened in order, F the Hessian of `trust_region_terms`' KL at the current
        parameters, computed in a way cheaper than TRPO's generic double backward; None (the default): TRPO
        uses the generic one."""
        return None

    def nan_fallback_loss(self) -> Tensor | None:
        """A loss the trainer steps on instead of a non-finite meta-loss (trainer.on_nan=fallback): LEO's code
        steps on 1e-4 x its L2 penalty, which pulls the weights back to where the loss is defined. Default None:
        the batch is skipped, as with on_nan=skip."""
        return None

    def query_scores(self, batch: TaskBatch) -> Tensor:
        """[T, Q, N] class scores of each query after the learner has adapted to its task's support set: their
        softmax is its class probabilities and their argmax the label `evaluate` scores (`metarun predict` reads
        them). Every classification algorithm implements it; tests/test_predict.py checks each against
        `evaluate`. The caller holds no graph (torch.no_grad); algorithms with an inner loop enable grad inside."""
        raise NotImplementedError

    @classmethod
    def backbone_input_shape(cls, spec: TaskSpec) -> tuple[int, ...]:
        """The input shape the backbone is built for. Default: the benchmark's inputs. RL^2's policy reads the
        whole trial as a sequence: (trial length, observation + previous action, reward and done flag)."""
        return spec.input_shape

    def train_episode(self) -> dict[str, int]:
        """Episode-shape overrides (`ways`, `shots`, `queries`) for meta-training batches, which the trainer
        passes to `Benchmark.sample` (ProtoNet trains 60-way on Omniglot). Default: the benchmark's shape."""
        return {}

    def parameter_groups(self) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups, each with "params" and an "lr_scale" (a multiple of
        trainer.optimizer.lr), for papers that train parts at different rates (FEAT's set function at 10x).
        Default None: one group of `parameters()` at the configured rate."""
        return None

    def visualize(self, batch: Batch) -> dict[str, Tensor]:
        """Pictures of one fixed validation episode (name -> [3, H, W] uint8), logged at each validation.
        Default: nothing to draw."""
        return {}


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


def incompatibility(algorithm: type[MetaAlgorithm], spec: TaskSpec, algo_name: str, bench_name: str) -> str | None:
    """A one-line reason why `algorithm` cannot run on this benchmark, or None when it can."""
    if spec.kind in algorithm.supports:
        if spec.kind == "reinforcement" and not spec.continuous_actions and not algorithm.discrete_actions:
            return (f"algo={algo_name} acts in continuous action spaces only (a Gaussian policy) and "
                    f"benchmark={bench_name} has discrete actions; use algo=rl2 there (or algo=baseline for the "
                    f"bandit/MDP baselines), or benchmark=navigation2d for algo={algo_name}")
        if spec.continuous_actions and not algorithm.continuous_actions:
            return (f"algo={algo_name} acts in discrete action spaces and benchmark={bench_name} has continuous "
                    f"actions; use algo=maml (MAML for RL) there, or a discrete benchmark (benchmark=bandit, "
                    f"benchmark=tabular_mdp) for algo={algo_name}")
        return None
    # a supervised learner on an RL benchmark needs an RL learner, whatever its own alternatives are
    instead = algorithm.alternatives
    if spec.kind == "reinforcement":
        instead = ("algo=maml (MAML for RL)" if spec.continuous_actions
                   else "algo=rl2 (or algo=baseline for the bandit/MDP baselines)")
    return (f"algo={algo_name} supports only {'/'.join(sorted(algorithm.supports))} and benchmark={bench_name} "
            f"is {spec.kind}; use {instead}")
