"""algo=rl2: GAE and PPO's loss against hand computations, the rollout/learner agreement that makes PPO's first
ratio 1, evaluation's metrics, a tiny run that learns to explore a 2-armed bandit, and the bad inputs.

The environment is a Bernoulli bandit written here (TinyBandit), so these tests do not depend on the benchmarks;
the configs' bad inputs go through run.build on benchmark=bandit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from metarun.algorithms.rl2 import RL2, policy_inputs
from metarun.benchmarks.base import TaskSpec
from metarun.errors import UserInputError
from metarun.models.gru import GRU
from metarun.models.mlp import MLP
from metarun.models.transformer import Transformer
from metarun.rl.envs import EnvBatch, task_seeds
from metarun.rl.noise import TaskNoise
from metarun.rl.ppo import gae, ppo_loss


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TinyBandit:
    """Bernoulli arms probs [T, K]; a trial is `pulls` episodes of one step; the observation is one zero."""

    observation_size = 1
    horizon = 1

    def __init__(self, params: dict[str, Tensor], trials_per_task: int, noise: TaskNoise, pulls: int) -> None:
        self.probs = params["probs"]
        self.num_tasks, self.num_actions = self.probs.shape
        self.trials_per_task, self.episodes, self.noise, self.t = trials_per_task, pulls, noise, 0

    def reset(self) -> Tensor:
        self.t = 0
        return torch.zeros(self.num_tasks, self.trials_per_task, 1)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        probs = self.probs.unsqueeze(1).expand(-1, self.trials_per_task, -1)
        reward = (self.noise.uniform(0, self.t) < probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)).float()
        self.t += 1
        return torch.zeros(self.num_tasks, self.trials_per_task, 1), reward, torch.ones_like(reward, dtype=torch.bool)

    def optimal_return(self) -> Tensor:
        return self.episodes * self.probs.max(-1).values


def tiny_spec(arms: int = 2, pulls: int = 5) -> TaskSpec:
    return TaskSpec(name="tiny", kind="reinforcement", input_shape=(1,), output_size=arms, ways=0, shots=0,
                    queries=0, horizon=1, episodes=pulls)


def swap_tasks(n: int, seed: int, pulls: int = 5) -> EnvBatch:
    """Two arms, one good (0.9) and one bad (0.1), which is which drawn per task: worth exploring once."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 2, (n,), generator=g).bool()
    probs = torch.where(first[:, None], torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9]))
    return EnvBatch({"probs": probs}, task_seeds(n, g), lambda p, e, noise: TinyBandit(p, e, noise, pulls))


def uniform_tasks(n: int, seed: int, arms: int = 3, pulls: int = 6) -> EnvBatch:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, arms, generator=g)
    return EnvBatch({"probs": probs}, task_seeds(n, g), lambda p, e, noise: TinyBandit(p, e, noise, pulls))


def learner(model: str = "gru", spec: TaskSpec | None = None, dtype: torch.dtype = torch.float32,
            **options: object) -> RL2:
    spec = spec or tiny_spec()
    torch.manual_seed(0)
    shape = RL2.backbone_input_shape(spec)
    body = GRU(shape, hidden=16) if model == "gru" else Transformer(shape, width=16, depth=1, heads=2)
    return RL2(body, spec, torch.Generator().manual_seed(0), **options).to(dtype)  # type: ignore[arg-type]


# --- GAE and PPO by hand ---

def test_gae_against_a_hand_worked_trial() -> None:
    rewards, values = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, -0.5])
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.5)
    # the trial ends after step 2 (V_3 = 0); gamma * lam = 0.45
    # delta_2 = 2 + 0 + 0.5 = 2.5                      A_2 = 2.5
    # delta_1 = 0 + 0.9 * -0.5 - 1.0 = -1.45           A_1 = -1.45 + 0.45 * 2.5 = -0.325
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4              A_0 = 1.4 + 0.45 * -0.325 = 1.25375
    torch.testing.assert_close(advantages, torch.tensor([1.25375, -0.325, 2.5]))
    torch.testing.assert_close(returns, torch.tensor([1.75375, 0.675, 2.0]))
    # lambda = 1: the discounted return to the trial's end; lambda = 0: the one-step TD error
    torch.testing.assert_close(gae(rewards, values, 0.9, 1.0)[1], torch.tensor([1 + 0.81 * 2, 0.9 * 2, 2.0]))
    torch.testing.assert_close(gae(rewards, values, 0.9, 0.0)[0], torch.tensor([1.4, -1.45, 2.5]))


def test_gae_does_not_cut_at_episode_boundaries_and_runs_over_leading_dimensions() -> None:
    """RL^2's trial is the episode: a batch [2, L] gives each row its own recursion, and nothing knows of dones."""
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, -0.5], [0.2, 0.1, 0.3]])
    advantages, _ = gae(rewards, values, 0.9, 0.5)
    torch.testing.assert_close(advantages[0], gae(rewards[0], values[0], 0.9, 0.5)[0])
    torch.testing.assert_close(advantages[1], gae(rewards[1], values[1], 0.9, 0.5)[0])


def test_ppo_loss_against_a_hand_computation() -> None:
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.9], dtype=torch.float64)
    old = torch.log(torch.tensor([0.5, 0.5, 0.25, 0.4], dtype=torch.float64))
    new = (old + ratio.log()).requires_grad_()
    advantages = torch.tensor([1.0, 1.0, -2.0, -1.0], dtype=torch.float64)
    values = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    returns = torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    entropy = torch.tensor([1.0, 0.5, 0.2, 0.3], dtype=torch.float64)
    loss, metrics = ppo_loss(new, old, advantages, values, returns, entropy, clip=0.2, value_coef=0.5,
                             entropy_coef=0.1)
    # min(rho A, clip(rho, 0.8, 1.2) A): min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(-2.2, -2.2); min(-0.9, -0.9)
    # policy loss = -(1.2 + 0.5 - 2.2 - 0.9) / 4 = 0.35
    # value loss = 0.5 * mean([1, 0, 4, 0]) = 0.625; entropy = mean = 0.5
    # loss = 0.35 + 0.5 * 0.625 - 0.1 * 0.5 = 0.6125
    assert math.isclose(metrics["policy_loss"].item(), 0.35, rel_tol=1e-12)
    assert math.isclose(metrics["value_loss"].item(), 0.625, rel_tol=1e-12)
    assert math.isclose(metrics["entropy"].item(), 0.5, rel_tol=1e-12)
    assert math.isclose(loss.item(), 0.6125, rel_tol=1e-12)
    # k3: mean((rho - 1) - log rho) = (0.0945349 + 0.1931472 + 0.0046898 + 0.0053605) / 4
    kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.9)) / 4
    assert math.isclose(metrics["approx_kl"].item(), kl, rel_tol=1e-12) and abs(kl - 0.0744331) < 1e-7
    assert metrics["clip_fraction"].item() == 0.5  # |rho - 1| = 0.5, 0.5 > 0.2; 0.1, 0.1 not
    # d policy_loss / d log pi = -rho A / 4 where the unclipped term is the minimum, 0 where clipping bites
    loss.backward()
    assert new.grad is not None
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.125, 0.55, 0.225], dtype=torch.float64))


# --- the learner ---

def test_backbone_input_shape_is_the_trial_by_observation_action_reward_done() -> None:
    assert RL2.backbone_input_shape(tiny_spec(arms=5, pulls=10)) == (10, 1 + 5 + 2)


def test_policy_inputs_one_hot_the_previous_action_and_start_from_zeros() -> None:
    x = policy_inputs(torch.zeros(1, 2, 1), torch.tensor([[-1, 2]]), torch.tensor([[0.0, 1.0]]),
                      torch.tensor([[True, False]]), 3, torch.float64)
    torch.testing.assert_close(x, torch.tensor([[[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0]]], dtype=torch.float64))


@pytest.mark.parametrize("model", ["gru", "transformer"])
def test_recomputed_log_probs_are_the_rollouts(model: str) -> None:
    """The full-sequence forward of PPO reads the inputs the rollout's steps read: same log-probabilities and
    values (float64), so the first minibatch's ratio is 1: no KL, nothing clipped."""
    spec = tiny_spec(arms=3, pulls=6)
    algo = learner(model, spec, torch.float64, trials_per_task=2, minibatches=1)
    batch = uniform_tasks(4, seed=1)
    trajectory = algo.collect(batch, 2)
    with torch.no_grad():
        log_all, values = algo.heads(algo.backbone(algo.trial_inputs(trajectory).flatten(0, 1)))
    log_probs = log_all.gather(-1, trajectory.actions.flatten(0, 1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(log_probs, trajectory.extras["log_prob"].flatten(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values, trajectory.extras["value"].flatten(0, 1), rtol=1e-12, atol=1e-12)
    _, metrics = algo.meta_loss(next(algo.updates(batch)))
    assert metrics["approx_kl"].abs().item() < 1e-12 and metrics["clip_fraction"].item() == 0.0


def test_updates_yield_epochs_times_minibatches_of_trials_and_meta_loss_scores_each() -> None:
    algo = learner(trials_per_task=2, ppo_epochs=3, minibatches=4)
    batch = swap_tasks(6, seed=0)
    parts = list(algo.updates(batch))  # 12 trials: 4 minibatches of 3, 3 times over
    assert len(parts) == 12 and all(part.num_tasks == 3 for part in parts)
    # each epoch is a fresh permutation of the trials, drawn from the algorithm's generator (seed 0 here); the
    # rollouts themselves are a function of the weights and the tasks' seeds, so collecting again gives them
    data, generator = algo.rollouts(batch), torch.Generator().manual_seed(0)
    for epoch in range(3):
        order = torch.randperm(12, generator=generator).view(4, 3)
        for i in range(4):
            assert torch.equal(parts[4 * epoch + i].inputs, data.inputs[order[i]])
            assert torch.equal(parts[4 * epoch + i].advantages, data.advantages[order[i]])
    loss, metrics = algo.meta_loss(parts[0])
    assert loss.requires_grad and loss.dim() == 0
    assert {"loss", "return", "episode_length", "entropy", "approx_kl", "clip_fraction", "value_loss",
            "policy_loss"} <= set(metrics)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())
    assert metrics["episode_length"].item() == 1.0


def test_a_minibatch_chunked_as_the_trainer_does_gives_the_same_loss() -> None:
    """trainer.task_chunk splits a yielded batch and weights each chunk's loss by its share of the trials: the
    same loss, because every trial has L steps and advantages are standardised over the whole step."""
    algo = learner("gru", dtype=torch.float64, trials_per_task=2, minibatches=1)
    part = next(algo.updates(uniform_tasks(3, seed=4, arms=2, pulls=5)))
    whole = algo.meta_loss(part)[0]
    chunked = sum(algo.meta_loss(part.slice(s, s + 4))[0] * part.slice(s, s + 4).num_tasks / 6 for s in (0, 4))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_rollouts_are_fixed_by_the_task_seeds_whatever_the_tasks_beside_them() -> None:
    algo = learner()
    batch = uniform_tasks(5, seed=3, arms=2, pulls=5)
    whole, part = algo.collect(batch, 3), algo.collect(batch.slice(2, 4), 3)
    assert torch.equal(whole.actions[2:4], part.actions) and torch.equal(whole.rewards[2:4], part.rewards)


def test_evaluate_reports_return_per_episode_and_regret() -> None:
    algo = learner(eval_trials=4)
    batch = uniform_tasks(3, seed=2, arms=2, pulls=5)
    metrics = algo.evaluate(batch)
    assert set(metrics) == {"return", "regret", *(f"return@{k}" for k in range(1, 6))}
    assert all(v.shape == (3,) for v in metrics.values())
    torch.testing.assert_close(sum(metrics[f"return@{k}"] for k in range(1, 6)), metrics["return"])
    torch.testing.assert_close(metrics["regret"], 5 * batch.params["probs"].max(-1).values - metrics["return"])


def test_a_tiny_run_learns_to_explore_a_two_armed_bandit() -> None:
    """One good and one bad arm, which is which unknown: a random policy gets 2.5 of 5 pulls; trying an arm and
    sticking with it or switching gets ~4.1. 60 PPO steps on 64 tasks (about a second) get well above random."""
    algo = learner(trials_per_task=1, ppo_epochs=4, minibatches=2, clip=0.2)
    optimizer = torch.optim.Adam(algo.parameters(), lr=3e-3)
    pool = swap_tasks(200, seed=1)
    before = algo.evaluate(pool)["return"].mean().item()
    for step in range(60):
        for part in algo.updates(swap_tasks(64, seed=100 + step)):
            loss, _ = algo.meta_loss(part)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = algo.evaluate(pool)["return"].mean().item()
    assert before < 2.8 and after > 3.3, (before, after)


# --- bad inputs ---

@pytest.mark.parametrize("option, value, message", [
    ("ppo_epochs", 0, "algo.ppo_epochs must be a positive integer"),
    ("minibatches", 0, "algo.minibatches must be a positive integer"),
    ("trials_per_task", 0, "algo.trials_per_task must be a positive integer"),
    ("eval_trials", 1.5, "algo.eval_trials must be a positive integer"),
    ("clip", 0.0, "algo.clip must be > 0"),
    ("gamma", 1.5, "algo.gamma must be in"),
    ("gae_lambda", -0.1, "algo.gae_lambda in"),
    ("entropy_coef", -1.0, "algo.value_coef and algo.entropy_coef must be >= 0"),
])
def test_bad_options_are_one_line(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        learner(**{option: value})


def test_minibatches_that_do_not_divide_the_trials_are_one_line_before_any_rollout() -> None:
    algo = learner(trials_per_task=2, minibatches=4)
    with pytest.raises(UserInputError, match=r"^algo.minibatches=4 must divide the 10 trials of a step"):
        next(algo.updates(swap_tasks(5, seed=0)))


def test_a_vector_backbone_or_a_supervised_spec_is_refused() -> None:
    spec = tiny_spec()
    with pytest.raises(ValueError, match="needs a sequence model"):
        RL2(MLP((8,)), spec, torch.Generator())  # type: ignore[arg-type]
    supervised = TaskSpec(name="sine", kind="regression", input_shape=(1,), output_size=1, ways=1, shots=5, queries=5)
    with pytest.raises(ValueError, match="learns reinforcement tasks"):
        RL2(GRU((5, 4)), supervised, torch.Generator())


# --- bad inputs through the config, as `metarun train` builds a run (run.build) ---

def build_run(*overrides: str) -> object:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metarun.config import config_dir, validate
    from metarun.run import build

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    names = {g: next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{g}=")), "") for g in
             ("algo", "model", "benchmark")}
    return build(validate(cfg), names)


def test_the_configs_build_rl2_with_a_gru_and_a_transformer_on_a_bandit() -> None:
    for model, body in (("gru", GRU), ("transformer", Transformer)):
        _, algo = build_run("algo=rl2", f"model={model}", "benchmark=bandit", "model.hidden=8" if model == "gru"
                            else "model.width=8", *([] if model == "gru" else ["model.heads=2"]))
        assert isinstance(algo, RL2) and algo.backbone.out_features == 8
        assert model != "gru" or isinstance(algo.backbone, body)


@pytest.mark.parametrize("overrides, fragments", [
    (["model=mlp", "benchmark=bandit"], ["model=mlp needs image/vector inputs", "sequence inputs",
                                         "use model=gru or model=transformer"]),
    (["model=gru", "benchmark=sine"], ["algo=rl2 supports only reinforcement and benchmark=sine is regression",
                                       "use algo=maml or algo=reptile"]),
    (["model=gru", "benchmark=bandit", "algo.ppo_epochs=0"], ["algo: algo.ppo_epochs must be a positive integer"]),
    (["model=gru", "benchmark=bandit", "algo.gamma=0"], ["algo: algo.gamma must be in (0, 1]"]),
])
def test_bad_runs_are_one_line(overrides: list[str], fragments: list[str]) -> None:
    with pytest.raises(UserInputError) as caught:
        build_run("algo=rl2", *overrides)
    line = str(caught.value)
    assert "\n" not in line and all(fragment in line for fragment in fragments), line


def test_a_supervised_algorithm_on_a_bandit_is_refused() -> None:
    with pytest.raises(UserInputError, match=r"^algo=protonet supports only classification and benchmark=bandit is "
                                             r"reinforcement"):
        build_run("algo=protonet", "model=gru", "benchmark=bandit")


# --- the TensorBoard picture ---

def test_visualize_draws_the_cumulative_regret_of_the_policy_and_every_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    import metarun.algorithms.rl2 as rl2
    from metarun.benchmarks.bandit import BanditBenchmark

    drawn: dict[str, object] = {}
    draw = rl2._curve_picture
    monkeypatch.setattr(rl2, "_curve_picture", lambda curves, *a: drawn.update(curves) or draw(curves, *a))
    bench = BanditBenchmark(arms=2, pulls=5)
    algo = learner(spec=bench.spec)
    batch = bench.sample("val", 1, torch.Generator().manual_seed(0))
    pictures = algo.visualize(batch)
    assert list(pictures) == ["cumulative_regret"]
    picture = pictures["cumulative_regret"]
    assert picture.dtype == torch.uint8 and picture.dim() == 3 and picture.shape[0] == 3
    assert list(drawn) == ["RL^2", "random", "ucb1", "thompson", "gittins"]
    # the realised regret after the last pull is the optimal expected return less the mean return
    env = batch.make(rl2.VISUAL_TRIALS)
    from metarun.rl.baselines import make_policy
    from metarun.rl.rollout import rollout
    returns = rollout(env, make_policy("random", bench.spec)).returns.double().mean()
    final = float(drawn["random"][-1])  # type: ignore[index]
    assert math.isclose(final, float(env.optimal_return().double().mean() - returns), rel_tol=1e-9, abs_tol=1e-9)
