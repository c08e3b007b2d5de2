"""RL^2: Duan, Schulman, Chen, Bartlett, Sutskever and Abbeel, "RL^2: Fast Reinforcement Learning via Slow
Reinforcement Learning", 2016 (arXiv:1611.02779), trained with PPO (configs/algo/rl2.yaml says why).

The policy reads, at each step of a trial, (observation, one-hot previous action, previous reward, previous
done flag) and keeps its memory across the trial's episodes: a sequence model of our model/ group (model=gru
or model=transformer) with a linear policy head and a linear value head on its per-step features. Learning to
explore and exploit within a trial is the "fast" RL; PPO across tasks is the "slow" one.

Everything is batched over tasks x trials: a rollout is one loop over the L = episodes x horizon steps of all
T x E trials (metarun/rl/rollout.py, the backbone's `step`), and each PPO minibatch is one full-sequence forward
of [B, L, F]. Both read their inputs from `policy_inputs`, so the log-probabilities the learner recomputes are
the ones the rollout sampled with (PPO's first ratio is 1; tests/test_rl2.py). Actions are drawn from the
tasks' counter-based noise (metarun/rl/noise.py), minibatch orders from the run's checkpointed generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm
from metarun.benchmarks.base import TaskSpec
from metarun.defaults import option_defaults
from metarun.errors import UserInputError
from metarun.models.base import SequenceBackbone
from metarun.plotting import pillow_curve_plot, render
from metarun.rl.baselines import BASELINES, make_policy
from metarun.rl.envs import EnvBatch, TrialEnv
from metarun.rl.metrics import trial_metrics
from metarun.rl.noise import POLICY_STREAM, TaskNoise
from metarun.rl.ppo import gae, ppo_loss
from metarun.rl.rollout import RolloutPolicy, StepInput, Trajectory, rollout

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DEFAULTS = option_defaults("algo", "rl2")


def policy_inputs(observation: Tensor, prev_action: Tensor, prev_reward: Tensor, prev_done: Tensor,
                  num_actions: int, dtype: torch.dtype) -> Tensor:
    """RL^2's input of a step, [..., observation_size + num_actions + 2]: the observation, the previous action
    one-hot (zeros before the first step, where prev_action is -1), the previous reward and done flag. The one
    function for the rollout's steps ([T, E]) and the learner's whole trials ([T, E, L])."""
    one_hot = F.one_hot(prev_action.clamp_min(0), num_actions) * (prev_action >= 0).unsqueeze(-1)
    return torch.cat([observation.to(dtype), one_hot.to(dtype), prev_reward.unsqueeze(-1).to(dtype),
                      prev_done.unsqueeze(-1).to(dtype)], dim=-1)


@dataclass(frozen=True)
class TrialBatch:
    """Collected trials, flattened to B = T x E, with what PPO needs of each step: the Batch that `updates`
    yields (a minibatch; num_tasks counts its trials) and `meta_loss` scores, so the trainer's chunking and
    NaN path treat it as any batch. `metrics` describe the whole step's rollouts (every minibatch repeats them)."""

    inputs: Tensor  # [B, L, F]: policy_inputs of every step
    actions: Tensor  # [B, L]
    log_probs: Tensor  # [B, L]: of the actions, under the policy that sampled them
    advantages: Tensor  # [B, L]
    returns: Tensor  # [B, L]: value targets (lambda-returns)
    metrics: dict[str, Tensor]  # mean trial return and episode length of the step's rollouts

    @property
    def num_tasks(self) -> int:
        return self.actions.shape[0]

    def select(self, index: Tensor) -> "TrialBatch":
        """The trials `index` (a minibatch)."""
        return TrialBatch(self.inputs[index], self.actions[index], self.log_probs[index], self.advantages[index],
                          self.returns[index], self.metrics)

    def slice(self, start: int, stop: int) -> "TrialBatch":
        return self.select(torch.arange(start, min(stop, self.num_tasks), device=self.actions.device))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TrialBatch":
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

        return TrialBatch(move(self.inputs), self.actions.to(device), move(self.log_probs), move(self.advantages),
                          move(self.returns), {k: move(v) for k, v in self.metrics.items()})

    def normalisation_inputs(self) -> tuple[Tensor, ...]:
        return ()


class _Actor(RolloutPolicy):
    """The learner's policy, one step at a time, for `rollout`: it records each action's log-probability and
    the value estimate (GAE's baseline)."""

    def __init__(self, learner: "RL2") -> None:
        self.learner = learner

    def start(self, env: TrialEnv) -> object:
        return self.learner.backbone.initial_memory(env.num_tasks * env.trials_per_task)

    def act(self, step: StepInput, memory: object, t: int, noise: TaskNoise) -> tuple[Tensor, object, dict[str, Tensor]]:
        learner = self.learner
        x = policy_inputs(step.observation, step.prev_action, step.prev_reward, step.prev_done,
                          learner.spec.output_size, learner.dtype)
        T, E = x.shape[:2]
        features, memory = learner.backbone.step(x.flatten(0, 1), memory)
        log_probs, value = learner.heads(features)
        log_probs, value = log_probs.view(T, E, -1), value.view(T, E)
        action = noise.categorical(POLICY_STREAM, t, log_probs.exp())
        return action, memory, {"log_prob": log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1), "value": value}


class RL2(nn.Module, MetaAlgorithm):
    """A sequence-model policy and value function over trials, trained by PPO on its own rollouts."""

    supports = frozenset({"reinforcement"})
    alternatives = "algo=maml or algo=reptile"  # what runs on the supervised benchmarks it refuses
    draws_randomness = True

    def __init__(
        self,
        backbone: SequenceBackbone,
        spec: TaskSpec,
        generator: torch.Generator,
        trials_per_task: int = _DEFAULTS["trials_per_task"],
        ppo_epochs: int = _DEFAULTS["ppo_epochs"],
        minibatches: int = _DEFAULTS["minibatches"],
        clip: float = _DEFAULTS["clip"],
        value_coef: float = _DEFAULTS["value_coef"],
        entropy_coef: float = _DEFAULTS["entropy_coef"],
        gamma: float = _DEFAULTS["gamma"],
        gae_lambda: float = _DEFAULTS["gae_lambda"],
        normalize_advantages: bool = _DEFAULTS["normalize_advantages"],
        eval_trials: int = _DEFAULTS["eval_trials"],
    ) -> None:
        super().__init__()
        for name, value in (("trials_per_task", trials_per_task), ("ppo_epochs", ppo_epochs),
                            ("minibatches", minibatches), ("eval_trials", eval_trials)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"algo.{name} must be a positive integer (got {value})")
        if not clip > 0:
            raise ValueError(f"algo.clip must be > 0 (got {clip})")
        if value_coef < 0 or entropy_coef < 0:
            raise ValueError(f"algo.value_coef and algo.entropy_coef must be >= 0 (got {value_coef}, {entropy_coef})")
        if not 0 < gamma <= 1 or not 0 <= gae_lambda <= 1:
            raise ValueError(f"algo.gamma must be in (0, 1] and algo.gae_lambda in [0, 1] (got {gamma}, {gae_lambda})")
        if spec.kind != "reinforcement":
            raise ValueError(f"algo=rl2 learns reinforcement tasks; {spec.name} is {spec.kind}")
        if SequenceBackbone not in type(backbone).__mro__:  # a Protocol: isinstance would need runtime_checkable
            raise ValueError(f"algo=rl2 needs a sequence model (model=gru or model=transformer), got "
                             f"{type(backbone).__name__}")
        self.spec = spec
        self.backbone = backbone
        self.generator = generator
        self.trials_per_task, self.ppo_epochs, self.minibatches = trials_per_task, ppo_epochs, minibatches
        self.clip, self.value_coef, self.entropy_coef = clip, value_coef, entropy_coef
        self.gamma, self.gae_lambda = gamma, gae_lambda
        self.normalize_advantages = normalize_advantages
        self.eval_trials = eval_trials
        self.policy = nn.Linear(backbone.out_features, spec.output_size)
        self.value = nn.Linear(backbone.out_features, 1)
        # a near-uniform first policy: its last layer's weights x 0.01 (Andrychowicz et al. 2021, "What Matters
        # in On-Policy Reinforcement Learning?", found this among PPO's most important choices)
        with torch.no_grad():
            self.policy.weight.mul_(0.01)
            self.policy.bias.zero_()

    @classmethod
    def backbone_input_shape(cls, spec: TaskSpec) -> tuple[int, ...]:
        """(trial length, observation + one-hot previous action + previous reward + previous done flag)."""
        return (spec.trial_length, spec.input_shape[0] + spec.output_size + 2)

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.weight.dtype

    def heads(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Per-step features [..., out_features] -> (action log-probabilities [..., A], value [...])."""
        return self.policy(features).log_softmax(-1), self.value(features).squeeze(-1)

    def trial_inputs(self, trajectory: Trajectory) -> Tensor:
        """[T, E, L, F]: every step's input as the rollout's policy read it (the same `policy_inputs`)."""
        return policy_inputs(trajectory.observations, *trajectory.prev_inputs(), self.spec.output_size, self.dtype)

    def collect(self, batch: EnvBatch, trials_per_task: int) -> Trajectory:
        """Roll the current policy out in `trials_per_task` trials of each of the batch's tasks (no gradient)."""
        return rollout(batch.make(trials_per_task), _Actor(self))

    def rollouts(self, batch: EnvBatch) -> TrialBatch:
        """The step's data: `trials_per_task` trials of each task under the current policy, with GAE's advantages
        and value targets. Advantages are standardised here, over all the step's trials (normalize_advantages),
        not per minibatch: then a minibatch's loss does not depend on how the trainer chunks it."""
        trajectory = self.collect(batch, self.trials_per_task)
        advantages, returns = gae(trajectory.rewards.to(self.dtype), trajectory.extras["value"], self.gamma,
                                  self.gae_lambda)
        if self.normalize_advantages:
            # the population std: one step (one trial of a one-pull bandit) gives 0, not NaN
            advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-8)
        metrics = {"return": trajectory.returns.mean().to(self.dtype),
                   "episode_length": torch.tensor(float(self.spec.horizon), dtype=self.dtype)}
        return TrialBatch(self.trial_inputs(trajectory).flatten(0, 1), trajectory.actions.flatten(0, 1),
                          trajectory.extras["log_prob"].flatten(0, 1), advantages.flatten(0, 1),
                          returns.flatten(0, 1), metrics)

    def updates(self, batch: EnvBatch) -> Iterator[TrialBatch]:
        """Collect the step's rollouts once, then yield their minibatches of trials, `ppo_epochs` times over (a
        fresh order each epoch, from the run's generator); the trainer takes an optimizer step on `meta_loss` of
        each."""
        trials = batch.num_tasks * self.trials_per_task
        if trials % self.minibatches:
            raise UserInputError(f"algo.minibatches={self.minibatches} must divide the {trials} trials of a step "
                                 f"(trainer.meta_batch_size tasks x algo.trials_per_task={self.trials_per_task}, "
                                 f"per process when distributed)")
        data = self.rollouts(batch)
        for _ in range(self.ppo_epochs):
            order = torch.randperm(trials, generator=self.generator).to(data.actions.device)
            for index in order.view(self.minibatches, -1):
                yield data.select(index)

    def meta_loss(self, batch: TrialBatch | EnvBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO's loss on a minibatch of collected trials: one full-sequence forward of the backbone. Given tasks
        (an EnvBatch) instead, on fresh rollouts of all their trials (ratio 1: the policy gradient plus the value
        and entropy terms)."""
        data = self.rollouts(batch) if isinstance(batch, EnvBatch) else batch
        log_all, values = self.heads(self.backbone(data.inputs))
        log_probs = log_all.gather(-1, data.actions.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_all.exp() * log_all).sum(-1)
        loss, metrics = ppo_loss(log_probs, data.log_probs, data.advantages, values, data.returns, entropy,
                                 clip=self.clip, value_coef=self.value_coef, entropy_coef=self.entropy_coef)
        return loss, {"loss": loss.detach(), **metrics, **data.metrics}

    def evaluate(self, batch: EnvBatch) -> dict[str, Tensor]:
        """Per task [T], each the mean over `eval_trials` trials of sampled actions (as the paper evaluates):
        `return`, `return@k` and `regret` where the optimum is known (metarun/rl/metrics.py)."""
        env = batch.make(self.eval_trials)
        return trial_metrics(env, rollout(env, _Actor(self)))

    def visualize(self, batch: EnvBatch) -> dict[str, Tensor]:
        """Mean cumulative regret over the trial's steps of the policy and of every baseline of the benchmark
        (metarun/rl/baselines.py), in VISUAL_TRIALS trials of each of the batch's fixed tasks.

        The realised regret: step t's is (t + 1) x optimal_return / L less the rewards collected up to t. For a
        bandit optimal_return / L is the best arm's mean, so this is the usual (pseudo-)regret plus reward noise
        that averages out over the trials; for a tabular MDP it is exact at every episode's end. Where the
        optimum is unknown (Gymnasium) the picture is the cumulative reward instead. Keys "cumulative_regret" or
        "cumulative_reward": not "regret", which TensorBoard already shows as the scalar val/regret."""
        policies: dict[str, RolloutPolicy] = {"RL^2": _Actor(self)}
        policies.update({name: make_policy(name, self.spec) for name in BASELINES.get(self.spec.name, ())})
        curves: dict[str, np.ndarray] = {}
        optimal = torch.tensor(float("nan"))
        for name, policy in policies.items():
            env = batch.make(VISUAL_TRIALS)
            rewards = rollout(env, policy).rewards.double()  # [T, E, L]
            optimal = env.optimal_return().double().to(rewards.device)
            cumulative = rewards.cumsum(-1)
            if bool(torch.isfinite(optimal).all()):
                steps = torch.arange(1, rewards.shape[-1] + 1, dtype=rewards.dtype, device=rewards.device)
                cumulative = (optimal / rewards.shape[-1])[:, None, None] * steps - cumulative
            curves[name] = cumulative.mean((0, 1)).cpu().numpy()
        regret = bool(torch.isfinite(optimal).all())
        return {"cumulative_regret" if regret else "cumulative_reward": _curve_picture(
            curves, "cumulative regret" if regret else "cumulative reward",
            f"{self.spec.name}: {batch.num_tasks} fixed task(s) x {VISUAL_TRIALS} trials")}


VISUAL_TRIALS = 100  # trials per task in the TensorBoard picture: enough to average the reward noise out
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _curve_picture(curves: dict[str, np.ndarray], ylabel: str, title: str) -> Tensor:
    """Curves over the trial's steps as a uint8 [3, H, W] picture (matplotlib, or Pillow without it)."""
    steps = np.arange(1, len(next(iter(curves.values()))) + 1)
    coloured = {name: (y, _COLOURS[i % len(_COLOURS)]) for i, (name, y) in enumerate(curves.items())}

    def draw(figure: "Figure") -> None:
        ax = figure.add_subplot()
        for name, (y, colour) in coloured.items():
            ours = name == "RL^2"  # drawn over the baselines (an untrained policy hides under random's line)
            ax.plot(steps, y, color=tuple(c / 255 for c in colour), linewidth=2.5 if ours else 1.5, label=name,
                    zorder=3 if ours else 2)
        ax.set_xlim(1, max(int(steps[-1]), 2))
        ax.set_xlabel("step of the trial")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, color="0.92")
        figure.legend(loc="outside right upper", frameon=False)

    picture = render(draw)
    return picture if picture is not None else pillow_curve_plot(steps, coloured, {})
