"""The bandit and MDP baselines on small cases with known answers: the Gittins index against hand-worked values,
per-state bisection and Gittins' published discounted table; UCB1's opening pulls and bonus; the posterior
updates and draws of Thompson sampling and PSRL; PSRL and greedy on a 2-state MDP; `algo=baseline`'s metrics
and its one-line refusals."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from metarun.algorithms.baseline import Baseline
from metarun.benchmarks.bandit import BanditBenchmark
from metarun.benchmarks.tabular_mdp import TabularMDPBenchmark
from metarun.errors import UserInputError
from metarun.models.mlp import MLP
from metarun.rl import gittins
from metarun.rl.bandit import make_bandit
from metarun.rl.bandit_policies import UCB1, Gittins, Thompson
from metarun.rl.baselines import BASELINES, baselines_for, make_policy
from metarun.rl.envs import EnvBatch
from metarun.rl.mdp_policies import PSRL, GreedyPosterior
from metarun.rl.metrics import episode_marks
from metarun.rl.noise import TaskNoise
from metarun.rl.posterior import beta, gamma
from metarun.rl.rollout import StepInput, rollout
from metarun.rl.tabular_mdp import make_tabular_mdp


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _bandit(probs: list[list[float]], pulls: int, seed: int = 0) -> EnvBatch:
    seeds = torch.arange(seed, seed + len(probs))
    return EnvBatch({"probs": torch.tensor(probs)}, seeds, functools.partial(make_bandit, pulls=pulls))


# -- the Gittins index ---------------------------------------------------------------------------------------

def test_gittins_index_by_hand() -> None:
    table = gittins.gittins_table(4)
    # one pull left: nothing to learn, the index is the posterior mean (1 + s) / (2 + s + f)
    assert table[1, 1, 2].item() == pytest.approx(2 / 5, abs=1e-7)  # float32
    # two pulls left from Beta(1, 1): indifference 2 l = 1/2 (1 + 2/3) + 1/2 l  ->  l = 5/9
    assert gittins.calibrate(0, 0, 2) == pytest.approx(5 / 9, abs=1e-9)
    assert table[2, 0, 0].item() == pytest.approx(5 / 9, abs=5e-5)


def test_gittins_table_matches_per_state_bisection() -> None:
    n = 9
    table = gittins.gittins_table(n)
    worst = max(abs(table[k, s, f].item() - gittins.calibrate(s, f, k))
                for k in range(1, n + 1) for s in range(n - k + 1) for f in range(n - k + 1 - s))
    assert worst < 5e-5  # the grid's linear interpolation (GRID = 1025 values)
    # more pulls left, more to learn: the index grows with the horizon; a success raises it, a failure lowers it
    assert table[n, 0, 0] > table[n - 1, 0, 0] > table[1, 0, 0] == 0.5
    assert table[3, 2, 1] > table[3, 1, 1] > table[3, 1, 2]


@pytest.mark.parametrize("successes, failures, published", [(0, 0, 0.7029), (1, 1, 0.6346), (2, 2, 0.6010),
                                                            (9, 1, 0.8695)])
def test_the_dp_gives_gittins_published_discounted_indices(successes: int, failures: int, published: float) -> None:
    """Gittins' table for Bernoulli arms with a uniform prior, discount 0.9 (Gittins, Glazebrook and Weber 2011,
    "Multi-armed Bandit Allocation Indices", 2nd ed.; the 0.9 table as reproduced in Christian and Griffiths
    2016, "Algorithms to Live By", ch. 2: 0.7029 for an untried arm, 0.6346 after 1-1, 0.6010 after 2-2,
    0.8695 after 9-1). The same recursion, discounted and long, is the classic index."""
    assert gittins.discounted_index(successes, failures, 0.9) == pytest.approx(published, abs=6e-5)


def test_a_slow_table_build_is_kept_on_disk(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path))
    clock = iter([0.0, 5.0])  # the build "took" five seconds
    monkeypatch.setattr(gittins.time, "perf_counter", lambda: next(clock))
    built = gittins.gittins_table(5, 1.0, 65)
    files = list(tmp_path.glob("gittins-n5-*.pt"))
    assert len(files) == 1
    torch.testing.assert_close(torch.load(files[0], weights_only=True), built, rtol=0, atol=0, equal_nan=True)


# -- bandit policies -----------------------------------------------------------------------------------------

def test_ucb1_pulls_each_arm_once_then_takes_the_largest_upper_bound() -> None:
    batch = _bandit([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], pulls=6)
    trajectory = rollout(batch.make(4), UCB1(3, 6, 1.0))
    assert trajectory.actions[:, :, :3].tolist() == [[[0, 1, 2]] * 4] * 2
    # task 0: only arm 1 paid; its bound 1 + sqrt(2 ln 3) beats 0 + sqrt(2 ln 3)
    assert trajectory.actions[0, :, 3].tolist() == [1] * 4
    # task 1: arms 0 and 1 tie at 1 + sqrt(2 ln 3): the tie is broken at random, never arm 2
    assert set(trajectory.actions[1, :, 3].tolist()) <= {0, 1}
    # by hand at t = 4 for task 0 after pulls (0, 1, 2, 1): arm 1 has mean 1 over 2 pulls, the others 0 over 1
    bonus = lambda n: math.sqrt(2 * math.log(4) / n)  # noqa: E731
    assert 1 + bonus(2) > bonus(1)
    assert trajectory.actions[0, :, 4].tolist() == [1] * 4


def test_thompson_counts_and_beta_draws() -> None:
    policy = Thompson(2, 10)
    env = _bandit([[0.5, 0.5]], pulls=10).make(3)
    memory = policy.start(env)
    noise = env.noise
    step = lambda a, r, done=True: StepInput(torch.zeros(1, 3, 1), torch.tensor([a]), torch.tensor([r]),  # noqa: E731
                                             torch.ones(1, 3, dtype=torch.bool))
    _, memory, _ = policy.act(step([-1] * 3, [0.0] * 3), memory, 0, noise)
    _, memory, _ = policy.act(step([0, 1, 1], [1.0, 0.0, 1.0]), memory, 1, noise)
    _, memory, _ = policy.act(step([0, 0, 1], [1.0, 1.0, 1.0]), memory, 2, noise)
    successes, failures = memory
    assert successes.tolist() == [[[2.0, 0.0], [1.0, 0.0], [0.0, 2.0]]]
    assert failures.tolist() == [[[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]
    # Beta(1 + s, 1 + f) draws: mean and variance of Beta(4, 2) over many trials
    draws = beta(TaskNoise(torch.tensor([11]), 20000), 17, 0, torch.full((1, 20000), 4.0), torch.full((1, 20000), 2.0))
    assert draws.mean().item() == pytest.approx(4 / 6, abs=0.005)
    assert draws.var().item() == pytest.approx(4 * 2 / (36 * 7), abs=0.002)


@pytest.mark.parametrize("alpha", [1.0, 2.5, 30.0])
def test_gamma_draws_have_the_right_moments(alpha: float) -> None:
    draws = gamma(TaskNoise(torch.tensor([3]), 20000), 20, 5, torch.full((1, 20000), alpha))
    assert (draws > 0).all()
    assert draws.mean().item() == pytest.approx(alpha, rel=0.02)
    assert draws.var().item() == pytest.approx(alpha, rel=0.06)


def test_bandit_baselines_beat_random_and_gittins_breaks_the_first_tie_at_random() -> None:
    batch = BanditBenchmark(arms=5, pulls=10).sample("test", 300, torch.Generator().manual_seed(0))
    env = batch.make(2)
    returns = {name: rollout(env, make_policy(name, BanditBenchmark().spec)).returns.mean().item()
               for name in BASELINES["bandit"]}
    # Duan et al. Table 1 (n = 10, k = 5): random 5.0, Gittins 6.6, Thompson 5.7
    assert returns["random"] < returns["thompson"] < returns["gittins"]
    assert returns["gittins"] == pytest.approx(6.6, abs=0.3)
    first = rollout(env, Gittins(5, 10)).actions[..., 0]
    assert first.unique().numel() == 5


# -- MDP policies --------------------------------------------------------------------------------------------

# two states; action 1 pays 3 on average in either state, action 0 pays -3; action 0 switches state, 1 stays
_DETERMINISTIC = {"transitions": [[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]],
                  "reward_means": [[-3.0, 3.0], [-3.0, 3.0]], "initial": [1.0, 0.0]}


def _two_state(tasks: int = 2, horizon: int = 4, episodes: int = 6) -> EnvBatch:
    params = {k: torch.tensor([v] * tasks) for k, v in _DETERMINISTIC.items()}
    return EnvBatch(params, torch.arange(tasks) + 100,
                    functools.partial(make_tabular_mdp, horizon=horizon, episodes=episodes))


@pytest.mark.parametrize("policy", [PSRL(2, 2, 4), GreedyPosterior(2, 2, 4)], ids=["psrl", "greedy"])
def test_psrl_and_greedy_learn_the_paying_action_of_a_two_state_mdp(policy) -> None:
    trajectory = rollout(_two_state().make(50), policy)
    last = trajectory.actions[..., -4:]  # the trial's last episode
    assert last.eq(1).float().mean() > 0.95
    per_episode = trajectory.episode_returns(4).mean(dim=(0, 1))
    assert per_episode[-1] > per_episode[0] and per_episode[-1] == pytest.approx(12.0, abs=1.0)


def test_mdp_posterior_updates_skip_the_transition_across_an_episode_end() -> None:
    policy = GreedyPosterior(2, 2, 2)
    env = _two_state(tasks=1, horizon=2, episodes=2).make(1)
    memory = policy.start(env)
    one_hot = lambda s: torch.nn.functional.one_hot(torch.tensor([[s]]), 2).float()  # noqa: E731
    step = lambda s, a, r, done: StepInput(one_hot(s), torch.tensor([[a]]), torch.tensor([[r]]),  # noqa: E731
                                           torch.tensor([[done]]))
    _, memory, _ = policy.act(step(0, -1, 0.0, True), memory, 0, env.noise)
    memory.state = torch.tensor([[0]])  # whatever it chose, say it took action 1 in state 0
    _, memory, _ = policy.act(step(0, 1, 2.0, False), memory, 1, env.noise)  # (0, 1) -> 0, reward 2
    memory.state = torch.tensor([[0]])
    _, memory, _ = policy.act(step(1, 0, -4.0, True), memory, 2, env.noise)  # episode ended: reset to state 1
    assert memory.visits[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert memory.reward_sum[0, 0].tolist() == [[-4.0, 2.0], [0.0, 0.0]]
    transitions = memory.transitions[0, 0]
    assert transitions[0, 1].tolist() == [1.0, 0.0] and transitions.sum().item() == 1.0
    # the posterior mean reward of (0, 1): prior N(1, 1), one reward 2 with unit noise -> (1 + 2) / 2
    mean, std = policy.reward_posterior(memory)
    assert mean[0, 0, 0, 1].item() == pytest.approx(1.5) and std[0, 0, 0, 1].item() == pytest.approx(2 ** -0.5)
    assert mean[0, 0, 1, 1].item() == pytest.approx(1.0) and std[0, 0, 1, 1].item() == pytest.approx(1.0)
    transitions, _ = policy.model(memory, 2, env.noise)  # Dirichlet(1 + counts) mean: (2, 1) / 3 for (0, 1)
    assert transitions[0, 0, 0, 1].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_mdp_baselines_on_duans_random_mdps_beat_random() -> None:
    bench = TabularMDPBenchmark(episodes=3)
    batch = bench.sample("test", 40, torch.Generator().manual_seed(0))
    scores = {name: Baseline(MLP((10,)), bench.spec, policy=name).evaluate(batch)["return"].mean().item()
              for name in BASELINES["tabular_mdp"]}
    assert scores["random"] < scores["psrl"] and scores["random"] < scores["greedy"]


# -- the algorithm -------------------------------------------------------------------------------------------

def test_baselines_for_leaves_out_a_gittins_table_too_big_to_build() -> None:
    assert baselines_for(BanditBenchmark(pulls=200).spec) == BASELINES["bandit"]
    assert baselines_for(BanditBenchmark(pulls=500).spec) == ("random", "ucb1", "thompson")
    assert baselines_for(TabularMDPBenchmark().spec) == ("random", "psrl", "greedy")


def test_episode_marks() -> None:
    assert episode_marks(1) == [1] and episode_marks(10) == list(range(1, 11))
    assert episode_marks(100) == [1, 2, 5, 10, 20, 50, 100]
    assert episode_marks(500) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


@pytest.mark.parametrize("pulls, marks", [(10, list(range(1, 11))), (25, [1, 2, 5, 10, 20])])
def test_baseline_evaluate_reports_return_per_episode_and_regret(pulls: int, marks: list[int]) -> None:
    bench = BanditBenchmark(arms=3, pulls=pulls)
    algorithm = Baseline(MLP((1,)), bench.spec, policy="ucb1", trials=4)
    batch = bench.sample("test", 5, torch.Generator().manual_seed(2))
    metrics = algorithm.evaluate(batch)
    assert set(metrics) == {"return", "regret"} | {f"return@{k}" for k in marks}
    assert all(v.shape == (5,) for v in metrics.values())
    optimal = batch.make(1).optimal_return()
    assert torch.allclose(metrics["regret"], optimal - metrics["return"])
    assert torch.equal(algorithm.evaluate(batch)["return"], metrics["return"])  # fixed by the tasks' seeds
    assert torch.equal(algorithm.evaluate(batch.slice(1, 3))["return"], metrics["return"][1:3])
    with pytest.raises(UserInputError, match="^algo=baseline has nothing to train"):
        algorithm.meta_loss(batch)


def test_baseline_on_gym_has_no_regret() -> None:
    from metarun.benchmarks.gym import GymBenchmark

    bench = GymBenchmark(horizon=20, episodes=2)
    metrics = Baseline(MLP((4,)), bench.spec, policy="random").evaluate(bench.sample("test", 2, torch.Generator()))
    assert set(metrics) == {"return", "return@1", "return@2"}


@pytest.mark.parametrize("bench, kwargs, message", [
    (BanditBenchmark(), {"policy": "psrl"},
     r"^algo.policy=psrl is not a baseline for benchmark=bandit; valid: one of random, ucb1, thompson, gittins$"),
    (TabularMDPBenchmark(), {"policy": "gittins"}, r"valid: one of random, psrl, greedy$"),
    (BanditBenchmark(), {"policy": "ucb"}, r"algo.policy=ucb is not a baseline"),
    (BanditBenchmark(), {"trials": 0}, r"^algo.trials must be an integer of at least 1 \(got 0\)$"),
    (BanditBenchmark(), {"ucb_c": -1.0}, r"^algo.ucb_c must be a non-negative number"),
    (BanditBenchmark(pulls=201), {"policy": "gittins"}, r"^the Gittins index table is built for 1 to 200 pulls"),
])
def test_bad_baseline_options_are_one_line(bench, kwargs: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message) as caught:
        Baseline(MLP(bench.spec.input_shape), bench.spec, **kwargs)
    assert "\n" not in str(caught.value)
