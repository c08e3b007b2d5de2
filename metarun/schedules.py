"""Learning-rate schedules that torch.optim.lr_scheduler has no config-only form for.

`StepFactors` is a piecewise-constant multiplier of the configured learning rate, for LambdaLR (the trainer
steps schedulers once per meta-iteration):

    scheduler:
      _target_: torch.optim.lr_scheduler.LambdaLR
      _partial_: true
      lr_lambda: {_target_: metarun.schedules.StepFactors, milestones: [19000, 39000, 49000],
                  factors: [1.0, 0.06, 0.012, 0.0024]}

MetaOptNet's schedule is of this kind (lr 0.1, then 0.006, 0.0012 and 0.00024 from its 20th, 40th and 50th
epoch of 1,000 meta-batches), and its ratios (0.06, then 0.2 twice) are not one StepLR/MultiStepLR gamma.
It is a plain object (lists of numbers), so LambdaLR's state_dict saves it and a checkpoint restores it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class StepFactors:
    """factors[0] before milestones[0], factors[i] from step milestones[i - 1] on (len(factors) = len(milestones) + 1)."""

    def __init__(self, milestones: Sequence[int], factors: Sequence[float]) -> None:
        milestones, factors = [int(m) for m in milestones], [float(f) for f in factors]
        if len(factors) != len(milestones) + 1:
            raise ValueError(f"lr_lambda needs one more factor than milestones (got {len(factors)} factors and "
                             f"{len(milestones)} milestones)")
        if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m < 0 for m in milestones):
            raise ValueError(f"lr_lambda milestones must be increasing steps >= 0 (got {milestones})")
        self.milestones, self.factors = milestones, factors

    def __call__(self, step: int) -> float:
        return self.factors[bisect.bisect_right(self.milestones, step)]
