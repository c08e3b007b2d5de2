"""EpisodeSampler on a store whose pixels name their own class and example, so every property is checkable."""

from __future__ import annotations

import pytest
import torch

from metarun.benchmarks.sampler import EpisodeSampler
from metarun.errors import UserInputError

CLASSES, EXAMPLES = 30, 12
RANGES = {"train": (0, 18), "val": (18, 24), "test": (24, 30)}


def labelled_store() -> torch.Tensor:
    """uint8 [30, 12, 1, 2, 2]: pixel (0,0) is the class, pixel (0,1) the example index."""
    store = torch.zeros(CLASSES, EXAMPLES, 1, 2, 2, dtype=torch.uint8)
    store[:, :, 0, 0, 0] = torch.arange(CLASSES).unsqueeze(1)
    store[:, :, 0, 0, 1] = torch.arange(EXAMPLES).unsqueeze(0)
    return store


def identities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, example) of each image of a [T, M, 1, 2, 2] float batch."""
    pixels = (x * 255).round().long()
    return pixels[..., 0, 0, 0], pixels[..., 0, 0, 1]


def make(ways: int = 5, shots: int = 2, queries: int = 3) -> EpisodeSampler:
    return EpisodeSampler(labelled_store(), RANGES, ways, shots, queries, name="fixture")


def test_shapes_dtypes_and_range() -> None:
    batch = make().sample("train", 7, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (7, 10, 1, 2, 2) and batch.query_x.shape == (7, 15, 1, 2, 2)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.long
    assert batch.support_y.shape == (7, 10) and batch.query_y.shape == (7, 15)
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # class-major layout


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_episode_structure(split: str) -> None:
    ways, shots, queries = 5, 2, 3
    batch = make(ways, shots, queries).sample(split, 50, torch.Generator().manual_seed(1))
    s_class, s_example = identities(batch.support_x)
    q_class, q_example = identities(batch.query_x)
    start, stop = RANGES[split]
    for t in range(50):
        classes = [int(s_class[t][batch.support_y[t] == label][0]) for label in range(ways)]
        assert len(set(classes)) == ways, "classes drawn without replacement"
        assert all(start <= c < stop for c in classes), "only the split's classes"
        for label, cls in enumerate(classes):
            s_mask, q_mask = batch.support_y[t] == label, batch.query_y[t] == label
            assert (s_class[t][s_mask] == cls).all() and (q_class[t][q_mask] == cls).all(), "one class per label"
            examples = torch.cat([s_example[t][s_mask], q_example[t][q_mask]]).tolist()
            assert len(set(examples)) == shots + queries, "support and query examples all distinct"


def test_labels_are_a_random_permutation_of_classes() -> None:
    """Label 0 must not always name the smallest class id: the class order per task is random."""
    batch = make().sample("train", 200, torch.Generator().manual_seed(2))
    s_class, _ = identities(batch.support_x)
    first = s_class[:, 0]  # class of label 0
    smallest = s_class.min(dim=1).values
    assert 0.05 < (first == smallest).float().mean() < 0.5


def test_every_class_and_example_is_reachable() -> None:
    batch = make().sample("train", 400, torch.Generator().manual_seed(3))
    s_class, s_example = identities(batch.support_x)
    assert set(s_class.flatten().tolist()) == set(range(*RANGES["train"]))
    assert set(s_example.flatten().tolist()) == set(range(EXAMPLES))


def test_seeded_determinism() -> None:
    a = make().sample("val", 8, torch.Generator().manual_seed(5))
    b = make().sample("val", 8, torch.Generator().manual_seed(5))
    c = make().sample("val", 8, torch.Generator().manual_seed(6))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)


def test_global_rng_untouched() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make().sample("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_too_many_ways_or_examples_is_one_line() -> None:
    with pytest.raises(UserInputError, match=r"benchmark.ways=7 but the val split of fixture has only 6 classes") as ex:
        make(ways=7)
    assert "\n" not in str(ex.value)
    with pytest.raises(UserInputError, match=r"shots \+ benchmark.queries = 5 \+ 8 = 13 but fixture has 12") as ex:
        make(shots=5, queries=8)
    assert "\n" not in str(ex.value)


def test_to_moves_the_store() -> None:
    sampler = make().to("meta")
    batch = sampler.sample("train", 2, torch.Generator().manual_seed(0))
    assert batch.support_x.device.type == "meta" and batch.query_y.device.type == "meta"


def test_another_episode_shape_on_request() -> None:
    """Wider meta-training episodes (Prototypical Networks train 60-way and test 5-way)."""
    sampler = make(ways=5, shots=2, queries=3)
    wide = sampler.sample("train", 4, torch.Generator().manual_seed(0), ways=12, queries=1)
    assert wide.support_x.shape == (4, 24, 1, 2, 2) and wide.query_y.shape == (4, 12)
    assert wide.query_y[0].tolist() == list(range(12))
    s_class, _ = identities(wide.support_x)
    assert all(len(set(s_class[t].tolist())) == 12 for t in range(4))
    assert sampler.sample("val", 2, torch.Generator().manual_seed(0)).support_x.shape == (2, 10, 1, 2, 2)
    with pytest.raises(UserInputError, match="episode ways=7 but the val split of fixture has only 6 classes"):
        sampler.sample("val", 1, torch.Generator(), ways=7)
