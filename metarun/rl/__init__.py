"""Meta-reinforcement learning: batched task environments, rollouts, PPO, baselines.

A task is an MDP drawn from a distribution; a benchmark's `sample` returns an `EnvBatch` (the parameters of T
tasks) instead of a `TaskBatch`, and the algorithm collects the data of its step by rolling its policy out.
See README, Architecture: the trainer, checkpoints, evaluation pools and reports are the supervised ones.
"""
