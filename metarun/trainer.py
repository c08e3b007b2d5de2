"""EpisodicTrainer: the one training loop every algorithm shares.

Sample a TaskBatch, ask the algorithm for its meta-loss, take an outer step, log, validate on a
fixed pool, checkpoint; at the end, score the best checkpoint on the fixed test pool.
"""

from __future__ import annotations

import functools
import json
import math
import signal
from pathlib import Path
from typing import Any

import torch

from metarun.algorithms.base import MetaAlgorithm
from metarun.benchmarks.base import Benchmark, task_pool
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.config import TrainerSettings
from metarun.distributed import Distributed
from metarun.episodes import Batch
from metarun.errors import UserInputError
from metarun.evaluation import evaluate_pool
from metarun.loggers import MetricLogger
from metarun.rl.trpo import TrustRegionOptimizer
from metarun.stats import Estimate


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: in training, the loop stopped at a step boundary and saved last.pt; in the final
    test evaluation, it stopped at once (last.pt was saved after the last step, and resuming from it
    re-runs the evaluation to the same results)."""

    def __init__(self, signum: int, step: int, path: Path, phase: str = "training") -> None:
        super().__init__(f"stopped by signal {signum} during {phase} after step {step}")
        self.signum, self.step, self.path, self.phase = signum, step, path, phase


class NonFiniteLoss(UserInputError):
    """The meta-loss or its gradient became NaN or inf."""


class EpisodicTrainer:
    def __init__(
        self,
        algorithm: MetaAlgorithm,
        benchmark: Benchmark,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        settings: TrainerSettings,
        logger: MetricLogger,
        run_dir: Path,
        device: torch.device,
        seed: int,
        config_yaml: str,
        distributed: Distributed | None = None,
        algorithm_generator: torch.Generator | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.benchmark = benchmark
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.s = settings
        self.logger = logger
        self.device = device
        self.config_yaml = config_yaml
        self.overrides = list(overrides or [])  # the command line that made the run: `metarun eval` composes from it
        self.dist = distributed or Distributed(device)
        self.ckpt_dir = run_dir / "checkpoints"
        # The training task stream has its own generator: validation/test pools never touch it.
        self.generator = torch.Generator().manual_seed(seed)
        # The algorithm's own random draws (MetaAlgorithm.draws_randomness); saved with the task stream's.
        self.algorithm_generator = algorithm_generator
        # An algorithm may meta-train on another episode shape than it is tested on (ProtoNet: 60-way Omniglot).
        self.train_episode: dict[str, int] = dict(algorithm.train_episode())
        # a backbone whose parameters are all frozen keeps its normalisation statistics too (Backbone protocol)
        backbone_params = list(algorithm.backbone.parameters())  # type: ignore[attr-defined]
        self._backbone_trains = not backbone_params or any(p.requires_grad for p in backbone_params)
        self.metric = benchmark.spec.metric
        self.higher_is_better = benchmark.spec.higher_is_better
        self.step = 0
        self.nan_skips = 0
        # per-step training metrics since the last log line; checkpointed so a resumed run logs the same means
        self.window: dict[str, list[torch.Tensor]] = {}
        self.best: dict[str, float | int] = {}
        self._signal: int | None = None
        self.phase = "training"  # what a signal interrupts (see _StopOnSignal)

    # -- state -------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.algorithm.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {"train": self.generator.get_state(), "torch": torch.get_rng_state(),
                    **({"algorithm": self.algorithm_generator.get_state()} if self.algorithm_generator else {})},
            "best": dict(self.best),
            "nan_skips": self.nan_skips,
            "window": {k: torch.stack(v).cpu() for k, v in self.window.items()},
            "metric": self.metric,
            "config": self.config_yaml,
            "overrides": list(self.overrides),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["rng"]["train"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.algorithm_generator is not None and "algorithm" in state["rng"]:
            self.algorithm_generator.set_state(state["rng"]["algorithm"])
        self.best = dict(state.get("best", {}))
        self.nan_skips = int(state.get("nan_skips", 0))
        self.window = {k: list(v.to(self.device).unbind()) for k, v in state.get("window", {}).items()}
        self.step = int(state["step"])

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Estimate]:
        """Train from `self.step` to `steps`; return the test estimates of the best checkpoint."""
        s = self.s
        self.algorithm.train()
        with _StopOnSignal(self):
            while self.step < s.steps:
                batch = self.dist.shard(self.benchmark.sample("train", s.meta_batch_size, self.generator,
                                                              **self.train_episode)).to(self.device)
                self.algorithm.backbone.set_progress(self.step)
                outcome = self._train_step(batch)
                if outcome is None:  # a non-finite loss or gradient, skipped (trainer.on_nan=skip)
                    continue
                metrics, grad_norm = outcome
                if self.scheduler is not None:
                    self.scheduler.step()
                self.step += 1

                if not self.dist.is_main:  # rank 0 alone logs, validates and checkpoints
                    continue
                for key, value in {**metrics, "grad_norm": grad_norm}.items():
                    self.window.setdefault(key, []).append(value.detach())
                if self.step % s.log_every == 0 or self.step == s.steps:
                    logged = {f"train/{k}": float(torch.stack(v).mean()) for k, v in self.window.items()}
                    logged["train/lr"] = self.optimizer.param_groups[0]["lr"]
                    if self.nan_skips:
                        logged["train/nan_skips"] = self.nan_skips
                    self.logger.log_metrics(logged, self.step)
                    self.window.clear()
                if self.step % s.eval_every == 0 or self.step == s.steps:
                    self._validate()
                if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                    save_checkpoint(self.state(), self.ckpt_dir / "last.pt")
                if self._signal is not None:
                    save_checkpoint(self.state(), self.ckpt_dir / "last.pt")
                    raise Interrupted(self._signal, self.step, self.ckpt_dir / "last.pt")
            if not self.dist.is_main:
                return {}
            if s.steps == 0:  # nothing trained (algo=baseline): the weights as built, for `metarun eval` to score
                save_checkpoint(self.state(), self.ckpt_dir / "last.pt")
            # from here a signal stops at once: last.pt holds the final step, and resuming re-runs the test
            self.phase = "final test evaluation"
            if self._signal is not None:
                raise Interrupted(self._signal, self.step, self.ckpt_dir / "last.pt", self.phase)
            return self.test()

    def _train_step(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """One training step: an optimizer step on each batch the algorithm's `updates` yields (the step's batch
        once for most; PPO's minibatches of its rollouts, epoch after epoch, for RL^2), each checked for NaN/inf
        before it is taken. Returns the step's mean metrics and gradient norm, or None when a non-finite update
        was skipped (trainer.on_nan=skip; the rest of the step with it)."""
        sums: dict[str, torch.Tensor] = {}
        norms: list[torch.Tensor] = []
        updates = self.algorithm.updates(batch)
        for part in updates:
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self._backward(part)
            self.dist.average_gradients(self.algorithm.parameters())
            loss = self.dist.mean(loss)
            grad_norm = self._grad_norm()
            if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
                updates.close()
                self._on_nonfinite(float(loss), float(grad_norm))
                if self.s.on_nan == "fallback":
                    self._step_on_fallback()
                return None
            if not norms and self._backbone_trains:
                # normalisation statistics (model.bn=inductive) move once per step, from the step's tasks; a
                # frozen backbone (every parameter requires_grad False: LEO on a pre-trained one) keeps its own
                self.algorithm.backbone.update_running_stats(*batch.normalisation_inputs())
            if isinstance(self.optimizer, TrustRegionOptimizer):  # TRPO re-evaluates the objective (rl/trpo.py)
                self.optimizer.step(functools.partial(self.algorithm.trust_region_terms, part),
                                    functools.partial(self.algorithm.fisher_vector_product, part))
            else:
                self.optimizer.step()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + self.dist.mean(value)
            norms.append(grad_norm)
        if not norms:
            raise UserInputError("the algorithm's updates() yielded no batch to take an optimizer step on")
        return {k: v / len(norms) for k, v in sums.items()}, torch.stack(norms).mean()

    def _backward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Meta-loss and its gradient, in chunks of `task_chunk` tasks when set: the gradient is the same
        (each chunk's mean is weighted by its share of tasks) and peak memory is one chunk's graph."""
        chunk = self.s.task_chunk or batch.num_tasks
        if chunk >= batch.num_tasks:
            loss, metrics = self.algorithm.meta_loss(batch)
            loss.backward()
            return loss.detach(), {k: v.detach() for k, v in metrics.items()}
        total: torch.Tensor | None = None
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, batch.num_tasks, chunk):
            part = batch.slice(start, start + chunk)
            weight = part.num_tasks / batch.num_tasks
            loss, metrics = self.algorithm.meta_loss(part)
            (loss * weight).backward()
            total = loss.detach() * weight if total is None else total + loss.detach() * weight
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.detach() * weight
        assert total is not None
        return total, sums

    def _grad_norm(self) -> torch.Tensor:
        """Global gradient norm before clipping: logged, and checked for NaN/inf. Then the clipping asked for:
        each entry to [-grad_clip_value, grad_clip_value] first (when set), then the norm to grad_clip (when
        set): the global norm, or each tensor's own with grad_clip_per_tensor (LEO's code clips both ways)."""
        params = [p for p in self.algorithm.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.s.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.s.grad_clip_value)
        if self.s.grad_clip is not None and self.s.grad_clip_per_tensor:
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], self.s.grad_clip)
        elif self.s.grad_clip is not None:  # the norm measured above, unless value clipping changed the gradients
            clipped = norm if self.s.grad_clip_value is None else torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, self.s.grad_clip, clipped)
        return norm

    def _step_on_fallback(self) -> None:
        """on_nan=fallback: one optimizer step on the algorithm's fallback loss (its gradient clipped as usual), or
        nothing when it has none. The training step is not counted, as a skipped batch is not."""
        fallback = self.algorithm.nan_fallback_loss()
        if fallback is None or isinstance(self.optimizer, TrustRegionOptimizer):
            return
        self.optimizer.zero_grad(set_to_none=True)
        fallback.backward()
        self.dist.average_gradients(self.algorithm.parameters())
        if bool(torch.isfinite(self._grad_norm())):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        """NaN/inf in the loss or gradients: stop with one line, or skip the batch (trainer.on_nan=skip)."""
        what = f"meta-loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.s.on_nan == "stop":
            raise NonFiniteLoss(f"{what} at step {self.step + 1}; last good checkpoint: {self._last_path_or_none()} "
                                f"(lower the learning rate, set trainer.grad_clip, or trainer.on_nan=skip)")
        self.optimizer.zero_grad(set_to_none=True)
        self.nan_skips += 1
        if self.nan_skips > max(100, self.s.steps // 10):
            raise NonFiniteLoss(f"{self.nan_skips} batches skipped for NaN/inf by step {self.step}: training diverged; "
                                f"last good checkpoint: {self._last_path_or_none()}")

    def _validate(self) -> None:
        estimates = self.evaluate("val", self.s.val_tasks)
        self.logger.log_metrics({f"val/{k}": e.mean for k, e in estimates.items()}, self.step)
        self._log_pictures()
        value = estimates[self.metric].mean
        best = self.best.get("value")
        improved = best is None or (value > best if self.higher_is_better else value < best)
        if math.isfinite(value) and improved:
            self.best = {"value": value, "step": self.step}
            save_checkpoint(self.state(), self.ckpt_dir / "best.pt")

    def _log_pictures(self) -> None:
        """Algorithms that can draw (attention maps, adapted curves) do so on one fixed validation episode."""
        episode = next(task_pool(self.benchmark, "val", 1, self.s.pool_seed)).to(self.device)
        self.algorithm.eval()
        try:
            images = self.algorithm.visualize(episode)
        finally:
            self.algorithm.train()
        if images:
            self.logger.log_images({k if "/" in k else f"val/{k}": v for k, v in images.items()}, self.step)

    def evaluate(self, split: str, num_tasks: int) -> dict[str, Estimate]:
        return evaluate_pool(self.algorithm, self.benchmark, split, num_tasks, self.s.pool_seed, self.device,
                             self.s.eval_batch_size)

    def test(self) -> dict[str, Estimate]:
        """Score the best validated weights (the last ones if validation never improved) on the test pool."""
        best_path = self.ckpt_dir / "best.pt"
        if best_path.exists():
            current = {k: v.clone() for k, v in self.algorithm.state_dict().items()}
            self.algorithm.load_state_dict(load_checkpoint(best_path)["model"])
            estimates = self.evaluate("test", self.s.eval_tasks)
            self.algorithm.load_state_dict(current)
            return estimates
        return self.evaluate("test", self.s.eval_tasks)

    def _last_path_or_none(self) -> str:
        path = self.ckpt_dir / "last.pt"
        return str(path) if path.exists() else "none yet"


class _StopOnSignal:
    """In training, turn SIGINT/SIGTERM into a flag the loop checks at step boundaries, so a step is never
    half-saved. In the final test evaluation (the trainer's other `phase`), stop at once: nothing is left to save."""

    def __init__(self, trainer: EpisodicTrainer) -> None:
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            trainer = self.trainer
            if trainer.phase != "training":
                raise Interrupted(signum, trainer.step, trainer.ckpt_dir / "last.pt", trainer.phase)
            if self.trainer._signal is not None:  # a second Ctrl-C: stop now, last.pt is the previous one
                raise KeyboardInterrupt
            self.trainer._signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. a launcher's worker): keep default handling
                pass

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")

