"""Task distributions behind the Benchmark protocol: each declares its TaskSpec and samples TaskBatches with an
explicit generator; defaults come from configs/benchmark/*.yaml."""

from metarun.benchmarks.base import Benchmark, TaskSpec, task_pool
from metarun.benchmarks.miniimagenet import MiniImageNetBenchmark
from metarun.benchmarks.omniglot import OmniglotBenchmark
from metarun.benchmarks.sine import SineBenchmark

__all__ = ["Benchmark", "MiniImageNetBenchmark", "OmniglotBenchmark", "SineBenchmark", "TaskSpec", "task_pool"]
