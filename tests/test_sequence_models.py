"""Sequence backbones (model=gru, model=transformer on (L, F) inputs): the full-sequence forward that the learner
differentiates equals the step-by-step computation of a rollout, and output t reads inputs 0..t only."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from metarun.models.base import SequenceBackbone
from metarun.models.gru import GRU
from metarun.models.sequence_transformer import SequenceTransformer
from metarun.models.transformer import Transformer

L, FEATURES, BATCH = 7, 5, 3
MODELS: dict[str, Callable[[], SequenceBackbone]] = {
    "gru": lambda: GRU((L, FEATURES), hidden=12, layers=2),
    "transformer": lambda: Transformer((L, FEATURES), width=16, depth=2, heads=4, mlp_ratio=2.0),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(name: str) -> SequenceBackbone:
    torch.manual_seed(0)
    return MODELS[name]().double()  # type: ignore[attr-defined]


def stepwise(model: SequenceBackbone, x: torch.Tensor) -> torch.Tensor:
    memory = model.initial_memory(x.shape[0])
    outputs = []
    for t in range(x.shape[1]):
        out, memory = model.step(x[:, t], memory)
        outputs.append(out)
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_sequence_forward_equals_the_steps(name: str) -> None:
    model = build(name)
    x = torch.randn(BATCH, L, FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, steps = model(x), stepwise(model, x)
    assert full.shape == (BATCH, L, model.out_features)
    torch.testing.assert_close(steps, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_output_t_reads_only_inputs_up_to_t(name: str) -> None:
    model = build(name)
    x = torch.randn(BATCH, L, FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[:, 4] += 3.0
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.equal(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("name", list(MODELS))
def test_a_shorter_sequence_is_the_prefix_of_a_longer_one(name: str) -> None:
    model = build(name)
    x = torch.randn(BATCH, L, FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :3]), model(x)[:, :3], rtol=1e-12, atol=1e-12)


def test_model_transformer_on_sequences_is_the_causal_transformer_and_keeps_vectors_and_images() -> None:
    assert "sequence" in Transformer.accepts and "sequence" in GRU.accepts
    assert isinstance(Transformer((L, FEATURES)), SequenceTransformer)
    assert type(Transformer((3,))) is Transformer and type(Transformer((1, 14, 14))) is Transformer
    assert SequenceBackbone in type(Transformer((L, FEATURES))).__mro__


def test_the_transformer_cache_is_preallocated_and_refuses_steps_past_its_length() -> None:
    model = build("transformer")
    memory = model.initial_memory(2)
    assert memory.keys.shape == (2, 2, 4, L, 4)  # depth, batch, heads, L, head_dim
    x = torch.zeros(2, FEATURES, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(L):
            _, memory = model.step(x, memory)
        with pytest.raises(ValueError, match="past the 7 steps"):
            model.step(x, memory)


def test_bad_shapes_are_one_line() -> None:
    with pytest.raises(ValueError, match="model=gru takes sequence inputs"):
        GRU((5,))
    with pytest.raises(ValueError, match="multiple of model.heads"):
        Transformer((L, FEATURES), width=10, heads=4)
