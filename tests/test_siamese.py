"""Siamese networks (Koch et al. 2015), the shared meta-training augmentation, and within-alphabet episodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.siamese import Siamese, weighted_l1
from metarun.benchmarks.augment import Augmentation
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.sampler import EpisodeSampler
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.koch import KochNet
from metarun.models.mlp import MLP

TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=3, ways=3, shots=2, queries=2)


def toy_batch(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64), support_y,
                     torch.rand(tasks, ways * queries, 1, 8, 8, generator=g, dtype=torch.float64), query_y)


def make(spec: TaskSpec = TOY, **kwargs: object) -> Siamese:
    torch.manual_seed(0)
    return Siamese(MLP(spec.input_shape, hidden=[16, 8]), spec, **kwargs).double()  # type: ignore[arg-type]


def test_weighted_l1_equals_the_materialised_sum_with_weights_of_both_signs() -> None:
    g = torch.Generator().manual_seed(1)
    query, support = torch.randn(2, 5, 7, generator=g, dtype=torch.float64), torch.randn(2, 4, 7, generator=g,
                                                                                           dtype=torch.float64)
    weight = torch.randn(7, generator=g, dtype=torch.float64)
    naive = ((query.unsqueeze(2) - support.unsqueeze(1)).abs() * weight).sum(-1)
    torch.testing.assert_close(weighted_l1(query, support, weight), naive, rtol=1e-12, atol=1e-12)
    weight.requires_grad_(True)
    query.requires_grad_(True)
    torch.autograd.gradcheck(lambda q, w: weighted_l1(q, support, w), (query, weight))


def test_loss_is_binary_cross_entropy_of_every_query_support_pair() -> None:
    net = make(train_ways=3, train_queries=2)
    batch = toy_batch(shots=1)  # a training episode: train_ways classes, one shot, train_queries queries
    loss, metrics = net.meta_loss(batch)
    pair = []
    for t in range(batch.num_tasks):
        fq, fs = net.backbone(batch.query_x[t]), net.backbone(batch.support_x[t])
        for i in range(fq.shape[0]):
            for j in range(fs.shape[0]):
                logit = net.distance(torch.abs(fq[i] - fs[j]))[0]
                same = float(batch.query_y[t, i] == batch.support_y[t, j])
                pair.append(F.binary_cross_entropy_with_logits(logit, torch.tensor(same, dtype=logit.dtype)))
    torch.testing.assert_close(loss, torch.stack(pair).mean(), rtol=1e-10, atol=1e-12)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_k_shot_classification_takes_the_mean_pair_probability_per_class() -> None:
    net = make()
    net.eval()
    batch = toy_batch(shots=2)
    scores = net.class_scores(batch, 3)
    probability = torch.sigmoid(net.pair_logits(batch))  # [T, Q, S]
    by_class = torch.stack([probability[:, :, batch.support_y[0] == c].mean(-1) for c in range(3)], -1)
    torch.testing.assert_close(scores, by_class)
    accuracy = net.evaluate(batch)["accuracy"]
    torch.testing.assert_close(accuracy, (by_class.argmax(-1) == batch.query_y).double().mean(1))


def test_training_pairs_are_balanced_two_way_one_shot_episodes() -> None:
    net = make()
    assert net.train_episode() == {"ways": 2, "shots": 1, "queries": 1}
    batch = toy_batch(ways=2, shots=1, queries=1)
    same = batch.query_y.unsqueeze(2) == batch.support_y.unsqueeze(1)
    assert same.double().mean() == 0.5
    with pytest.raises(ValueError, match="algo.train_ways must be at least 2"):
        make(train_ways=1)


def test_koch_network_has_the_papers_shape() -> None:
    net = KochNet((1, 105, 105))
    assert net.out_features == 4096 and net.fc.in_features == 256 * 6 * 6
    assert net(torch.rand(2, 1, 105, 105)).shape == (2, 4096)
    with pytest.raises(ValueError, match="too small"):
        KochNet((1, 28, 28))


# -- augmentation (benchmarks/augment.py) and within-group episodes (sampler) -----------------------------------

def _store(classes: int = 12, examples: int = 4, size: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    store = torch.zeros(classes, examples, 1, size, size, dtype=torch.uint8)
    store[..., 3:9, 4:8] = (torch.rand(classes, examples, 1, 6, 4, generator=g) * 255).to(torch.uint8)
    store[:, :, 0, 0, 0] = torch.arange(1, classes + 1, dtype=torch.uint8).unsqueeze(1)  # the class, readable back
    return store


KOCH = {"rotation": 10, "shear": 0.3, "scale": [0.8, 1.2], "translation": 2, "probability": 0.5}


def test_augmentation_is_seeded_per_image_and_only_for_training_episodes() -> None:
    ranges = {"train": (0, 6), "val": (6, 9), "test": (9, 12)}
    plain = EpisodeSampler(_store(), ranges, 3, 1, 1)
    augmented = EpisodeSampler(_store(), ranges, 3, 1, 1, augment=Augmentation.from_config(KOCH))
    draw = lambda s, split, seed: s.sample(split, 4, torch.Generator().manual_seed(seed))  # noqa: E731
    a, b = draw(augmented, "train", 3), draw(augmented, "train", 3)
    assert torch.equal(a.support_x, b.support_x)  # the generator decides, nothing else
    original = draw(plain, "train", 3)
    assert not torch.allclose(a.support_x, original.support_x)
    assert torch.equal(a.support_y, original.support_y)  # labels and classes are the unaugmented draw's
    for split in ("val", "test"):
        assert torch.equal(draw(augmented, split, 5).query_x, draw(plain, split, 5).query_x)
    identity = Augmentation.from_config({**KOCH, "probability": 0.0})
    images = original.support_x
    torch.testing.assert_close(identity(images, torch.Generator().manual_seed(0)), images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("node, message", [({"rotate": 5}, "unknown key"), ({"scale": [1.2, 0.8]}, "low <= high"),
                                           ({"probability": 2}, "probability")])
def test_bad_augmentation_settings_are_one_line(node: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        Augmentation.from_config(node)


def test_within_group_episodes_draw_all_classes_from_one_group() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])  # e.g. alphabets
    sampler = EpisodeSampler(_store(), {"train": (0, 6), "val": (6, 9), "test": (9, 12)}, 3, 1, 1, groups=groups)
    batch = sampler.sample("train", 50, torch.Generator().manual_seed(0))
    classes = (batch.support_x[:, :, 0, 0, 0] * 255).round().long() - 1  # [T, 3], written into the store
    assert len(classes.unique()) > 3  # the tasks do not all draw the same group
    for task in classes:
        assert len(set(task.tolist())) == 3 and len({int(groups[c]) for c in task}) == 1
    with pytest.raises(UserInputError, match="4-way episodes within one group: no group of the train split"):
        EpisodeSampler(_store(), {"train": (0, 9), "val": (9, 12), "test": (9, 12)}, 2, 1, 1,
                       groups=groups).sample("train", 1, torch.Generator(), ways=4)


def test_siamese_trains_on_the_omniglot_fixture_through_the_cli(tmp_path: Path) -> None:
    from tests.conftest import read_results, run_metarun
    from tests.image_fixtures import omniglot_tree

    root = omniglot_tree(tmp_path / "omniglot", {f"Alphabet_{c}": 3 for c in "ABCDEF"}, {"Script_X": 3, "Script_Y": 3})
    proc = run_metarun("train", "algo=siamese", "model=cnn", "benchmark=omniglot", f"benchmark.root={root}",
                       "benchmark.split_scheme=lake", "benchmark.image_size=16", "benchmark.queries=2",
                       f"benchmark.cache_dir={tmp_path / 'cache'}", "benchmark.within_alphabet=true",
                       "benchmark.ways=3", "+benchmark.augment={rotation: 10, probability: 0.5}", "debug=smoke",
                       "logger.console=false", "logger.tensorboard=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    assert read_results(tmp_path / "run")["algo"] == "siamese"
    refused = run_metarun("train", "algo=siamese", "debug=smoke", f"hydra.run.dir={tmp_path / 'sine'}")
    assert refused.returncode == 2 and "algo=siamese supports only classification" in refused.stderr


def test_the_koch_preset_trains_and_tests_within_alphabet_on_105px_images(tmp_path: Path) -> None:
    """experiment=siamese_omniglot_koch on a fixture with 20 characters per alphabet (its 20-way tasks come from
    one alphabet; the shared preset fixture has 3-5): Koch's network, distortions and protocol run end to end."""
    from tests.conftest import read_results, run_metarun
    from tests.image_fixtures import omniglot_tree

    root = omniglot_tree(tmp_path / "omniglot", {f"Alphabet_{c}": 20 for c in "ABCDEF"}, {"Script_X": 20})
    proc = run_metarun("train", "experiment=siamese_omniglot_koch", f"benchmark.root={root}", "debug=smoke",
                       f"benchmark.cache_dir={tmp_path / 'cache'}", "model.embedding=64", "logger.console=false",
                       "logger.tensorboard=false", f"hydra.run.dir={tmp_path / 'run'}", "threads=1")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "run")
    assert results["paper"]["mean"] == 0.92 and results["tasks"] == 6 and 0.0 <= results["mean"] <= 1.0
