"""MAML for RL, groundwork (issue 18): the 2D navigation dynamics against hand-worked steps and its exact optimum,
determinism from the task seeds, bad options as one line, the linear feature baseline against numpy's lstsq, and
the batched meta-gradient against a naive per-task loop in float64 on fixed rollouts."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from metarun.benchmarks.navigation2d import Navigation2DBenchmark
from metarun.errors import UserInputError
from metarun.rl.envs import EnvBatch
from metarun.rl.navigation2d import make_navigation2d, optimal_episode_return
from metarun.rl.policy_gradient import (GaussianPolicy, PolicyGradientBatch, advantages, adapt,
                                        baseline_features, collect, discounted_returns, fit_linear_baseline,
                                        gaussian_mlp, init_gaussian_mlp, maml_rl_meta_loss, per_task,
                                        reinforce_loss, reinforce_losses)
from metarun.rl.rollout import StepInput


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch(goals: list[list[float]], *, horizon: int, episodes: int = 1, goal_tolerance: float = 0.01,
           action_scale: float = 1.0, seeds: tuple[int, ...] | None = None) -> EnvBatch:
    seeds = seeds or tuple(range(3, 3 + len(goals)))
    return EnvBatch({"goals": torch.tensor(goals, dtype=torch.float64)}, torch.tensor(seeds),
                    functools.partial(make_navigation2d, horizon=horizon, episodes=episodes,
                                      goal_tolerance=goal_tolerance, action_scale=action_scale))


class _Scripted:
    """A RolloutPolicy replaying fixed actions [L, T, E, 2]."""

    def __init__(self, actions: Tensor) -> None:
        self.actions = actions

    def start(self, env):
        return None

    def act(self, step: StepInput, memory, t: int, noise):
        return self.actions[t], None, {}


# -- the environment ---------------------------------------------------------------------------------------------

def test_navigation_steps_by_hand_clip_reward_goal_padding_and_episode_reset() -> None:
    env = _batch([[0.25, -0.05]], horizon=4, episodes=2).make(1)
    assert env.action_size == 2 and env.observation_size == 2
    assert torch.equal(env.reset(), torch.zeros(1, 1, 2, dtype=torch.float64))
    a = lambda x, y: torch.tensor([[[x, y]]], dtype=torch.float64)  # noqa: E731
    steps = [  # action, next position, reward, done, active after the step
        (a(0.5, -0.02), [0.1, -0.02], -math.hypot(0.15, 0.03), False, True),  # x clipped to 0.1
        (a(0.1, -0.1), [0.2, -0.12], -math.hypot(0.05, 0.07), False, True),
        (a(0.05, -0.005), [0.25, -0.125], -math.hypot(0.0, 0.075), False, True),
        (a(-0.3, 0.3), [0.15, -0.025], -math.hypot(0.1, 0.025), False, True),  # both clipped
    ]
    env2 = _batch([[0.25, -0.05]], horizon=6).make(1)
    env2.reset()
    for action, position, reward, done, alive in steps:
        obs, r, d = env2.step(action)
        torch.testing.assert_close(obs, torch.tensor([[position]], dtype=torch.float64), rtol=0, atol=1e-15)
        torch.testing.assert_close(r, torch.tensor([[reward]], dtype=torch.float64), rtol=0, atol=1e-15)
        assert bool(d) is done and bool(env2.active()) is alive
    # within 0.01 in both coordinates: the episode is over; the rest of it is padding
    obs, r, d = env2.step(a(0.1, -0.02))
    assert torch.allclose(obs, torch.tensor([[[0.25, -0.045]]], dtype=torch.float64))
    assert math.isclose(float(r), -0.005, rel_tol=1e-9) and not bool(env2.active())
    obs, r, d = env2.step(a(1.0, 1.0))  # ignored: the point stays, reward 0; the horizon ends the episode
    assert float(r) == 0.0 and bool(d) and torch.equal(obs, torch.zeros(1, 1, 2, dtype=torch.float64))
    assert bool(env2.active())

    # the two-episode trial: the horizon resets the point to the origin and starts counting again
    env.reset()
    for _ in range(4):
        obs, r, d = env.step(a(0.0, 0.0))
        assert math.isclose(float(r), -math.hypot(0.25, 0.05), rel_tol=1e-12)
    assert bool(d) and torch.equal(obs, torch.zeros(1, 1, 2, dtype=torch.float64))
    obs, r, d = env.step(a(-5.0, 0.0))
    assert torch.allclose(obs, torch.tensor([[[-0.1, 0.0]]], dtype=torch.float64)) and not bool(d)
    assert math.isclose(float(r), -math.hypot(0.35, 0.05), rel_tol=1e-12)
    for _ in range(3):
        env.step(a(0.0, 0.0))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(a(0.0, 0.0))


def test_action_scale_scales_before_the_clip_and_no_tolerance_never_ends_early() -> None:
    env = _batch([[0.0, 0.0]], horizon=3, goal_tolerance=0.0, action_scale=0.1).make(1)
    env.reset()
    obs, _, _ = env.step(torch.tensor([[[0.5, -3.0]]], dtype=torch.float64))
    assert torch.allclose(obs, torch.tensor([[[0.05, -0.1]]], dtype=torch.float64))
    obs, r, _ = env.step(torch.tensor([[[-0.5, 1.0]]], dtype=torch.float64))  # back at the goal exactly
    assert float(r) == 0.0 and bool(env.active())  # tolerance 0: never terminates


def test_optimal_return_by_hand_and_attained_by_the_projection_path_only() -> None:
    goals = [[0.25, -0.05], [0.105, 0.0], [-0.5, 0.5]]
    want = [-(0.15 + 0.05), -0.005, -(math.hypot(0.4, 0.4) + math.hypot(0.3, 0.3) + math.hypot(0.2, 0.2)
                                      + math.hypot(0.1, 0.1))]
    batch = _batch(goals, horizon=10, episodes=2)
    env = batch.make(3)
    torch.testing.assert_close(env.optimal_return(), 2 * torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(optimal_episode_return(batch.params["goals"], 10, 0.0),
                               torch.tensor(want, dtype=torch.float64))
    # moving along clip(goal, -0.1 k, 0.1 k) attains it; a perturbed or random path does worse
    g = batch.params["goals"]
    k = torch.arange(0, 11, dtype=torch.float64)[:, None, None]
    path = torch.maximum(torch.minimum(g, 0.1 * k), -0.1 * k)  # [11, T, 2]
    velocity = (path[1:] - path[:-1]).unsqueeze(2).expand(10, 3, 3, 2).clone()  # [L, T, E, 2]
    velocity[:, :, 1] += 0.02  # trial 1 drifts
    velocity[:, :, 2] = torch.randn(10, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    episodes = collect(env, _Scripted(torch.cat([velocity, velocity])))
    returns = episodes.rewards.sum(-1)  # [T, E]
    torch.testing.assert_close(returns[:, 0], env.optimal_return())
    assert (returns[:, 1:] < env.optimal_return()[:, None] - 1e-6).all()
    assert not episodes.valid[:, 0, :10].all() and episodes.valid[:, :, 10].all()  # padding, then episode 2


def test_benchmark_draws_goals_in_the_range_from_the_generator_and_rollouts_from_the_seeds() -> None:
    bench = Navigation2DBenchmark(horizon=12, goal_range=(-0.2, 0.3))
    assert bench.spec.output_size == 2 and bench.spec.trial_length == 12 and bench.spec.input_shape == (2,)
    batch = bench.sample("train", 5, torch.Generator().manual_seed(4))
    again = bench.sample("train", 5, torch.Generator().manual_seed(4))
    goals = batch.params["goals"]
    assert goals.shape == (5, 2) and (goals >= -0.2).all() and (goals < 0.3).all()
    assert torch.equal(goals, again.params["goals"]) and torch.equal(batch.seeds, again.seeds)
    params = init_gaussian_mlp(2, 2, [8], torch.Generator().manual_seed(0))
    whole = collect(batch.make(3), GaussianPolicy(params))
    part = collect(batch.slice(2, 4).make(3), GaussianPolicy(params))  # a task's rollout: its seed only
    for name in ("observations", "actions", "rewards", "valid"):
        assert torch.equal(getattr(whole, name)[2:4], getattr(part, name)), name
    other = collect(EnvBatch(batch.params, batch.seeds + 1, batch.maker).make(3), GaussianPolicy(params))
    assert not torch.equal(whole.actions, other.actions)
    assert not torch.equal(whole.actions[:, 0], whole.actions[:, 1])  # parallel trials draw their own noise


@pytest.mark.parametrize("options, key", [
    ({"horizon": 0}, "benchmark.horizon"), ({"horizon": 2.0}, "benchmark.horizon"),
    ({"episodes": 0}, "benchmark.episodes"),
    ({"goal_range": (0.5, -0.5)}, "benchmark.goal_range"), ({"goal_range": (0.5, 0.5)}, "benchmark.goal_range"),
    ({"goal_range": (0.5,)}, "benchmark.goal_range"), ({"goal_range": "0.5"}, "benchmark.goal_range"),
    ({"goal_range": (0.0, float("nan"))}, "benchmark.goal_range"), ({"goal_range": 1.0}, "benchmark.goal_range"),
    ({"goal_range": (0.0, True)}, "benchmark.goal_range"),
    ({"goal_tolerance": -0.1}, "benchmark.goal_tolerance"), ({"action_scale": 0.0}, "benchmark.action_scale"),
])
def test_bad_options_are_one_line(options: dict, key: str) -> None:
    with pytest.raises(UserInputError) as info:
        Navigation2DBenchmark(**options)
    assert str(info.value).startswith(key) and "\n" not in str(info.value)


def test_sample_refuses_an_episode_shape() -> None:
    with pytest.raises(UserInputError, match="no episode shape"):
        Navigation2DBenchmark().sample("train", 2, torch.Generator(), shots=5)


# -- returns and the linear feature baseline ---------------------------------------------------------------------

def test_discounted_returns_restart_at_each_episode() -> None:
    rewards = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = discounted_returns(rewards, 0.9, horizon=4)
    want = torch.zeros_like(rewards)
    for end in (4, 8):
        running = torch.zeros(2, 3, dtype=torch.float64)
        for t in range(end - 1, end - 5, -1):
            running = rewards[..., t] + 0.9 * running
            want[..., t] = running
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_linear_baseline_fit_is_ridge_least_squares_per_task_against_numpy_lstsq() -> None:
    generator = torch.Generator().manual_seed(2)
    observations = torch.randn(3, 4, 6, 2, dtype=torch.float64, generator=generator) * 5  # some clipped at 10
    features = baseline_features(observations, horizon=6)
    assert features.shape == (3, 4, 6, 8)
    torch.testing.assert_close(features[0, 1, 5], torch.cat([observations[0, 1, 5].clamp(-10, 10),
                                                             observations[0, 1, 5].clamp(-10, 10) ** 2,
                                                             torch.tensor([0.05, 0.05**2, 0.05**3, 1.0],
                                                                          dtype=torch.float64)]))
    targets = torch.randn(3, 24, dtype=torch.float64, generator=generator)
    weights = (torch.rand(3, 24, generator=generator) > 0.3).to(torch.float64)  # 0: padding, left out
    reg = 1e-3
    got = fit_linear_baseline(features.reshape(3, 24, 8), targets, weights, reg)
    for t in range(3):
        keep = weights[t].bool().numpy()
        x, y = features.reshape(3, 24, 8)[t].numpy()[keep], targets[t].numpy()[keep]
        # ridge as ordinary least squares on the system stacked with sqrt(reg) I
        stacked_x = np.concatenate([x, math.sqrt(reg) * np.eye(8)])
        stacked_y = np.concatenate([y, np.zeros(8)])
        want = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
        np.testing.assert_allclose(got[t].numpy(), want, rtol=1e-8, atol=1e-10)


def test_a_singular_fit_raises_the_regularisation_instead_of_returning_nan() -> None:
    features = torch.zeros(2, 5, 3, dtype=torch.float64)
    features[1] = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coeffs = fit_linear_baseline(features, torch.ones(2, 5, dtype=torch.float64), torch.ones(2, 5,
                                 dtype=torch.float64), reg=0.0)
    assert torch.isfinite(coeffs).all()


def _rollouts(tasks: int = 4, trials: int = 5, horizon: int = 15, seed: int = 0):
    """Fixed float64 rollouts with some padding (a loose goal tolerance near small goals)."""
    bench = Navigation2DBenchmark(horizon=horizon, goal_range=(-0.15, 0.15), goal_tolerance=0.06)
    batch = bench.sample("train", tasks, torch.Generator().manual_seed(seed)).to("cpu", torch.float64)
    params = init_gaussian_mlp(2, 2, [6, 5], torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = {k: v + 0.1 * torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
              for k, v in params.items()}  # nonzero biases, std != 1
    inner = collect(batch.make(trials), GaussianPolicy(params))
    shifted = {k: v + 0.05 for k, v in params.items()}
    outer = collect(EnvBatch(batch.params, batch.seeds + 7, batch.maker).make(trials), GaussianPolicy(shifted))
    return params, inner, outer, bench


def test_advantages_are_returns_minus_the_baseline_normalised_per_task_over_valid_steps() -> None:
    _, episodes, _, bench = _rollouts()
    assert not episodes.valid.all(), "the fixture should exercise the padding"
    raw = advantages(episodes, gamma=0.99, horizon=bench.horizon, normalize=False)
    batch = advantages(episodes, gamma=0.99, horizon=bench.horizon)
    valid = episodes.valid
    assert (batch.advantages[~valid] == 0).all() and (raw.advantages[~valid] == 0).all()
    for t in range(episodes.rewards.shape[0]):
        a = batch.advantages[t][valid[t]]
        assert abs(float(a.mean())) < 1e-10 and abs(float(a.std(unbiased=False)) - 1) < 1e-6
        r = raw.advantages[t][valid[t]]
        torch.testing.assert_close(a, (r - r.mean()) / (r.std(unbiased=False) + 1e-8))


# -- the policy and the meta-gradient ----------------------------------------------------------------------------

def test_per_task_policy_equals_the_single_task_policy_under_vmap() -> None:
    params = init_gaussian_mlp(2, 2, [7, 3], torch.Generator().manual_seed(1), dtype=torch.float64)
    batched = {k: v + 0.1 * torch.randn(4, *v.shape, dtype=torch.float64) for k, v in params.items()}
    observations = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    got = gaussian_mlp(batched, observations)
    want = torch.func.vmap(gaussian_mlp)(batched, observations)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_inner_gradients_equal_torch_func_grad_per_task() -> None:
    params, episodes, _, bench = _rollouts()
    batch = advantages(episodes, gamma=0.99, horizon=bench.horizon)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    adapted = adapt(per_task(leaves, batch.num_tasks), batch, lr=0.3, first_order=True)
    grads = torch.func.vmap(torch.func.grad(reinforce_loss), in_dims=(None, 0, 0, 0, 0))(
        params, batch.observations, batch.actions, batch.advantages, batch.valid)
    for k in params:
        torch.testing.assert_close(adapted[k], params[k] - 0.3 * grads[k], rtol=1e-12, atol=1e-12)


def _naive_loss(params: dict[str, Tensor], batch: PolicyGradientBatch, t: int) -> Tensor:
    """Task t's REINFORCE loss written out independently: explicit layers, torch.distributions, valid steps
    selected by indexing."""
    x = batch.observations[t]
    n = sum(1 for k in params if k.endswith(".weight"))
    for i in range(n):
        x = x @ params[f"layer{i}.weight"].T + params[f"layer{i}.bias"]
        x = torch.relu(x) if i < n - 1 else x
    dist = torch.distributions.Independent(torch.distributions.Normal(x, params["log_std"].exp()), 1)
    keep = batch.valid[t].bool()
    return -(dist.log_prob(batch.actions[t])[keep] * batch.advantages[t][keep]).mean()


def _naive_meta_gradient(params: dict[str, Tensor], inner: list[PolicyGradientBatch], outer: PolicyGradientBatch,
                         lr: float, first_order: bool) -> dict[str, Tensor]:
    """The paper-code loop: one task at a time, torch.autograd.grad for each inner step."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = 0.0
    for t in range(outer.num_tasks):
        fast = dict(leaves)
        for batch in inner:
            grads = torch.autograd.grad(_naive_loss(fast, batch, t), list(fast.values()),
                                        create_graph=not first_order)
            fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads)}
        total = total + _naive_loss(fast, outer, t)
    meta = total / outer.num_tasks
    return dict(zip(leaves, torch.autograd.grad(meta, list(leaves.values()))))


def _batched_meta_gradient(params, inner, outer, lr, first_order) -> dict[str, Tensor]:
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss, losses = maml_rl_meta_loss(leaves, inner, outer, lr=lr, first_order=first_order)
    assert losses.shape == (outer.num_tasks,)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for k in want:
        err = float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30))
        assert err < rtol, f"{k}: relative error {err:.2e}"


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_batched_meta_gradient_equals_the_per_task_loop_in_float64(first_order: bool, steps: int) -> None:
    params, inner_episodes, outer_episodes, bench = _rollouts()
    inner = [advantages(inner_episodes, gamma=0.99, horizon=bench.horizon)]
    if steps == 2:  # fixed rollouts stand in for the adapted policy's: another draw of the same tasks
        _, second, _, _ = _rollouts(seed=1)
        inner.append(advantages(second, gamma=0.99, horizon=bench.horizon))
    outer = advantages(outer_episodes, gamma=0.99, horizon=bench.horizon)
    got = _batched_meta_gradient(params, inner, outer, 0.1, first_order)
    _close(got, _naive_meta_gradient(params, inner, outer, 0.1, first_order))


def test_first_order_differs_from_second_order() -> None:
    """Guards the reference: if both orders agreed, the test above could not tell them apart."""
    params, inner_episodes, outer_episodes, bench = _rollouts()
    inner = [advantages(inner_episodes, gamma=0.99, horizon=bench.horizon)]
    outer = advantages(outer_episodes, gamma=0.99, horizon=bench.horizon)
    second = _batched_meta_gradient(params, inner, outer, 0.5, False)
    first = _batched_meta_gradient(params, inner, outer, 0.5, True)
    assert max(float((second[k] - first[k]).abs().max()) for k in second) > 1e-4
    # and with no inner step size, both are the plain policy gradient of the outer rollouts
    zero_lr = _batched_meta_gradient(params, inner, outer, 0.0, False)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    plain = dict(zip(leaves, torch.autograd.grad(reinforce_losses(leaves, outer).mean(), list(leaves.values()))))
    _close(zero_lr, plain, 1e-12)


def test_meta_loss_of_an_adapted_policy_matches_its_direct_evaluation() -> None:
    """The per-task losses maml_rl_meta_loss returns are those of the adapted parameters (for logging)."""
    params, inner_episodes, outer_episodes, bench = _rollouts(tasks=3)
    inner = advantages(inner_episodes, gamma=0.99, horizon=bench.horizon)
    outer = advantages(outer_episodes, gamma=0.99, horizon=bench.horizon)
    _, losses = maml_rl_meta_loss(params, [inner], outer, lr=0.2, first_order=True)
    for t in range(3):
        one = inner.slice(t, t + 1)
        single = {k: v.unsqueeze(0) for k, v in params.items()}
        fast = {k: v.detach() for k, v in adapt(single, one, 0.2, True).items()}  # detached: leaves of its own
        torch.testing.assert_close(losses[t:t + 1], reinforce_losses(fast, outer.slice(t, t + 1)),
                                   rtol=1e-12, atol=1e-12)


def test_padding_after_the_goal_counts_nowhere() -> None:
    """Steps after an episode reached its goal (valid False): their actions and observations change no loss."""
    params, episodes, _, bench = _rollouts()
    batch = advantages(episodes, gamma=0.99, horizon=bench.horizon)
    pad = ~episodes.valid
    noisy = PolicyGradientBatch(torch.where(pad[..., None], torch.full_like(batch.observations, 3.0),
                                            batch.observations),
                                torch.where(pad[..., None], torch.full_like(batch.actions, -7.0), batch.actions),
                                batch.advantages, batch.valid)
    torch.testing.assert_close(reinforce_losses(params, noisy), reinforce_losses(params, batch), rtol=1e-12,
                               atol=1e-12)
