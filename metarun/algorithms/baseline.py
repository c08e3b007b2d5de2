"""Hand-designed meta-RL baselines as an algorithm: `algo=baseline algo.policy=ucb1` scores a policy of
metarun/rl/baselines.py on the benchmark's fixed pools through the same evaluation as every learner.

It has nothing to train (its YAML sets trainer.steps to 0); `evaluate` rolls out `trials` trials per task.
`backbone` is the model run.py builds for every algorithm; the baseline keeps it as the contract asks and never
uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.episodes import Batch
from metarun.errors import UserInputError
from metarun.models.base import Backbone
from metarun.rl.baselines import make_policy
from metarun.rl.checks import integer_at_least
from metarun.rl.envs import EnvBatch
from metarun.rl.metrics import trial_metrics
from metarun.rl.rollout import rollout

_DEFAULTS = option_defaults("algo", "baseline")


class Baseline(nn.Module, MetaAlgorithm):
    """A fixed policy: random, UCB1, Thompson, Gittins (bandits); random, PSRL, greedy (tabular MDPs)."""

    supports = frozenset({"reinforcement"})
    alternatives = "algo=maml or algo=reptile"

    def __init__(self, backbone: Backbone, spec: TaskSpec, policy: str = _DEFAULTS["policy"],
                 trials: int = _DEFAULTS["trials"], ucb_c: float = _DEFAULTS["ucb_c"]) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.policy_name = policy
        self.trials = integer_at_least("algo.trials", trials, 1)
        if not ucb_c >= 0:
            raise UserInputError(f"algo.ucb_c must be a non-negative number (got {ucb_c})")
        self.policy = make_policy(policy, spec, ucb_c=float(ucb_c))

    def meta_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise UserInputError(f"algo=baseline has nothing to train; set trainer.steps=0 (algo=baseline sets it) to "
                             f"score algo.policy={self.policy_name} on the test pool")

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, Tensor]:
        """{return, return@k, regret (where known)}: [T] each, averaged over `trials` trials per task."""
        assert isinstance(batch, EnvBatch), "algo=baseline evaluates reinforcement tasks (EnvBatch)"
        env = batch.make(self.trials)
        return trial_metrics(env, rollout(env, self.policy))
