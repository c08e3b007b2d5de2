"""MAML for RL through the one trainer (issue 18): algo=maml on benchmark=navigation2d.

- the MAML class's batched meta-gradient on fixed rollouts equals the naive per-task loop in float64 (second and
  first order, one and two inner steps), through the same backbone + head a supervised MAML uses;
- TRPO: conjugate gradient against a direct solve, the Fisher-vector product against finite differences of the
  KL's gradient, and a step on a fixed batch that lowers the surrogate within the KL limit;
- end to end through the CLI (TRPO and Adam), the trajectory picture, resume equality, and the bad inputs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import metarun.trainer as trainer_module
from metarun.algorithms.maml import MAML
from metarun.benchmarks.navigation2d import Navigation2DBenchmark
from metarun.config import config_dir
from metarun.errors import UserInputError
from metarun.models.mlp import MLP
from metarun.rl.maml_rl import collect_adaptation, phase_batch
from metarun.rl.trpo import TRPO, conjugate_gradient, fisher_vector_product
from metarun.run import train
from tests.conftest import run_metarun
from tests.image_fixtures import error_line
from tests.test_maml_rl import _close, _naive_meta_gradient

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ROOT = config_dir()


def _maml(first_order: bool = False, inner_steps: int = 1, hidden: tuple[int, ...] = (6, 5)) -> tuple[MAML, object]:
    bench = Navigation2DBenchmark(horizon=12, goal_range=(-0.15, 0.15), goal_tolerance=0.06)
    torch.manual_seed(0)
    algorithm = MAML(MLP((2,), hidden=hidden), bench.spec, inner_steps=inner_steps, inner_lr=0.3,
                     first_order=first_order, rollouts=4, eval_inner_steps=2, init_std=0.8).double()
    with torch.no_grad():  # nonzero biases, so every parameter's gradient is exercised
        for p in algorithm.parameters():
            p.add_(0.05 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    batch = bench.sample("train", 3, torch.Generator().manual_seed(5)).to("cpu", torch.float64)
    return algorithm, batch


def _as_policy_params(algorithm: MAML) -> dict[str, torch.Tensor]:
    """The MAML net's parameters under tests/test_maml_rl.py's naive policy names (layer0 ... layerN, log_std)."""
    linear = [k[: -len(".weight")] for k, _ in algorithm.net.named_parameters() if k.endswith(".weight")]
    out = {}
    for i, name in enumerate(linear):
        out[f"layer{i}.weight"] = algorithm.net.get_parameter(f"{name}.weight").detach()
        out[f"layer{i}.bias"] = algorithm.net.get_parameter(f"{name}.bias").detach()
    out["log_std"] = algorithm.net.log_std.detach()
    return out


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_on_rollouts_equals_the_naive_per_task_loop_in_float64(first_order: bool,
                                                                                   steps: int) -> None:
    algorithm, batch = _maml(first_order, steps)
    rollouts = next(algorithm.updates(batch))
    assert len(rollouts.inner) == steps and not rollouts.outer.valid.all()  # the padding after a goal is exercised
    loss, metrics = algorithm.meta_loss(rollouts)
    grads = torch.autograd.grad(loss, list(algorithm.parameters()))
    got: dict[str, torch.Tensor] = {}
    names = dict(zip([k for k, _ in algorithm.net.named_parameters()], grads))
    linear = [k[: -len(".weight")] for k in names if k.endswith(".weight")]
    for i, name in enumerate(linear):
        got[f"layer{i}.weight"], got[f"layer{i}.bias"] = names[f"{name}.weight"], names[f"{name}.bias"]
    got["log_std"] = names["log_std"]
    want = _naive_meta_gradient(_as_policy_params(algorithm), list(rollouts.inner), rollouts.outer, 0.3, first_order)
    _close(got, want)
    assert set(metrics) == {"loss", "kl", "return@0", "return"} and float(metrics["kl"]) == 0.0


def test_rollout_phases_draw_their_own_noise_and_depend_only_on_the_task_seeds() -> None:
    algorithm, batch = _maml()
    first, again = next(algorithm.updates(batch)), next(algorithm.updates(batch))
    assert torch.equal(first.outer.actions, again.outer.actions)  # a function of the seeds and the parameters
    assert not torch.equal(first.inner[0].observations, first.outer.observations)
    assert torch.equal(phase_batch(batch, 0).seeds, batch.seeds)
    assert not torch.equal(phase_batch(batch, 1).seeds, batch.seeds) and (phase_batch(batch, 3).seeds >= 0).all()
    alone = collect_adaptation(dict(algorithm.net.named_parameters()), batch.slice(1, 2), 1, 0.3, algorithm.rl)
    torch.testing.assert_close(alone.outer.actions, first.outer.actions[1:2], rtol=0, atol=0)


def test_conjugate_gradient_solves_a_positive_definite_system() -> None:
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, dtype=torch.float64, generator=generator)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, 6), torch.linalg.solve(a, b), rtol=1e-8,
                               atol=1e-10)


def _flat_kl_grad(algorithm: MAML, rollouts: object) -> torch.Tensor:
    _, kl = algorithm.trust_region_terms(rollouts)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, list(algorithm.parameters()))])


def test_fisher_vector_product_is_the_kl_hessian_through_the_inner_step() -> None:
    """(grad KL(theta + e v) - grad KL(theta - e v)) / 2e, second order through the adaptation, in float64."""
    algorithm, batch = _maml()
    rollouts = next(algorithm.updates(batch))
    params = list(algorithm.parameters())
    _, kl = algorithm.trust_region_terms(rollouts)
    assert float(kl.detach()) < 1e-12  # the collecting policy: KL zero, its gradient zero, its Hessian the Fisher matrix
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = fisher_vector_product(kl, params, damping=0.0)(v)  # before the parameters move below
    eps = 1e-5
    old = [p.detach().clone() for p in params]

    def shifted(sign: float) -> torch.Tensor:
        with torch.no_grad():
            for p, o, d in zip(params, old, v.split([p.numel() for p in params])):
                p.copy_(o + sign * eps * d.view_as(p))
        return _flat_kl_grad(algorithm, rollouts)

    finite = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    with torch.no_grad():
        for p, o in zip(params, old):
            p.copy_(o)
    assert float((got - finite).norm() / finite.norm()) < 1e-6
    assert float(v.dot(got)) > 0  # positive (semi)definite along v


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_the_chain_rule_fisher_product_equals_the_double_backward_one(first_order: bool, steps: int) -> None:
    """MAML's own product (J^T F' J through the inner steps) is the same matrix as Pearlmutter's on the KL."""
    algorithm, batch = _maml(first_order, steps)
    rollouts = next(algorithm.updates(batch))
    params = list(algorithm.parameters())
    _, kl = algorithm.trust_region_terms(rollouts)
    generic = fisher_vector_product(kl, params, damping=0.0)
    own = algorithm.fisher_vector_product(rollouts, params)
    assert own is not None
    for seed in (0, 1):
        v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
        want = generic(v)
        assert float((own(v) - want).norm() / want.norm()) < 1e-12
    # parameters listed in another order (an optimizer's groups): the product follows that order
    flipped = params[::-1]
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pieces = dict(zip(map(id, flipped), v.split([p.numel() for p in flipped])))
    in_order = torch.cat([pieces[id(p)] for p in params])
    got = dict(zip(map(id, flipped), algorithm.fisher_vector_product(rollouts, flipped)(v).split(
        [p.numel() for p in flipped])))
    torch.testing.assert_close(torch.cat([got[id(p)] for p in params]), generic(in_order), rtol=1e-12, atol=1e-14)


def test_a_trpo_step_lowers_the_surrogate_within_the_kl_limit() -> None:
    algorithm, batch = _maml()
    rollouts = next(algorithm.updates(batch))
    optimizer = TRPO(algorithm.parameters(), max_kl=1e-3)
    loss, _ = algorithm.meta_loss(rollouts)
    loss.backward()
    before = [p.detach().clone() for p in algorithm.parameters()]
    optimizer.step(functools.partial(algorithm.trust_region_terms, rollouts),
                   functools.partial(algorithm.fisher_vector_product, rollouts))
    surrogate, kl = algorithm.trust_region_terms(rollouts, differentiable=False)
    assert optimizer.last_step["accepted"] == 1.0
    assert 0 < float(kl) <= 1e-3 and float(surrogate) < float(loss.detach())
    assert abs(optimizer.last_step["kl"] - float(kl)) < 1e-12
    assert any(not torch.equal(b, p) for b, p in zip(before, algorithm.parameters()))
    # a limit the first step cannot meet after any backtrack: the parameters stay as they were
    stuck = TRPO(algorithm.parameters(), max_kl=1e-3, max_backtracks=1, lr=1e3)
    rollouts = next(algorithm.updates(batch))
    algorithm.zero_grad()
    algorithm.meta_loss(rollouts)[0].backward()
    kept = [p.detach().clone() for p in algorithm.parameters()]
    stuck.step(functools.partial(algorithm.trust_region_terms, rollouts))
    assert stuck.last_step["accepted"] == 0.0
    assert all(torch.equal(k, p) for k, p in zip(kept, algorithm.parameters()))


def test_evaluation_reports_return_after_each_step_and_the_regret() -> None:
    algorithm, batch = _maml()
    scores = algorithm.evaluate(batch)
    assert set(scores) == {"return@0", "return@1", "return@2", "return", "regret"}
    assert all(v.shape == (3,) for v in scores.values())
    torch.testing.assert_close(scores["return"], scores["return@2"])
    optimal = batch.make(1).optimal_return()
    torch.testing.assert_close(scores["regret"], optimal - scores["return"])
    assert (scores["regret"] >= -1e-9).all()
    picture = algorithm.visualize(batch)["val/trajectories"]
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3


TINY = ["algo=maml", "benchmark=navigation2d", "benchmark.horizon=10", "model=mlp", "model.hidden=[8]",
        "algo.rollouts=2", "algo.inner_lr=0.1", "algo.eval_inner_steps=2", "trainer.meta_batch_size=3",
        "trainer.log_every=1", "trainer.eval_every=2", "trainer.val_tasks=4", "trainer.eval_tasks=6",
        "logger.console=false", "logger.tensorboard=false", "threads=1", "seed=0", "device=cpu"]


def test_maml_rl_trains_and_tests_through_the_cli(tmp_path: Path) -> None:
    proc = run_metarun("train", *TINY, "trainer.steps=3", "trainer/optimizer=trpo",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metric"] == "return" and results["tasks"] == 6
    assert {"return@0", "return@1", "return@2", "regret"} <= set(results["metrics"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/kl" in r] == [1, 2, 3]


def _train_in_process(run_dir: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    run_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(run_dir)
    train(cfg)
    return json.loads((run_dir / "results.json").read_text())


def test_the_plain_policy_gradient_outer_step_trains_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer/optimizer=adam (the default): the MAML policy gradient as Adam's gradient, no trust region."""
    results = _train_in_process(tmp_path / "adam", [*TINY, "trainer.steps=3", "trainer.optimizer.lr=0.01"],
                                monkeypatch)
    assert results["metric"] == "return" and {"return@0", "return@2"} <= set(results["metrics"])
    assert results["mean"] == results["metrics"]["return@2"]["mean"]


def test_resume_from_a_mid_run_checkpoint_ends_as_the_uninterrupted_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """TRPO steps, rollouts from the task seeds: a run resumed from step 2's last.pt repeats steps 3-4 exactly."""
    overrides = [*TINY, "trainer.steps=4", "trainer/optimizer=trpo", "trainer.checkpoint_every=1"]
    save = trainer_module.save_checkpoint
    kept = tmp_path / "step2.pt"

    def save_and_keep(state: dict, path: Path) -> None:
        save(state, path)
        if path.name == "last.pt" and state["step"] == 2:
            save(state, kept)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_and_keep)
    whole = _train_in_process(tmp_path / "whole", overrides, monkeypatch)
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    resumed = _train_in_process(tmp_path / "resumed", [*overrides, f"ckpt_path={kept}"], monkeypatch)
    assert resumed["metrics"] == whole["metrics"] and resumed["mean"] == whole["mean"]
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [strip(r) for r in rows("whole") if r["step"] > 2] == [strip(r) for r in rows("resumed") if r["step"] > 2]


def _build_error(overrides: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    with pytest.raises(UserInputError) as raised:
        _train_in_process(tmp_path / "bad", overrides, monkeypatch)
    line = str(raised.value)
    assert "\n" not in line
    return line


@pytest.mark.parametrize("overrides, message", [
    (["algo=maml", "benchmark=sine", "trainer/optimizer=trpo"], r"^trainer/optimizer=trpo steps a policy"),
    (["algo=protonet", "benchmark=navigation2d", "model=mlp"], r"^algo=protonet supports only classification and "
                                                                r"benchmark=navigation2d\w* is reinforcement; use "
                                                                r"algo=maml"),
    (["algo=metasgd", "benchmark=navigation2d"], r"^algo=metasgd supports only classification/regression .* use "
                                                 r"algo=maml"),
    (["algo=maml", "benchmark=bandit"], r"^algo=maml acts in continuous action spaces only .* use algo=rl2"),
    (["algo=maml", "benchmark=navigation2d", "algo.rollouts=0"], r"^algo.rollouts must be an integer >= 1"),
    (["algo=maml", "benchmark=navigation2d", "algo.gamma=1.5"], r"^algo.gamma must be in \[0, 1\]"),
])
def test_bad_inputs_are_one_line(overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    import re

    line = _build_error([*overrides, "trainer.steps=1", "logger.console=false", "logger.tensorboard=false"],
                        monkeypatch, tmp_path)
    assert re.search(message, line), line


def test_trpo_on_a_supervised_run_is_exit_2_through_the_cli(tmp_path: Path) -> None:
    proc = run_metarun("train", "algo=maml", "benchmark=sine", "trainer/optimizer=trpo", "logger.console=false",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and error_line(proc).startswith("metarun: error: trainer/optimizer=trpo steps")


def test_trpo_takes_its_defaults_from_its_option_file() -> None:
    import inspect

    from metarun.defaults import option_defaults

    signature = {k: p.default for k, p in inspect.signature(TRPO).parameters.items() if k != "params"}
    assert signature == dict(option_defaults("trainer/optimizer", "trpo"))


# -- Gymnasium tasks with continuous actions ------------------------------------------------------------------

def test_task_rewards_by_hand() -> None:
    import numpy as np

    from metarun.rl.gym_env import task_reward

    velocity, actions = np.array([1.5, -0.5, 2.0]), np.array([[0.2, -0.4], [1.0, 0.0], [0.0, 0.0]])
    control = 0.05 * np.array([0.2, 1.0, 0.0])
    np.testing.assert_allclose(task_reward("forward_velocity", np.array([1.0, 0.5, 2.0]), velocity, actions),
                               [-0.5 - control[0], -1.0 - control[1], 0.0])
    np.testing.assert_allclose(task_reward("direction", np.array([0.3, -0.7, -0.1]), velocity, actions),
                               [1.5 - control[0], 0.5 - control[1], -2.0])


def test_maml_trains_on_a_continuous_gymnasium_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pendulum-v1 (a Box action in [-2, 2]), the task its gravity: MAML's rollouts through Gymnasium's vector API."""
    pytest.importorskip("gymnasium")
    from metarun.benchmarks.gym import GymBenchmark

    bench = GymBenchmark(env_id="Pendulum-v1", task_parameter="g", task_range=(5.0, 15.0), horizon=6, episodes=1)
    assert bench.spec.continuous_actions and bench.spec.output_size == 1 and bench.spec.input_shape == (3,)
    env = bench.sample("train", 2, torch.Generator().manual_seed(0)).make(3)
    env.reset()
    assert env.active().shape == (2, 3) and env.action_size == 1 and env.num_actions == 0
    _, reward, _ = env.step(torch.full((2, 3, 1), 50.0))  # clipped to the space's bound 2: a finite reward
    assert reward.shape == (2, 3) and torch.isfinite(reward).all()
    overrides = ["algo=maml", "benchmark=gym", "benchmark.env_id=Pendulum-v1", "benchmark.task_parameter=g",
                 "benchmark.task_range=[5,15]", "benchmark.horizon=6", "benchmark.episodes=1", "model=mlp",
                 "model.hidden=[8]", "algo.rollouts=2", "algo.eval_inner_steps=1", "trainer/optimizer=trpo",
                 "debug=smoke", "logger.console=false", "logger.tensorboard=false", "threads=1", "device=cpu"]
    results = _train_in_process(tmp_path / "pendulum", overrides, monkeypatch)
    assert results["metric"] == "return" and {"return@0", "return@1"} <= set(results["metrics"])
    assert "regret" not in results["metrics"]  # the optimum of a Gymnasium task is not known


def test_gym_task_reward_must_be_known() -> None:
    pytest.importorskip("gymnasium")
    from metarun.benchmarks.gym import GymBenchmark

    with pytest.raises(UserInputError, match=r"^benchmark.task_reward must be null or one of forward_velocity, "):
        GymBenchmark(env_id="Pendulum-v1", task_parameter="g", task_range=(5.0, 15.0), task_reward="speed")
