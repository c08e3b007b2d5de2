"""metarun: train and evaluate few-shot meta-learners from composable Hydra configs."""

__version__ = "0.1.0"
