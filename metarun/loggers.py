"""One logging interface with three sinks: JSON lines (machine-readable), TensorBoard, rich console.

Keys are namespaced (`train/loss`, `val/mse`). The trainer calls `log_metrics` and never knows
which sinks are active.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, images: dict[str, Any], step: int) -> None: ...

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """`metrics.jsonl`: one JSON object per logged step, with `time`, the run's wall-clock seconds so far (for
    learning curves against time). On resume, lines after the checkpoint are dropped so the file reads as if
    the run had never stopped, and the clock continues from the last line kept (time spent stopped is not
    counted); every other value is bit-identical to an uninterrupted run's."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        elapsed = 0.0
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
            elapsed = float(json.loads(kept[-1]).get("time", 0.0)) if kept else 0.0
        elif path.exists():
            path.unlink()
        self.started = time.perf_counter() - elapsed
        self.handle = path.open("a")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        seconds = round(time.perf_counter() - self.started, 3)
        self.handle.write(json.dumps({"step": step, "time": seconds, **metrics}) + "\n")
        self.handle.flush()

    def log_images(self, images: dict[str, Any], step: int) -> None:
        pass  # pictures go to TensorBoard only

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass  # hparams live in .hydra/config.yaml and results.json

    def close(self) -> None:
        self.handle.close()


class TensorBoardLogger:
    """TensorBoard scalars under `tb/`, plus the hparams record that TensorBoard's HParams view reads."""

    def __init__(self, log_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step discards events written after the checkpoint by the interrupted run
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, images: dict[str, Any], step: int) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image, step)  # uint8 [3, H, W] RGB (metarun.plotting), stored as PNG

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(clean, metrics):
            self.writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, 0)

    def close(self) -> None:
        self.writer.close()


class ConsoleLogger:
    """A rich progress bar: step, running loss, last validation metric, it/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, metric: str, console: Console | None = None) -> None:
        self.metric = metric
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[speed]} it/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=4,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", val="-", speed="-")
        self.last = (start_step, time.perf_counter())
        self.progress.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fields: dict[str, str] = {}
        if "train/loss" in metrics:
            fields["loss"] = f"{metrics['train/loss']:.4g}"
            last_step, last_time = self.last
            now = time.perf_counter()
            if step > last_step:
                fields["speed"] = f"{(step - last_step) / max(now - last_time, 1e-9):.0f}"
            self.last = (step, now)
        if f"val/{self.metric}" in metrics:
            fields["val"] = f"{self.metric} {metrics[f'val/{self.metric}']:.4g}"
        self.progress.update(self.task, completed=step, **fields)

    def log_images(self, images: dict[str, Any], step: int) -> None:
        pass

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        self.progress.stop()


class MultiLogger:
    """Fans every call out to each sink."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_images(self, images: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_images(images, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_hparams(hparams, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
