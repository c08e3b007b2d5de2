"""Hand-designed policies on the same task pools as the learners: `make_policy(name, spec)`.

Which apply where is `BASELINES` (by benchmark name, TaskSpec.name). The bandit ones are Duan et al. 2016's
Table 1 comparison (random, UCB1, Thompson sampling, Gittins index), the MDP ones the cheap ones of its Table 2
(random, PSRL, greedy). Every one is a RolloutPolicy batched over [T, E] that draws any randomness from the
rollout's TaskNoise (streams >= POLICY_STREAM), so its score on a task is fixed by the task's seed.
"""

from __future__ import annotations

from metarun.benchmarks.base import TaskSpec
from metarun.errors import UserInputError
from metarun.rl.bandit_policies import UCB1, Gittins, RandomPolicy, Thompson
from metarun.rl.gittins import MAX_PULLS
from metarun.rl.mdp_policies import PSRL, GreedyPosterior
from metarun.rl.rollout import RolloutPolicy

BASELINES: dict[str, tuple[str, ...]] = {
    "bandit": ("random", "ucb1", "thompson", "gittins"),
    "tabular_mdp": ("random", "psrl", "greedy"),
    "gym": ("random",),
}


def baselines_for(spec: TaskSpec) -> tuple[str, ...]:
    """The baselines that can run on this benchmark's settings: BASELINES less the Gittins index past the pulls
    its table is built for (gittins.MAX_PULLS), e.g. for a regret picture beside a learner."""
    names = BASELINES.get(spec.name, ())
    return tuple(n for n in names if not (n == "gittins" and spec.episodes > MAX_PULLS))


UCB1_C = 1.0  # UCB1 as Auer et al. define it: bonus sqrt(2 ln t / n_i)


def make_policy(name: str, spec: TaskSpec, *, ucb_c: float = UCB1_C) -> RolloutPolicy:
    """The baseline `name` for the benchmark of `spec`; one line listing the valid names otherwise.
    `ucb_c` scales UCB1's exploration bonus (algo.ucb_c)."""
    valid = BASELINES.get(spec.name, ())
    if spec.kind != "reinforcement" or name not in valid:
        where = f"benchmark={spec.name}"
        offer = f"one of {', '.join(valid)}" if valid else "none (it is not a bandit, tabular MDP or gym benchmark)"
        raise UserInputError(f"algo.policy={name} is not a baseline for {where}; valid: {offer}")
    if name == "random":
        return RandomPolicy(spec.output_size)
    if name == "ucb1":
        return UCB1(spec.output_size, spec.episodes, ucb_c)
    if spec.name == "bandit":
        return {"thompson": Thompson, "gittins": Gittins}[name](spec.output_size, spec.episodes)
    policy = {"psrl": PSRL, "greedy": GreedyPosterior}[name]
    return policy(spec.input_shape[0], spec.output_size, spec.horizon)
