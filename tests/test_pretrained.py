"""`algo.init_from` for every metric-based learner: the backbone of another run, nothing else, and a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metarun.algorithms.feat import FEAT
from metarun.algorithms.matching import MatchingNet
from metarun.algorithms.protonet import ProtoNet
from metarun.benchmarks.base import TaskSpec
from metarun.checkpoint import save_checkpoint
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.mlp import MLP

TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=3, ways=3, shots=2, queries=2)
LEARNERS = [ProtoNet, MatchingNet, FEAT]


def toy_batch(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(3).repeat_interleave(2).repeat(2, 1)
    return TaskBatch(torch.rand(2, 6, 1, 8, 8, generator=g), support_y, torch.rand(2, 6, 1, 8, 8, generator=g),
                     support_y.clone())


def trained_protonet_checkpoint(path: Path) -> ProtoNet:
    """A ProtoNet whose backbone moved away from its initialisation, saved as a run's checkpoint."""
    torch.manual_seed(1)
    source = ProtoNet(MLP(TOY.input_shape, hidden=[16, 8]), TOY)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.5)
    for step in range(3):
        loss, _ = source.meta_loss(toy_batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint({"model": source.state_dict(), "step": 3}, path)
    return source


@pytest.mark.parametrize("learner", LEARNERS, ids=lambda c: c.__name__)
def test_init_from_starts_every_metric_learner_from_the_saved_backbone(tmp_path: Path, learner: type) -> None:
    source = trained_protonet_checkpoint(tmp_path / "best.pt")
    torch.manual_seed(5)
    fresh = learner(MLP(TOY.input_shape, hidden=[16, 8]), TOY)
    torch.manual_seed(5)
    started = learner(MLP(TOY.input_shape, hidden=[16, 8]), TOY, init_from=str(tmp_path / "best.pt"))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(started.backbone.state_dict()[key], value, rtol=0, atol=0)
        assert not torch.equal(fresh.backbone.state_dict()[key], value) or "running" in key
    # everything that is not the backbone keeps its own initialisation
    own = {k: v for k, v in started.state_dict().items() if not k.startswith("backbone.")}
    for key, value in own.items():
        torch.testing.assert_close(value, fresh.state_dict()[key], rtol=0, atol=0)


def test_protonet_started_from_a_checkpoint_predicts_as_the_saved_run(tmp_path: Path) -> None:
    source = trained_protonet_checkpoint(tmp_path / "best.pt").eval()
    started = ProtoNet(MLP(TOY.input_shape, hidden=[16, 8]), TOY, init_from=str(tmp_path / "best.pt")).eval()
    batch = toy_batch(seed=9)
    torch.testing.assert_close(started.logits(batch), source.logits(batch), rtol=0, atol=0)


@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet], ids=lambda c: c.__name__)
def test_init_from_errors_are_one_line(tmp_path: Path, learner: type) -> None:
    with pytest.raises(UserInputError, match="not found") as info:
        learner(MLP(TOY.input_shape, hidden=[16, 8]), TOY, init_from=str(tmp_path / "missing.pt"))
    assert "\n" not in str(info.value)
    trained_protonet_checkpoint(tmp_path / "best.pt")
    with pytest.raises(UserInputError, match="does not fit") as info:
        learner(MLP(TOY.input_shape, hidden=[32, 8]), TOY, init_from=str(tmp_path / "best.pt"))
    assert "\n" not in str(info.value)
