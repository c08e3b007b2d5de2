"""Meta-RL environments: the bandit and tabular MDP dynamics against hand-worked steps, episode resets, the
counter-based determinism (a task's rollout does not depend on its batch), optimal returns by hand, the
Gymnasium benchmark (padding, errors, the missing extra), and every bad option as one line."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from metarun.benchmarks.bandit import BanditBenchmark
from metarun.benchmarks.tabular_mdp import TabularMDPBenchmark
from metarun.errors import UserInputError
from metarun.rl.bandit import make_bandit
from metarun.rl.bandit_policies import RandomPolicy
from metarun.rl.envs import EnvBatch
from metarun.rl.noise import TaskNoise
from metarun.rl.rollout import Trajectory, rollout
from metarun.rl.tabular_mdp import (REWARD_NOISE_STD, alias_tables, make_tabular_mdp, normal_quantile, plan,
                                    standard_normal)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mdp_batch(transitions: list, rewards: list, initial: list, horizon: int, episodes: int,
               seeds: tuple[int, ...] = (7,)) -> EnvBatch:
    T = len(seeds)
    params = {"transitions": torch.tensor([transitions] * T), "reward_means": torch.tensor([rewards] * T),
              "initial": torch.tensor([initial] * T)}
    return EnvBatch(params, torch.tensor(seeds), functools.partial(make_tabular_mdp, horizon=horizon,
                                                                   episodes=episodes))


# a 2-state, 2-action MDP: action 0 stays, action 1 switches; rewards R[s][a]
STAY_SWITCH = [[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]
REWARDS = [[0.0, 1.0], [2.0, 0.0]]


def _same(a: Trajectory, b: Trajectory) -> None:
    for name in ("observations", "actions", "rewards", "dones"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# -- bandit --------------------------------------------------------------------------------------------------

def test_bandit_steps_are_bernoulli_draws_of_the_pulled_arm_from_the_task_noise() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.5]])
    batch = EnvBatch({"probs": probs}, torch.tensor([3]), functools.partial(make_bandit, pulls=4))
    env = batch.make(2)
    assert torch.equal(env.reset(), torch.zeros(1, 2, 1))
    noise = TaskNoise(torch.tensor([3]), 2)
    for t, arms in enumerate(([0, 1], [1, 2], [2, 2], [0, 0])):
        obs, reward, done = env.step(torch.tensor([arms]))
        expected = (noise.uniform(0, t)[0] < probs[0, arms]).float()
        assert torch.equal(reward[0], expected)
        assert done.all() and torch.equal(obs, torch.zeros(1, 2, 1))  # every pull ends an episode
    assert reward[0].tolist() == [0.0, 0.0]  # arm 0 never pays
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(torch.zeros(1, 2, dtype=torch.long))
    assert env.optimal_return().tolist() == [4.0]  # pulls x max p


def test_bandit_benchmark_spec_and_task_distribution() -> None:
    bench = BanditBenchmark(arms=3, pulls=7)
    spec = bench.spec
    assert (spec.kind, spec.metric, spec.input_shape, spec.output_size, spec.horizon, spec.episodes) == \
        ("reinforcement", "return", (1,), 3, 1, 7)
    assert spec.trial_length == 7 and spec.higher_is_better
    batch = bench.sample("train", 500, torch.Generator().manual_seed(0))
    probs = batch.params["probs"]
    assert probs.shape == (500, 3) and 0 <= probs.min() and probs.max() < 1
    assert abs(probs.mean().item() - 0.5) < 0.03  # U[0, 1]
    assert batch.seeds.dtype == torch.int64 and batch.seeds.unique().numel() == 500


# -- tabular MDP ---------------------------------------------------------------------------------------------

def test_tabular_mdp_steps_by_hand_and_resets_at_each_episode_end() -> None:
    batch = _mdp_batch(STAY_SWITCH, REWARDS, [1.0, 0.0], horizon=2, episodes=2)
    env = batch.make(1)
    noise = TaskNoise(batch.seeds, 1)
    obs = env.reset()
    assert obs.tolist() == [[[1.0, 0.0]]]  # starts in state 0
    # t = 0: switch from 0 -> state 1, mean reward R[0][1] = 1
    obs, reward, done = env.step(torch.tensor([[1]]))
    assert obs.tolist() == [[[0.0, 1.0]]] and not done.any()
    assert torch.allclose(reward, 1.0 + REWARD_NOISE_STD * standard_normal(noise, 0, 0))
    # t = 1: stay in 1 (reward R[1][0] = 2); the episode ends, so the observation is the next start (state 0)
    obs, reward, done = env.step(torch.tensor([[0]]))
    assert torch.allclose(reward, 2.0 + standard_normal(noise, 0, 1)) and done.all()
    assert obs.tolist() == [[[1.0, 0.0]]]
    obs, reward, done = env.step(torch.tensor([[0]]))  # t = 2: stay in 0, reward R[0][0] = 0
    assert obs.tolist() == [[[1.0, 0.0]]] and torch.allclose(reward, standard_normal(noise, 0, 2)) and not done.any()
    env.step(torch.tensor([[0]]))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(torch.tensor([[0]]))


def test_alias_tables_give_back_the_distributions() -> None:
    probs = torch.rand(200, 7, generator=torch.Generator().manual_seed(0)) ** 3
    probs[0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    probs[1] = 1 / 7
    probs = probs / probs.sum(-1, keepdim=True)
    keep, alias = alias_tables(probs)
    # outcome i comes from its own column with probability keep[i] / K, and from every column j aliased to it
    implied = keep / 7 + torch.zeros_like(probs).scatter_add_(-1, alias, (1 - keep) / 7)
    assert torch.allclose(implied, probs, atol=1e-6)
    assert alias[0].eq(1).all() and keep[1].eq(1).all()


def test_reward_noise_is_finite_and_symmetric_at_the_extreme_uniforms() -> None:
    z = normal_quantile(torch.tensor([0.0, 1.0 - 2.0**-24]))
    assert torch.isfinite(z).all() and z.dtype == torch.float32
    assert z[0].item() == pytest.approx(-z[1].item()) and z[0].item() == pytest.approx(-5.42, abs=0.01)


def test_tabular_mdp_transitions_and_starts_follow_their_distributions() -> None:
    # from either state, either action goes to state 1 with probability 0.8; episodes start uniformly
    transitions = [[[0.2, 0.8], [0.2, 0.8]], [[0.2, 0.8], [0.2, 0.8]]]
    batch = _mdp_batch(transitions, REWARDS, [0.5, 0.5], horizon=3, episodes=2)
    trajectory = rollout(batch.make(4000), RandomPolicy(2))
    states = trajectory.observations.argmax(-1)[0]  # [E, L]
    starts = states[:, [0, 3]].float()
    assert abs(starts.mean().item() - 0.5) < 0.03
    moved = states[:, [1, 2, 4, 5]].float()
    assert abs(moved.mean().item() - 0.8) < 0.02
    rewards = trajectory.rewards[0] - torch.tensor(REWARDS)[states, trajectory.actions[0]]  # the reward noise
    assert abs(rewards.mean().item()) < 0.03 and abs(rewards.std().item() - REWARD_NOISE_STD) < 0.03


def test_optimal_return_by_hand_on_a_two_state_mdp() -> None:
    # horizon 2 from state 0: switch (1) then stay in 1 (2) = 3; from state 1: stay twice = 4
    first = _mdp_batch(STAY_SWITCH, REWARDS, [1.0, 0.0], horizon=2, episodes=3).make(1)
    assert first.optimal_return().tolist() == pytest.approx([3 * 3.0])
    uniform = _mdp_batch(STAY_SWITCH, REWARDS, [0.5, 0.5], horizon=2, episodes=3).make(1)
    assert uniform.optimal_return().tolist() == pytest.approx([3 * 3.5])
    # switching from 0 reaches state 1 only half the time: 1 + (0.5 x 1 + 0.5 x 2) = 2.5
    noisy = [[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [1.0, 0.0]]]
    half = _mdp_batch(noisy, REWARDS, [1.0, 0.0], horizon=2, episodes=1).make(1)
    assert half.optimal_return().tolist() == pytest.approx([2.5])
    q = plan(torch.tensor(noisy), torch.tensor(REWARDS), 2)
    assert q.shape == (2, 2, 2) and q[0].tolist() == REWARDS and q[1, 0].tolist() == pytest.approx([1.0, 2.5])


def test_tabular_mdp_benchmark_draws_duans_distribution() -> None:
    bench = TabularMDPBenchmark()
    spec = bench.spec
    assert (spec.input_shape, spec.output_size, spec.horizon, spec.episodes) == ((10,), 5, 10, 10)
    batch = bench.sample("val", 400, torch.Generator().manual_seed(1))
    means, transitions = batch.params["reward_means"], batch.params["transitions"]
    assert abs(means.mean().item() - 1.0) < 0.02 and abs(means.std().item() - 1.0) < 0.02  # N(1, 1)
    assert torch.allclose(transitions.sum(-1), torch.ones(400, 10, 5))
    assert abs(transitions.var().item() - 9 / (100 * 11)) < 2e-4  # flat Dirichlet: (K-1) / (K^2 (K+1))
    assert batch.params["initial"][:, 0].eq(1).all() and batch.params["initial"].sum().item() == 400  # state 0
    uniform = TabularMDPBenchmark(initial_state="uniform").sample("val", 2, torch.Generator().manual_seed(1))
    assert torch.equal(uniform.params["initial"], torch.full((2, 10), 0.1))


# -- determinism ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bench", [BanditBenchmark(arms=4, pulls=6), TabularMDPBenchmark(horizon=3, episodes=2)],
                         ids=["bandit", "tabular_mdp"])
def test_a_tasks_rollout_depends_on_its_seed_only(bench) -> None:
    batch = bench.sample("test", 6, torch.Generator().manual_seed(5))
    whole = rollout(batch.make(3), RandomPolicy(bench.spec.output_size))
    _same(whole, rollout(batch.make(3), RandomPolicy(bench.spec.output_size)))  # same seeds, same rollout
    part = rollout(batch.slice(2, 4).make(3), RandomPolicy(bench.spec.output_size))
    for name in ("observations", "actions", "rewards", "dones"):
        assert torch.equal(getattr(part, name), getattr(whole, name)[2:4]), name
    again = bench.sample("test", 6, torch.Generator().manual_seed(5))
    _same(whole, rollout(again.make(3), RandomPolicy(bench.spec.output_size)))
    # the trials of a task differ from each other
    assert not torch.equal(whole.rewards[:, 0], whole.rewards[:, 1])


# -- Gymnasium -----------------------------------------------------------------------------------------------

def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metarun.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("benchmark, policy", [("bandit", "gittins"), ("tabular_mdp", "psrl"), ("gym", "random")])
def test_rl_benchmarks_compose_with_the_baseline_algorithm(benchmark: str, policy: str) -> None:
    from metarun.run import build

    cfg = _compose("algo=baseline", f"algo.policy={policy}", f"benchmark={benchmark}")
    assert cfg.trainer.steps == 0
    bench, algorithm = build(cfg, {"algo": "baseline", "model": "mlp", "benchmark": benchmark})
    assert bench.spec.kind == "reinforcement"
    metrics = algorithm.evaluate(bench.sample("test", 2, torch.Generator().manual_seed(0)))
    assert metrics["return"].shape == (2,)


def test_gym_benchmark_pads_an_episode_that_ends_early() -> None:
    from metarun.benchmarks.gym import GymBenchmark

    bench = GymBenchmark(env_id="CartPole-v1", task_parameter="gravity", task_range=[9.0, 10.0], horizon=60,
                         episodes=2)
    assert (bench.spec.input_shape, bench.spec.output_size, bench.spec.trial_length) == ((4,), 2, 120)
    batch = bench.sample("train", 2, torch.Generator().manual_seed(0))
    env = batch.make(3)
    assert [e.unwrapped.gravity for e in env.vector.envs] == pytest.approx(
        batch.params["task_value"].repeat_interleave(3).tolist())
    trajectory = rollout(env, RandomPolicy(2))
    assert torch.isnan(env.optimal_return()).all()
    rewards, observations = trajectory.rewards, trajectory.observations
    assert trajectory.dones.nonzero()[:, 2].unique().tolist() == [59, 119]  # done at the horizon only
    first = rewards[..., :60]
    lengths = first.sum(-1)  # CartPole pays 1 per step alive; random play falls within 60 steps
    assert (lengths < 60).all()
    for task in range(2):
        for trial in range(3):
            n = int(lengths[task, trial])
            assert first[task, trial, :n].eq(1).all() and first[task, trial, n:].eq(0).all()
            # the observation is frozen after the end (observations[t] is what the policy saw at t)
            frozen = observations[task, trial, n + 1:60]
            assert torch.equal(frozen, observations[task, trial, n:n + 1].expand_as(frozen))
    assert rewards[..., 60].eq(1).all()  # the second episode starts afresh
    again = rollout(bench.sample("train", 2, torch.Generator().manual_seed(0)).make(3), RandomPolicy(2))
    _same(trajectory, again)
    part = rollout(batch.slice(1, 2).make(3), RandomPolicy(2))
    assert torch.equal(part.rewards, rewards[1:2]) and torch.equal(part.observations, observations[1:2])


def test_gym_discrete_observations_are_one_hot() -> None:
    from metarun.benchmarks.gym import GymBenchmark

    bench = GymBenchmark(env_id="FrozenLake-v1", task_parameter=None, horizon=5, episodes=1)
    assert bench.spec.input_shape == (16,) and bench.spec.output_size == 4
    trajectory = rollout(bench.sample("val", 2, torch.Generator()).make(2), RandomPolicy(4))
    assert trajectory.observations.sum(-1).eq(1).all() and trajectory.observations[..., 0, 0].eq(1).all()


def test_gym_errors_are_one_line() -> None:
    from metarun.benchmarks.gym import GymBenchmark

    with pytest.raises(UserInputError, match=r"^benchmark.env_id=NoSuchEnv-v0: Environment `NoSuchEnv` doesn't exist"):
        GymBenchmark(env_id="NoSuchEnv-v0")
    with pytest.raises(UserInputError, match=r"has no attribute 'pole_colour'; its numeric attributes: .*gravity"):
        GymBenchmark(env_id="CartPole-v1", task_parameter="pole_colour")
    with pytest.raises(UserInputError, match="needs a Box or Discrete observation space; Blackjack-v1 has Tuple"):
        GymBenchmark(env_id="Blackjack-v1", task_parameter=None)
    # Box actions are continuous: the spec says so, and the discrete learners refuse them in one line (run.py)
    assert GymBenchmark(env_id="Pendulum-v1", task_parameter=None).spec.continuous_actions
    with pytest.raises(UserInputError, match=r"task_range must be \[lo, hi\]"):
        GymBenchmark(task_range=[2.0, 1.0])


def test_without_gymnasium_the_gym_benchmark_says_what_to_install(monkeypatch) -> None:
    from metarun.benchmarks.gym import GymBenchmark

    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now raises ImportError
    with pytest.raises(UserInputError) as caught:
        GymBenchmark()
    assert str(caught.value) == 'benchmark=gym needs Gymnasium: pip install ".[rl]"'


# -- bad options ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: BanditBenchmark(arms=1), r"benchmark.arms must be an integer of at least 2 \(got 1\)"),
    (lambda: BanditBenchmark(pulls=0), r"benchmark.pulls must be an integer of at least 1 \(got 0\)"),
    (lambda: BanditBenchmark(pulls=2.5), r"benchmark.pulls must be an integer of at least 1 \(got 2.5\)"),
    (lambda: TabularMDPBenchmark(episodes=-1), r"benchmark.episodes must be an integer of at least 1"),
    (lambda: TabularMDPBenchmark(states=0), r"benchmark.states must be an integer of at least 1"),
    (lambda: TabularMDPBenchmark(actions=1), r"benchmark.actions must be an integer of at least 2"),
    (lambda: TabularMDPBenchmark(horizon=0), r"benchmark.horizon must be an integer of at least 1"),
    (lambda: TabularMDPBenchmark(initial_state="middle"), r"benchmark.initial_state must be one of uniform, first"),
    (lambda: BanditBenchmark().sample("train", 2, torch.Generator(), ways=5),
     r"benchmark=bandit is reinforcement learning and has no episode shape, so ways cannot be set"),
    (lambda: TabularMDPBenchmark().sample("train", 2, torch.Generator(), shots=1), r"so shots cannot be set"),
])
def test_bad_rl_benchmark_options_are_one_line(make, message: str) -> None:
    with pytest.raises(UserInputError, match=message) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_gym_bad_episode_shape_is_one_line() -> None:
    from metarun.benchmarks.gym import GymBenchmark

    for kwargs, key in (({"horizon": 0}, "horizon"), ({"episodes": -2}, "episodes")):
        with pytest.raises(UserInputError, match=f"benchmark.{key} must be an integer of at least 1"):
            GymBenchmark(**kwargs)
    with pytest.raises(UserInputError, match="queries cannot be set"):
        GymBenchmark().sample("test", 1, torch.Generator(), queries=3)
