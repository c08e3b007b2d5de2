"""model=transformer: batched MAML through attention and LayerNorm must match the per-task loop in float64.

LayerNorm, GELU and attention under vmap with double backward are checked here rather than assumed
(native BatchNorm is known to give wrong second-order gradients under vmap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metarun.algorithms.maml import MAML
from metarun.benchmarks.base import TaskSpec
from metarun.benchmarks.sine import SineBenchmark
from metarun.config import config_dir, validate
from metarun.episodes import TaskBatch
from metarun.models.transformer import LayerNorm, PatchTokenizer, SelfAttention, Transformer
from tests.maml_reference import assert_close_gradients, batched_meta_gradient, naive_maml_meta_gradient


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These float64 problems are tiny, so a second intra-op thread only adds synchronisation; on the
    busy 2-core machine it made this file 10x slower (49 s with 2 threads, 5 s with 1, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOY = TaskSpec(name="toy", kind="classification", input_shape=(1, 8, 8), output_size=3, ways=3, shots=2, queries=2)
TOY_VECTOR = TaskSpec(name="toy-vector", kind="regression", input_shape=(3,), output_size=2, ways=1, shots=4, queries=5)
Layer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def toy_image_batch(num_tasks: int, seed: int) -> TaskBatch:
    """Random 8x8 images with balanced labels: enough to exercise the image path of the backbone."""
    g = torch.Generator().manual_seed(seed)
    support, query = TOY.ways * TOY.shots, TOY.ways * TOY.queries

    def labels(n: int) -> torch.Tensor:
        return torch.stack([torch.randperm(n, generator=g) % TOY.ways for _ in range(num_tasks)])

    return TaskBatch(torch.randn(num_tasks, support, *TOY.input_shape, generator=g), labels(support),
                     torch.randn(num_tasks, query, *TOY.input_shape, generator=g), labels(query))


def toy_vector_batch(num_tasks: int, seed: int) -> TaskBatch:
    """Random 3-feature inputs and 2-d targets: several feature tokens attending to each other."""
    g = torch.Generator().manual_seed(seed)
    s, q, d, o = TOY_VECTOR.shots, TOY_VECTOR.queries, TOY_VECTOR.input_shape[0], TOY_VECTOR.output_size
    return TaskBatch(*(torch.randn(num_tasks, n, k, generator=g) for n, k in ((s, d), (s, o), (q, d), (q, o))))


def small_maml(case: str, **algo: object) -> tuple[MAML, TaskBatch]:
    """A float64 MAML on a tiny transformer, and a batch, for `case` in sine, vector3, image, image-mean."""
    torch.manual_seed(0)
    if case == "sine":
        bench = SineBenchmark(shots=4, queries=5)
        spec, batch = bench.spec, bench.sample("train", 3, torch.Generator().manual_seed(1))
        backbone = Transformer(spec.input_shape, width=16, depth=2, heads=2, fourier_features=4)
    elif case == "vector3":
        spec, batch = TOY_VECTOR, toy_vector_batch(3, seed=1)
        backbone = Transformer(spec.input_shape, width=16, depth=2, heads=2, fourier_features=3)
    else:
        spec, batch = TOY, toy_image_batch(3, seed=1)
        backbone = Transformer(spec.input_shape, width=16, depth=2, heads=2, patch=4,
                               pool="mean" if case == "image-mean" else "cls")
    maml = MAML(backbone, spec, inner_lr=0.1, **algo).double()  # type: ignore[arg-type]
    return maml, batch.to("cpu", torch.float64)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("case", ["sine", "image"])
def test_batched_maml_matches_per_task_loop(case: str, inner_steps: int, first_order: bool) -> None:
    """With torch's fused affine LayerNorm the second-order cases fail here by 2e-3 to 2e-1 (see transformer.py)."""
    maml, batch = small_maml(case, inner_steps=inner_steps, first_order=first_order)
    assert_close_gradients(batched_meta_gradient(maml, batch), naive_maml_meta_gradient(maml, batch, first_order))


@pytest.mark.parametrize("case,adapt", [("vector3", "all"), ("image-mean", "all"), ("sine", "head"), ("image", "head")])
def test_batched_maml_matches_per_task_loop_variants(case: str, adapt: str) -> None:
    """Several feature tokens, mean pooling (no class token), and ANIL (body features computed once)."""
    maml, batch = small_maml(case, inner_steps=2, adapt=adapt)
    assert_close_gradients(batched_meta_gradient(maml, batch), naive_maml_meta_gradient(maml, batch, False))


def _one_layer_meta_gradient(layer: Layer, batched: bool) -> torch.Tensor:
    """Second-order one-step MAML meta-gradient, w.r.t. `a`, of `layer(x @ a, w)` with both `a` and `w`
    adapted (so the second pass sees per-task weights, as in MAML), by vmap or by a per-task loop; float64."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    params = {"a": 0.5 * torch.randn(8, 8, generator=g, dtype=torch.float64),
              "w": 1 + 0.5 * torch.randn(8, generator=g, dtype=torch.float64)}
    params = {k: v.requires_grad_() for k, v in params.items()}

    def loss(p: dict[str, torch.Tensor], xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        return ((layer(xt @ p["a"], p["w"]) - yt) ** 2).mean()

    def adapted(xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        grads = torch.func.grad(loss)(params, xt, yt)
        return loss({k: v - 0.3 * grads[k] for k, v in params.items()}, xt, yt)

    meta = torch.func.vmap(adapted)(x, y).mean() if batched else sum(adapted(x[t], y[t]) for t in range(3)) / 3
    return torch.autograd.grad(meta, params["a"])[0]


def _relative_error(layer: Layer) -> float:
    want = _one_layer_meta_gradient(layer, batched=False)
    return ((_one_layer_meta_gradient(layer, batched=True) - want).norm() / want.norm()).item()


@pytest.mark.xfail(reason="torch 2.13: fused affine layer_norm gives wrong vmapped second-order input gradients "
                          "(measured 1.7e-1 relative); why transformer.LayerNorm applies the affine separately",
                   strict=False)
def test_fused_affine_layer_norm_under_vmap_double_backward() -> None:
    """Canary for the workaround: when this passes, the fused affine LayerNorm could be used again."""
    assert _relative_error(lambda h, w: F.layer_norm(h, (8,), w)) < 1e-8


def test_split_layer_norm_under_vmap_double_backward() -> None:
    assert _relative_error(lambda h, w: F.layer_norm(h, (8,)) * w) < 1e-8


def _heads(h: torch.Tensor) -> torch.Tensor:
    return h.unflatten(-1, (2, 4)).transpose(0, 1).unsqueeze(0)  # [1, heads, tokens, d], as in SelfAttention


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # no vmap batching rule for the flash kernel
@pytest.mark.xfail(raises=RuntimeError, strict=False,
                   reason="torch 2.13 CPU: SDPA picks the flash kernel, whose backward is not differentiable; "
                          "why SelfAttention writes softmax(QK^T/sqrt(d))V out")
def test_sdpa_under_vmap_double_backward() -> None:
    """Canary for the workaround: when this passes, F.scaled_dot_product_attention could be used again."""
    assert _relative_error(lambda h, w: F.scaled_dot_product_attention(_heads(h), _heads(h), _heads(h * w))
                           .squeeze(0).transpose(0, 1).flatten(-2)) < 1e-8


def test_explicit_attention_under_vmap_double_backward() -> None:
    def attention(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q, v = _heads(h), _heads(h * w)
        return (torch.softmax(q @ q.transpose(-1, -2) / 2.0, dim=-1) @ v).squeeze(0).transpose(0, 1).flatten(-2)

    assert _relative_error(attention) < 1e-8


@pytest.mark.parametrize("case", ["sine", "image"])
def test_second_order_terms_are_present(case: str) -> None:
    """Guards the matching tests: the Hessian terms through attention/LayerNorm/GELU must change the result."""
    maml, batch = small_maml(case, inner_steps=2)
    second = batched_meta_gradient(maml, batch)
    maml.first_order = True
    first = batched_meta_gradient(maml, batch)
    gap = max(((second[k] - first[k]).norm() / second[k].norm()).item() for k in second)
    assert gap > 1e-4


def test_attention_is_scaled_dot_product_attention() -> None:
    """The explicit softmax(QK^T/sqrt(d))V path computes what F.scaled_dot_product_attention computes."""
    torch.manual_seed(0)
    attn = SelfAttention(width=16, heads=4).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x).unflatten(-1, (3, 4, 4)).permute(2, 0, 3, 1, 4)
    want = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(attn(x), want, rtol=1e-12, atol=1e-12)


def test_layer_norm_is_torch_layer_norm() -> None:
    """The split LayerNorm (fused normalisation, separate affine) computes F.layer_norm with weight and bias."""
    torch.manual_seed(0)
    norm = LayerNorm(16).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    want = F.layer_norm(x, (16,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(x), want, rtol=1e-12, atol=1e-12)


def test_patch_embedding_is_strided_convolution() -> None:
    """reshape + Linear is the ViT patch embedding, Conv2d(kernel=stride=patch), with tokens in row-major order."""
    torch.manual_seed(0)
    tokenizer = PatchTokenizer((3, 12, 8), patch=4, width=5).double()
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    weight = tokenizer.embed.weight.reshape(5, 3, 4, 4)
    conv = F.conv2d(x, weight, tokenizer.embed.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokenizer(x), conv + tokenizer.position, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1,), (4,), (1, 8, 8), (3, 12, 12)])
def test_deterministic_under_seed(shape: tuple[int, ...]) -> None:
    def build(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(seed)
        model = Transformer(shape, width=16, heads=2, patch=4, fourier_features=3)
        x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(7))
        return model.state_dict(), model(x)

    (state, out), (state2, out2), (state3, _) = build(0), build(0), build(1)
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(out, out2)
    assert out.shape == (5, 16)
    assert any(not torch.equal(state[k], state3[k]) for k in state)


def test_accepts_vector_image_and_sequence_inputs() -> None:
    assert {"vector", "image", "sequence"} <= Transformer.accepts
    assert Transformer((1,)).out_features == 64
    assert Transformer((1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    assert Transformer((3, 84, 84), width=32)(torch.zeros(1, 3, 84, 84)).shape == (1, 32)
    with pytest.raises(ValueError, match="must divide"):
        Transformer((1, 28, 28), patch=5)
    assert Transformer((4, 3))(torch.zeros(2, 4, 3)).shape == (2, 4, 64)  # (L, F): the causal sequence model
    with pytest.raises(ValueError, match="vector"):
        Transformer((2, 2, 2, 2))


def test_fourier_frequencies_are_a_buffer() -> None:
    """A buffer follows .double() and reaches functional_call (MAML passes the module's buffers)."""
    model = Transformer((1,), fourier_features=8).double()
    assert dict(model.named_buffers())["tokenizer.frequencies"].dtype == torch.float64
    assert not any(n.endswith("frequencies") for n, _ in model.named_parameters())


def test_config_composes_and_validates() -> None:
    """configs/model/transformer.yaml names only constructor keys, with the right types."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = validate(compose(config_name="train", overrides=["model=transformer", "debug=smoke"]))
    model = instantiate(cfg.model, input_shape=(1,))
    assert isinstance(model, Transformer) and model.out_features == cfg.model.width
