"""Environment steps per second: metarun's batched tensor environments against the same environment written as a
Gymnasium `Env` and stepped by `gymnasium.vector.SyncVectorEnv`, in the same process, with the same number of
parallel episodes (one per task), the same task parameters and random actions; then RL^2's training rate.

    python scripts/bench_rl.py                 # bandit and tabular MDP, 1,000 and 10,000 parallel episodes; RL^2
    python scripts/bench_rl.py --parallel 1000 --threads 2
    python scripts/bench_rl.py --tables train --train-steps 5
    python scripts/bench_rl.py --tables maml     # MAML for RL on 2D navigation: batched against a per-task loop

Before timing, each pair is checked to give the same distribution: the mean reward of one trial of every task
under random actions must agree within 4 standard errors. The reference Envs below are written the way a
Gymnasium user would write them (NumPy, the Env's own np_random; the MDP draws its next state by a precomputed
CDF rather than the slower `np_random.choice`) and auto-reset in the same step, so no step is wasted. Needs
the `rl` extra (pip install ".[rl]"). Timing is only meaningful on an idle machine: say so beside the figures.

The second table is what a user waits for: environment steps per second of RL^2's whole training loop (the
trainer's own `fit`: task sampling, the rollout, PPO's minibatch updates, clipping, logging), model=gru and
model=transformer on bandits n=10 and n=100 (k=5), every other value the YAML default (250 trials a step, GRU 256,
Transformer 64 x 2). One warm-up step, then `--train-steps` steps timed between the trainer's train log lines, so
validation, checkpoints and the final test are not counted (the loop is stopped after the last timed step).

The third table is MAML for RL's meta-iteration (Finn et al.'s 2D navigation settings: 20 tasks, 20 trajectories of
100 steps per task before and after one inner policy-gradient step, policy MLP 100-100): the rollouts and the
second-order meta-gradient, metarun's (all tasks at once: `updates` + `meta_loss` + backward) against a loop over
the tasks doing the same rollouts (each task's own seed: the same trajectories) and the same gradients with a
plain functional_call per task, as pytorch-maml-rl and learn2learn's examples do; the gradients are checked equal
first. TRPO's step (CG on Fisher products, line search) is timed on top of metarun's, with the chain-rule product
the trainer uses and with the generic double-backward one.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarun.benchmarks.bandit import BanditBenchmark
from metarun.benchmarks.tabular_mdp import TabularMDPBenchmark
from metarun.rl.envs import EnvBatch, TrialEnv
from metarun.rl.gym_env import require_gymnasium
from metarun.trainer import EpisodicTrainer

gym = require_gymnasium()


class BernoulliBanditGymEnv(gym.Env):
    """One task's bandit: an episode of Gymnasium is one trial of `pulls` pulls."""

    def __init__(self, probs: np.ndarray, pulls: int) -> None:
        self.probs, self.pulls = probs, pulls
        self.observation_space = gym.spaces.Box(0.0, 0.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(len(probs))
        self._zero = np.zeros(1, np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        return self._zero, {}

    def step(self, action: int):
        reward = float(self.np_random.random() < self.probs[action])
        self._t += 1
        return self._zero, reward, self._t >= self.pulls, False, {}


class TabularMDPGymEnv(gym.Env):
    """One task's tabular MDP: an episode of Gymnasium is one trial of `episodes` x `horizon` steps."""

    def __init__(self, transitions: np.ndarray, reward_means: np.ndarray, initial: np.ndarray, horizon: int,
                 episodes: int) -> None:
        self.cdf = np.cumsum(transitions, axis=-1)
        self.initial_cdf = np.cumsum(initial)
        self.reward_means, self.horizon, self.length = reward_means, horizon, horizon * episodes
        states, actions = reward_means.shape
        self.observation_space = gym.spaces.Box(0.0, 1.0, (states,), np.float32)
        self.action_space = gym.spaces.Discrete(actions)
        self._eye = np.eye(states, dtype=np.float32)
        self._t = self._state = 0

    def _draw(self, cdf: np.ndarray) -> int:
        return min(int(np.searchsorted(cdf, self.np_random.random(), side="right")), len(cdf) - 1)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t, self._state = 0, self._draw(self.initial_cdf)
        return self._eye[self._state], {}

    def step(self, action: int):
        reward = self.reward_means[self._state, action] + self.np_random.normal()
        self._state = self._draw(self.cdf[self._state, action])
        self._t += 1
        if self._t % self.horizon == 0:
            self._state = self._draw(self.initial_cdf)
        return self._eye[self._state], float(reward), self._t >= self.length, False, {}


def _reference(name: str, batch: EnvBatch) -> list:
    params = {k: v.numpy().astype(np.float64) for k, v in batch.params.items()}
    if name == "bandit":
        return [functools.partial(BernoulliBanditGymEnv, p, 100) for p in params["probs"]]
    return [functools.partial(TabularMDPGymEnv, *(params[k][i] for k in ("transitions", "reward_means", "initial")),
                              10, 10) for i in range(batch.num_tasks)]


def _ours(env: TrialEnv, steps: int, generator: torch.Generator, collect: bool = False) -> tuple[float, list[float]]:
    """(seconds, rewards' [sum, sum of squares, count] when `collect`) of `steps` random steps, trials restarted."""
    length, stats = env.episodes * env.horizon, [0.0, 0.0, 0]
    started = time.perf_counter()
    env.reset()
    for t in range(steps):
        if t and t % length == 0:
            env.reset()
        actions = torch.randint(env.num_actions, (env.num_tasks, env.trials_per_task), generator=generator)
        _, reward, _ = env.step(actions)
        if collect:
            stats = [stats[0] + reward.sum().item(), stats[1] + reward.square().sum().item(), stats[2] + reward.numel()]
    return time.perf_counter() - started, stats


def _theirs(vector, steps: int, rng: np.random.Generator, actions: int,
            collect: bool = False) -> tuple[float, list[float]]:
    stats = [0.0, 0.0, 0]
    started = time.perf_counter()
    vector.reset(seed=int(rng.integers(2**31)))
    for _ in range(steps):
        _, reward, _, _, _ = vector.step(rng.integers(actions, size=vector.num_envs))
        if collect:
            stats = [stats[0] + float(reward.sum()), stats[1] + float(np.square(reward).sum()), stats[2] + reward.size]
    return time.perf_counter() - started, stats


def _mean_and_error(stats: list[float]) -> tuple[float, float]:
    total, squares, count = stats
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean**2, 1e-12) / count)


class _StopTiming(Exception):
    """Raised by _StepClock after the last timed step: the trainer's final validation and test are not timed."""


class _StepClock:
    """A MetricLogger that notes the time of each train log line (log_every=1: one per step, written right after
    the step's last optimizer update) and stops the loop after `last_step`."""

    def __init__(self, last_step: int) -> None:
        self.last_step = last_step
        self.times: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if any(k.startswith("train/") for k in metrics):
            self.times[step] = time.perf_counter()
            if step >= self.last_step:
                raise _StopTiming

    def log_images(self, images: dict[str, Any], step: int) -> None:
        pass

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _rl2_trainer(overrides: list[str], clock: _StepClock, run_dir: Path, device: str) -> EpisodicTrainer:
    """The trainer `metarun train algo=rl2 ...` builds (config composed by Hydra from the same YAML tree, objects
    built by run.build), with the step clock as its only logger."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from metarun import config as config_mod
    from metarun.config import TrainerSettings, config_dir
    from metarun.run import algorithm_generator, build, build_optimizer
    from metarun.runtime import auto_task_chunk

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = config_mod.validate(compose(config_name="train", overrides=overrides))
    GlobalHydra.instance().clear()
    torch.manual_seed(cfg.seed)
    generator = algorithm_generator(int(cfg.seed))
    names = {"algo": "rl2", "model": str(cfg.model._target_).rsplit(".", 1)[-1].lower(), "benchmark": "bandit"}
    benchmark, algorithm = build(cfg, names, generator)
    algorithm.to(device)  # type: ignore[attr-defined]
    benchmark.to(device)
    optimizer = build_optimizer(instantiate(cfg.trainer.optimizer), algorithm)
    settings = TrainerSettings(**{k: cfg.trainer[k] for k in TrainerSettings.__dataclass_fields__})
    if settings.task_chunk is None:
        settings.task_chunk = auto_task_chunk(torch.device(device), benchmark.spec.is_image)
    return EpisodicTrainer(algorithm, benchmark, optimizer, None, settings, clock, run_dir, torch.device(device),
                           int(cfg.seed), OmegaConf.to_yaml(cfg), algorithm_generator=generator)


def train_rate(model: str, pulls: int, arms: int, steps: int, device: str) -> tuple[float, float, int]:
    """(environment steps/s, seconds per training step, environment steps per training step) of RL^2 training
    at the YAML defaults, over `steps` steps after one warm-up step."""
    clock = _StepClock(last_step=1 + steps)
    overrides = ["algo=rl2", f"model={model}", "benchmark=bandit", f"benchmark.pulls={pulls}",
                 f"benchmark.arms={arms}", f"trainer.steps={steps + 2}", "trainer.log_every=1",
                 "trainer.eval_every=1000000", "trainer.checkpoint_every=1000000"]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = _rl2_trainer(overrides, clock, Path(run_dir), device)
        try:
            trainer.fit()
        except _StopTiming:
            pass
    seconds = (clock.times[1 + steps] - clock.times[1]) / steps
    trials = trainer.s.meta_batch_size * trainer.algorithm.trials_per_task  # type: ignore[attr-defined]
    env_steps = trials * trainer.benchmark.spec.trial_length
    return env_steps / seconds, seconds, env_steps


def environment_table(args: argparse.Namespace) -> None:
    """metarun's environments against Gymnasium's SyncVectorEnv, the same tasks and random actions."""
    benchmarks = {"bandit": BanditBenchmark(arms=5, pulls=100), "tabular_mdp": TabularMDPBenchmark()}
    rows = []
    for name, bench in benchmarks.items():
        for parallel in args.parallel:
            batch = bench.sample("test", parallel, torch.Generator().manual_seed(0))
            env = batch.make(1)
            length = env.episodes * env.horizon
            vector = gym.vector.SyncVectorEnv(_reference(name, batch),
                                              autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
            generator, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
            # same distribution first: one trial of every task, random actions, mean reward per step
            _, ours = _ours(env, length, generator, collect=True)
            _, theirs = _theirs(vector, length, rng, env.num_actions, collect=True)
            (m1, e1), (m2, e2) = _mean_and_error(ours), _mean_and_error(theirs)
            if abs(m1 - m2) > 4 * math.hypot(e1, e2):
                raise SystemExit(f"{name} x {parallel}: mean reward {m1:.4f} (metarun) vs {m2:.4f} (Gymnasium) "
                                 f"differ by more than 4 standard errors")
            # timing: rounds of each in turn (the machine's load drifts), each about --seconds; medians
            steps = length
            while _ours(env, steps, generator)[0] < args.seconds / 4:
                steps *= 2
            their_steps = max(5, int(args.seconds / (_theirs(vector, 5, rng, env.num_actions)[0] / 5)))
            ours_rates, their_rates = [], []
            for _ in range(args.rounds):
                ours_rates.append(parallel * steps / _ours(env, steps, generator)[0])
                their_rates.append(parallel * their_steps / _theirs(vector, their_steps, rng, env.num_actions)[0])
            ours_rate, theirs_rate = statistics.median(ours_rates), statistics.median(their_rates)
            vector.close()
            rows.append((name, parallel, ours_rate, theirs_rate, m1, m2))
            print(f"  measured {name} x {parallel}", flush=True)
    print(f"\nenvironment steps/s (median of {args.rounds} alternating rounds), random actions, torch threads="
          f"{args.threads}; timing is only meaningful on an idle machine")
    print(f"{'environment':<12} {'parallel':>9} {'metarun':>14} {'Gymnasium':>14} {'ratio':>8}   "
          f"mean reward (metarun / Gymnasium)")
    for name, parallel, ours_rate, theirs_rate, m1, m2 in rows:
        print(f"{name:<12} {parallel:>9,} {ours_rate:>14,.0f} {theirs_rate:>14,.0f} {ours_rate / theirs_rate:>7.0f}x"
              f"   {m1:.4f} / {m2:.4f}")


def training_table(args: argparse.Namespace) -> None:
    """RL^2's training rate, whole loop, at the YAML defaults."""
    rows = []
    for model in ("gru", "transformer"):
        for pulls, arms in ((10, 5), (100, 5)):
            rows.append((model, pulls, arms, *train_rate(model, pulls, arms, args.train_steps, args.device)))
            print(f"  measured rl2 {model} bandit n={pulls} k={arms}", flush=True)
    print(f"\nRL^2 training, environment steps/s of the whole loop (sampling, rollout, PPO updates), YAML defaults "
          f"(configs/algo/rl2.yaml), mean of {args.train_steps} steps after one warm-up step, torch threads="
          f"{args.threads}, device={args.device}; timing is only meaningful on an idle machine")
    print(f"{'model':<12} {'benchmark':<16} {'env steps/step':>14} {'s/step':>8} {'env steps/s':>12}")
    for model, pulls, arms, rate, seconds, env_steps in rows:
        print(f"{model:<12} {f'bandit n={pulls} k={arms}':<16} {env_steps:>14,} {seconds:>8.2f} {rate:>12,.0f}")


def _navigation_maml() -> tuple[Any, Any]:
    from metarun.algorithms.maml import MAML
    from metarun.benchmarks.navigation2d import Navigation2DBenchmark
    from metarun.models.mlp import MLP

    bench = Navigation2DBenchmark()
    torch.manual_seed(0)
    return MAML(MLP((2,), hidden=(100, 100)), bench.spec, inner_lr=0.1), bench


def _maml_batched(algorithm: Any, batch: EnvBatch) -> list[torch.Tensor]:
    algorithm.zero_grad()
    rollouts = next(algorithm.updates(batch))
    algorithm.meta_loss(rollouts)[0].backward()
    return [p.grad.clone() for p in algorithm.parameters()]


def _maml_loop(algorithm: Any, batch: EnvBatch) -> list[torch.Tensor]:
    """The per-task reference: one task at a time, rollouts, inner step (create_graph), outer rollouts, backward."""
    from torch.func import functional_call

    from metarun.rl.maml_rl import phase_batch
    from metarun.rl.policy_gradient import GaussianPolicy, advantages, collect, per_task_log_std, reinforce_loss

    net, rl = algorithm.net, algorithm.rl

    def policy(params: dict, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = functional_call(net, params, (observations,))
        return mean, per_task_log_std(params["log_std"], mean)

    algorithm.zero_grad()
    params = dict(net.named_parameters())
    for t in range(batch.num_tasks):
        one = batch.slice(t, t + 1)
        pg = advantages(collect(phase_batch(one, 0).make(rl.rollouts), GaussianPolicy(params, policy=policy)),
                        gamma=rl.gamma, horizon=rl.horizon)
        inner = reinforce_loss(params, pg.observations, pg.actions, pg.advantages, pg.valid, policy=policy).sum()
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {k: v - algorithm.inner_lr * g for (k, v), g in zip(params.items(), grads)}
        detached = {k: v.detach() for k, v in fast.items()}
        outer = advantages(collect(phase_batch(one, 1).make(rl.rollouts), GaussianPolicy(detached, policy=policy)),
                           gamma=rl.gamma, horizon=rl.horizon)
        loss = reinforce_loss(fast, outer.observations, outer.actions, outer.advantages, outer.valid, policy=policy)
        (loss.sum() / batch.num_tasks).backward()
    return [p.grad.clone() for p in algorithm.parameters()]


def maml_table(args: argparse.Namespace) -> None:
    """MAML for RL meta-iterations/s, batched against the per-task loop (and TRPO's step on top)."""
    from metarun.rl.trpo import TRPO

    algorithm, bench = _navigation_maml()
    batch = bench.sample("train", 20, torch.Generator().manual_seed(0))
    ours, theirs = _maml_batched(algorithm, batch), _maml_loop(algorithm, batch)
    error = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs))
    assert error < 1e-4, f"the batched and looped meta-gradients differ ({error:.1e})"
    times: dict[str, list[float]] = {"metarun (batched)": [], "per-task loop": [], "TRPO step, chain-rule F v": [],
                                     "TRPO step, double-backward F v": []}
    for _ in range(args.rounds):
        for name, run in (("metarun (batched)", _maml_batched), ("per-task loop", _maml_loop)):
            start = time.perf_counter()
            run(algorithm, batch)
            times[name].append(time.perf_counter() - start)
        rollouts = next(algorithm.updates(batch))
        state = {k: v.clone() for k, v in algorithm.state_dict().items()}
        for name, chain in (("TRPO step, chain-rule F v", True), ("TRPO step, double-backward F v", False)):
            algorithm.load_state_dict(state)
            algorithm.zero_grad()
            algorithm.meta_loss(rollouts)[0].backward()
            optimizer = TRPO(algorithm.parameters())
            start = time.perf_counter()
            optimizer.step(functools.partial(algorithm.trust_region_terms, rollouts),
                           functools.partial(algorithm.fisher_vector_product, rollouts) if chain else None)
            times[name].append(time.perf_counter() - start)
        algorithm.load_state_dict(state)
    loop = statistics.median(times["per-task loop"])
    print(f"\nMAML for RL, 2D navigation (20 tasks x 20 trajectories x 100 steps, before and after one inner step; "
          f"MLP 100-100, second order), median of {args.rounds} alternating rounds, torch threads={args.threads}; "
          f"meta-gradients equal to {error:.1e} (relative); timing is only meaningful on an idle machine")
    print(f"{'variant':<34} {'s/iteration':>12} {'iterations/s':>13} {'vs loop':>8}")
    for name, values in times.items():
        seconds = statistics.median(values)
        ratio = f"{loop / seconds:.2f}x" if not name.startswith("TRPO") else "-"
        print(f"{name:<34} {seconds:>12.3f} {1 / seconds:>13.3f} {ratio:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1000, 10000], help="parallel episodes")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (1: fair to single-threaded gym)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per measurement and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each; medians reported")
    parser.add_argument("--tables", nargs="+", choices=("env", "train", "maml"), default=["env", "train", "maml"],
                        help="env: environments against Gymnasium; train: RL^2's training rate; maml: MAML for RL")
    parser.add_argument("--train-steps", type=int, default=3, help="timed RL^2 training steps (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="device of the RL^2 training table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if "env" in args.tables:
        environment_table(args)
    if "train" in args.tables:
        training_table(args)
    if "maml" in args.tables:
        maml_table(args)


if __name__ == "__main__":
    main()
