"""model=hf: a tiny BERT built from a config and a WordPiece tokenizer trained on the fixture text, saved with
save_pretrained and loaded through `model.name_or_path` as a user's model is. No network (HF_HUB_OFFLINE=1 and
local_files_only), no weights downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it at import; loading is local_files_only anyway
pytest.importorskip("transformers")
pytest.importorskip("peft")

from metarun.algorithms.maml import MAML  # noqa: E402
from metarun.benchmarks.base import TaskSpec  # noqa: E402
from metarun.episodes import TaskBatch  # noqa: E402
from metarun.errors import UserInputError  # noqa: E402
from metarun.models.base import TokenShape, input_kind  # noqa: E402
from metarun.models.hf import HFEncoder  # noqa: E402
from tests.hf_fixtures import save_tiny_model  # noqa: E402
from tests.maml_reference import assert_close_gradients, batched_meta_gradient, naive_maml_meta_gradient  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTH = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-bert")


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny, local_files_only=True)


def shape(tokenizer, length: int = LENGTH) -> TokenShape:
    return TokenShape(length, len(tokenizer))


def encode(tokenizer, texts: list[str], length: int = LENGTH) -> torch.Tensor:
    """[N, 2, L] int64 (ids, mask): what benchmark=text hands a backbone."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return torch.stack((enc["input_ids"], enc["attention_mask"]), dim=1)


def encoder(tiny: Path, tokenizer, **options) -> HFEncoder:
    torch.manual_seed(1)  # LoRA's A and the projection are drawn at construction
    return HFEncoder(shape(tokenizer, options.pop("length", LENGTH)), name_or_path=str(tiny),
                     max_length=options.pop("max_length", LENGTH), **options)


TEXTS = ["goal match team", "rain snow wind storm cloud", "stock market price", "bread cheese",
         "song guitar drum concert album band melody rhythm piano", "flight train"]


def test_tokens_are_their_own_input_kind() -> None:
    assert input_kind(TokenShape(16, 100)) == "tokens" and TokenShape(16, 100) == (2, 16)
    assert input_kind((2, 16)) == "sequence"  # an RL trial's shape keeps its kind
    assert HFEncoder.accepts == frozenset({"tokens"})


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_features_do_not_depend_on_padding(tiny: Path, tokenizer, pooling: str) -> None:
    """The attention mask is applied: the same texts padded to 12 or 20 tokens give the same features."""
    short = encoder(tiny, tokenizer, pooling=pooling).eval()
    long = encoder(tiny, tokenizer, pooling=pooling, length=20, max_length=20).eval()
    texts = [t for t in TEXTS if len(tokenizer(t)["input_ids"]) <= LENGTH]  # none truncated
    assert len(texts) >= 4
    with torch.no_grad():
        a, b = short(encode(tokenizer, texts)), long(encode(tokenizer, texts, 20))
    assert a.shape == (len(texts), 32)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mean_pooling_averages_the_unmasked_tokens_of_the_encoders_output(tiny: Path, tokenizer) -> None:
    from transformers import AutoModel

    model = encoder(tiny, tokenizer, pooling="mean").eval()
    x = encode(tokenizer, TEXTS)
    reference = AutoModel.from_pretrained(tiny, local_files_only=True).eval()  # transformers' own 2-D mask path
    with torch.no_grad():
        hidden = reference(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        mask = x[:, 1].unsqueeze(-1).float()
        want = (hidden * mask).sum(1) / mask.sum(1)
        cls = encoder(tiny, tokenizer, pooling="cls").eval()(x)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls, hidden[:, 0], atol=1e-5, rtol=1e-5)


def test_trainable_decides_the_parameters_and_what_a_checkpoint_holds(tiny: Path, tokenizer) -> None:
    every = encoder(tiny, tokenizer, trainable="all")
    none = encoder(tiny, tokenizer, trainable="none")
    head = encoder(tiny, tokenizer, trainable="head")
    lora = encoder(tiny, tokenizer, trainable="lora", lora_rank=4, lora_targets=["query", "value"])
    assert sum(p.numel() for p in every.parameters()) > 20_000
    assert list(none.parameters()) == [] and none.state_dict() == {}
    assert [n for n, _ in head.named_parameters()] == ["projection.weight", "projection.bias"]
    names = [n for n, _ in lora.named_parameters()]
    assert names and all("lora_" in n for n in names) and len(names) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    assert set(lora.state_dict()) == set(names)  # frozen weights are re-read from name_or_path, not saved
    x = encode(tokenizer, TEXTS)
    with torch.no_grad():  # LoRA's B starts at zero: the adapted encoder starts as the pretrained one
        torch.testing.assert_close(lora.eval()(x), none.eval()(x))
    assert encoder(tiny, tokenizer, trainable="head", projection=8).out_features == 8


def test_the_batched_forward_of_tasks_equals_each_tasks_own(tiny: Path, tokenizer) -> None:
    """forward_per_task (vmap over a functional_call, the prepared 4-D mask) against one call per task."""
    model = encoder(tiny, tokenizer, trainable="lora").eval()
    x = encode(tokenizer, TEXTS).view(2, 3, 2, LENGTH)
    params = {k: torch.stack([v, v + 0.1 * torch.randn_like(v)]) for k, v in model.named_parameters()}
    got = model.forward_per_task(params, x)
    for t in range(2):
        want = torch.func.functional_call(model, ({k: v[t] for k, v in params.items()}, dict(model.named_buffers())),
                                          (x[t],))
        torch.testing.assert_close(got[t], want)


def episodes(tokenizer, tasks: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    texts = TEXTS * 4

    def part(n: int) -> torch.Tensor:
        idx = torch.randint(len(texts), (tasks * n,), generator=g)
        return encode(tokenizer, [texts[i] for i in idx]).view(tasks, n, 2, LENGTH)

    labels = torch.arange(3).repeat_interleave(2).repeat(tasks, 1)
    return TaskBatch(part(6), labels, part(6), labels.clone())


@pytest.mark.parametrize("trainable, adapt, first_order", [("lora", "all", False), ("lora", "head", False),
                                                           ("head", "all", False), ("lora", "all", True)])
def test_maml_over_lora_matches_the_per_task_loop_in_float64(tiny: Path, tokenizer, trainable: str, adapt: str,
                                                             first_order: bool) -> None:
    """MAML adapts exactly the backbone's parameters (LoRA's A and B, or the projection) and its head, batched
    over tasks; the second-order meta-gradient equals the naive per-task loop's."""
    backbone = encoder(tiny, tokenizer, trainable=trainable, lora_rank=2)
    spec = TaskSpec("text", "classification", backbone_shape := shape(tokenizer), 3, 3, 2, 2)
    assert backbone_shape[1] == LENGTH
    maml = MAML(backbone, spec, inner_steps=2, inner_lr=0.5, first_order=first_order, adapt=adapt).double()
    with torch.no_grad():  # B = 0 would make A's inner gradient zero: move off the initialisation
        for name, p in maml.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    adapted = [n for n, _ in maml.net.named_parameters()]
    assert all("lora_" in n or n.startswith(("head.", "backbone.projection.")) for n in adapted)
    batch = episodes(tokenizer)
    want = naive_maml_meta_gradient(maml, batch, first_order=first_order)
    got = batched_meta_gradient(maml, batch)
    assert any(g.abs().max() > 0 for k, g in want.items() if "lora_" in k or "projection" in k)
    assert_close_gradients(got, want, rtol=1e-8)


def test_maml_over_every_parameter_matches_the_per_task_loop(tiny: Path, tokenizer) -> None:
    backbone = encoder(tiny, tokenizer, trainable="all")
    spec = TaskSpec("text", "classification", shape(tokenizer), 3, 3, 2, 2)
    maml = MAML(backbone, spec, inner_steps=1, inner_lr=0.5).double()
    batch = episodes(tokenizer)
    got, want = batched_meta_gradient(maml, batch), naive_maml_meta_gradient(maml, batch, False)
    # the key projection's bias has an exactly zero gradient (softmax is invariant to a constant per query), so
    # its rounding noise is measured against the whole meta-gradient's norm, every other parameter against its own
    total = torch.cat([g.flatten() for g in want.values()]).norm()
    assert all(want[k].norm() < 1e-12 * total for k in want if k.endswith("attention.self.key.bias"))
    assert_close_gradients({k: v for k, v in got.items() if not k.endswith("key.bias")},
                           {k: v for k, v in want.items() if not k.endswith("key.bias")}, 1e-8)
    assert all((got[k] - want[k]).norm() < 1e-12 * total for k in want if k.endswith("key.bias"))


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_fused_sdpa_attention_has_no_double_backward_on_cpu(tiny: Path, tokenizer) -> None:
    """Why attention is eager by default (measured on torch 2.13 CPU): second-order MAML through SDPA fails, first
    order runs. If a torch release adds the derivative this test says so, and `attention: sdpa` can be allowed."""
    spec = TaskSpec("text", "classification", shape(tokenizer), 3, 3, 2, 2)
    batch = episodes(tokenizer)
    first = MAML(encoder(tiny, tokenizer, trainable="lora", attention="sdpa"), spec, first_order=True)
    first.meta_loss(batch)[0].backward()
    second = MAML(encoder(tiny, tokenizer, trainable="lora", attention="sdpa"), spec, first_order=False)
    with pytest.raises(RuntimeError, match="not implemented"):
        second.meta_loss(batch)[0].backward()


def test_a_missing_directory_or_uncached_id_is_one_line_saying_where_it_looked(
        tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserInputError, match=r"no such directory.*save_pretrained"):
        HFEncoder(shape(tokenizer), name_or_path=str(tmp_path / "nowhere"), max_length=LENGTH)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserInputError) as error:
        HFEncoder(shape(tokenizer), name_or_path="someone/not-cached-bert", max_length=LENGTH)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "hub") in message and "hf download someone/not-cached-bert" in message
    with pytest.raises(UserInputError, match="model.name_or_path is not set"):
        HFEncoder(shape(tokenizer), max_length=LENGTH)


def test_a_cached_model_id_loads_offline(tmp_path: Path, tiny: Path, tokenizer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A model id in the Hugging Face cache layout (models--org--name/snapshots/<rev>, refs/main) loads with no
    network, as a user's `hf download` leaves it."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-bert"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = HFEncoder(shape(tokenizer), name_or_path="tiny-org/tiny-bert", max_length=LENGTH)
    assert model.out_features == 32


def test_a_tokenizer_bigger_than_the_models_vocabulary_is_one_line(tmp_path: Path, tokenizer) -> None:
    small = save_tiny_model(tmp_path / "small-vocab", vocab_extra=-10)
    with pytest.raises(UserInputError, match=r"the tokenizer has \d+ tokens but .* embeds only \d+ \(vocab_size\)"):
        HFEncoder(shape(tokenizer), name_or_path=str(small), max_length=LENGTH)


def test_bad_options_are_one_line(tiny: Path, tokenizer) -> None:
    with pytest.raises(UserInputError, match="model.trainable=some is not one of all, head, none, lora"):
        encoder(tiny, tokenizer, trainable="some")
    with pytest.raises(UserInputError, match=r"model.lora_targets=\['nonexistent'\]"):
        encoder(tiny, tokenizer, trainable="lora", lora_targets=["nonexistent"])
    with pytest.raises(UserInputError, match="model.max_length=100 but .* has 64 positions"):
        encoder(tiny, tokenizer, length=100, max_length=100)
    with pytest.raises(UserInputError, match="benchmark.max_length=20 but model.max_length=12"):
        encoder(tiny, tokenizer, length=20)


def test_without_the_nlp_extra_model_hf_is_one_line(tiny: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = sys.modules["transformers"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(UserInputError) as error:
        HFEncoder(shape(tokenizer), name_or_path=str(tiny), max_length=LENGTH)
    assert str(error.value) == 'model=hf needs transformers, which is not installed: pip install "metarun[nlp]"'
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UserInputError, match=r'model.trainable=lora needs peft, .*pip install "metarun\[nlp\]"'):
        encoder(tiny, tokenizer, trainable="lora")
