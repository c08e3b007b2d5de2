"""A pretrained Hugging Face encoder as a backbone (`model=hf`): token ids -> one feature vector per text.

Inputs are the text benchmark's int64 [N, 2, L] (token ids, attention mask; TokenShape), outputs the pooled
last hidden states, [CLS] (Devlin et al. 2019) or the mean over the unmasked tokens, optionally through a
linear projection. What is trained is a model option (`trainable`), never an algorithm's business:

- `all`: every weight of the encoder; `none`: nothing of it (fixed features: the algorithm's own head or metric
  learns); `head`: only the projection on top of the frozen encoder; `lora`: low-rank adapters (Hu et al. 2022,
  "LoRA") injected by the `peft` library into the layers `lora_targets` names, the encoder frozen.
- Frozen weights are re-registered as non-persistent *buffers*, not parameters with requires_grad=False. So
  `named_parameters()` is exactly what learns: the trainer's optimizer steps only it, a checkpoint holds only it
  (the frozen weights are read again from `name_or_path`), and MAML/ANIL adapt exactly it in their inner loop
  with no hook of their own (MAML adapts `net.named_parameters()`: LoRA's A and B, the projection and its head),
  batched over tasks through vmap of a functional_call with the buffers shared by every task.
- The attention mask goes in as a prepared additive [N, 1, 1, L] mask: transformers' 2-D mask path asks
  `mask.all()` to skip masking, a data-dependent branch that torch.func.vmap refuses (measured, transformers 5).
- Attention is the eager implementation by default: SDPA's fused CPU kernel has no double backward
  (torch 2.13: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"),
  which second-order MAML needs. `attention: sdpa` is for first-order and metric learners.

Loading never touches the network (`local_files_only`): a local directory, or a model id already in the
Hugging Face cache; anything else is one line saying where it looked and how to fetch it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.defaults import option_defaults
from metarun.errors import UserInputError
from metarun.models.base import Backbone, InputKind, TokenShape

NLP_EXTRA = 'pip install "metarun[nlp]"'
TRAINABLE = ("all", "head", "none", "lora")
POOLING = ("cls", "mean")
ATTENTION = ("eager", "sdpa")


def require(package: str, what: str = "model=hf") -> Any:
    """Import an `nlp` extra's package, or one line saying what to install (the core install has none of them)."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserInputError(f"{what} needs {package}, which is not installed: {NLP_EXTRA}") from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers prints a progress bar and a load report per model; metarun prints its own one line."""
    transformers = require("transformers")
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def locate_pretrained(name_or_path: str | None, key: str = "model.name_or_path") -> str:
    """`name_or_path` as transformers loads it offline: an existing directory with a config.json or a tokenizer,
    or a model id found in the Hugging Face cache. Anything else is one line saying where it looked."""
    if not name_or_path:
        raise UserInputError(f"{key} is not set: give a local directory (saved with save_pretrained) or a model id "
                             "in the Hugging Face cache, e.g. model.name_or_path=bert-base-uncased")
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return str(path)
    looks_like_path = str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1
    hub = require("huggingface_hub")
    cache = require("huggingface_hub.constants").HF_HUB_CACHE
    if not looks_like_path:
        try:
            hub.snapshot_download(str(name_or_path), local_files_only=True)
            return str(name_or_path)
        except Exception:  # not in the cache (or a malformed id): the message below says where it looked
            pass
    fetch = (f"fetch it on a connected machine with `hf download {name_or_path}` and copy {cache} here, "
             "or pass a local directory") if not looks_like_path else "pass a directory saved with save_pretrained"
    raise UserInputError(f"{key}={name_or_path}: no such directory, and no model of that id in the Hugging Face "
                         f"cache {cache} (loading is offline); {fetch}")


def load_tokenizer(name_or_path: str | None, key: str) -> Any:
    """The fast tokenizer saved with a model (offline), or one line."""
    where = locate_pretrained(name_or_path, key)
    transformers = require("transformers", "benchmark=text")
    with quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
        except (OSError, ValueError, TypeError) as ex:
            raise UserInputError(f"{key}={name_or_path}: no tokenizer could be loaded from it "
                                 f"({str(ex).splitlines()[0][:160]})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(f"{key}={name_or_path}: a slow (Python) tokenizer; metarun tokenises with a fast one "
                             "(tokenizer.json, the `tokenizers` library)")
    return tokenizer


def freeze_to_buffers(module: nn.Module, keep: Any = lambda name: False) -> None:
    """Turn every parameter whose full name `keep` rejects into a non-persistent buffer of the same module, so
    that it is read as before (`self.weight`) but is no longer trained, adapted, or saved (see module doc)."""
    for prefix, sub in list(module.named_modules()):
        for name, param in list(sub._parameters.items()):
            if param is None or keep(f"{prefix}.{name}" if prefix else name):
                continue
            del sub._parameters[name]
            sub.register_buffer(name, param.detach(), persistent=False)


_DEFAULTS = option_defaults("model", "hf")


class HFEncoder(nn.Module, Backbone):
    """Constructor parameters are the `model.*` keys of configs/model/hf.yaml (run.py passes `input_shape`)."""

    accepts: ClassVar[frozenset[InputKind]] = frozenset({"tokens"})

    def __init__(
        self,
        input_shape: tuple[int, ...],
        name_or_path: str | None = _DEFAULTS["name_or_path"],
        pooling: str = _DEFAULTS["pooling"],
        max_length: int = _DEFAULTS["max_length"],
        trainable: str = _DEFAULTS["trainable"],
        projection: int | None = _DEFAULTS["projection"],
        lora_rank: int = _DEFAULTS["lora_rank"],
        lora_alpha: int = _DEFAULTS["lora_alpha"],
        lora_dropout: float = _DEFAULTS["lora_dropout"],
        lora_targets: Sequence[str] | None = _DEFAULTS["lora_targets"],
        attention: str = _DEFAULTS["attention"],
    ) -> None:
        super().__init__()
        for key, value, options in (("pooling", pooling, POOLING), ("trainable", trainable, TRAINABLE),
                                    ("attention", attention, ATTENTION)):
            if value not in options:
                raise UserInputError(f"model.{key}={value} is not one of {', '.join(options)}")
        if not isinstance(input_shape, TokenShape):
            raise ValueError(f"model=hf reads token ids (benchmark=text), not inputs of shape {tuple(input_shape)}")
        if input_shape[1] != max_length:
            raise UserInputError(f"benchmark.max_length={input_shape[1]} but model.max_length={max_length}; "
                                 "leave benchmark.max_length to follow the model's")
        transformers = require("transformers")
        where = locate_pretrained(name_or_path)
        with quiet_transformers():
            try:
                config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
                encoder = transformers.AutoModel.from_pretrained(where, config=config, local_files_only=True,
                                                                 attn_implementation=attention)
            except (OSError, ValueError, KeyError) as ex:
                raise UserInputError(f"model.name_or_path={name_or_path}: no model could be loaded from it "
                                     f"({str(ex).splitlines()[0][:160]})") from None
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if input_shape.vocab_size > vocab:
            raise UserInputError(f"the tokenizer has {input_shape.vocab_size} tokens but "
                                 f"model.name_or_path={name_or_path} "
                                 f"embeds only {vocab} (vocab_size): the tokenizer is not this model's; point "
                                 "benchmark.tokenizer at the model's own")
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and max_length > int(positions):
            raise UserInputError(f"model.max_length={max_length} but {name_or_path} has {positions} positions; "
                                 f"use model.max_length <= {positions}")
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's pooler is unused (we pool ourselves); unused weights would break MAML
        hidden = int(config.hidden_size)
        if trainable == "lora":
            peft = require("peft", "model.trainable=lora")
            lora = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                   target_modules=list(lora_targets) if lora_targets else None, bias="none")
            try:
                encoder = peft.inject_adapter_in_model(lora, encoder)
            except ValueError as ex:
                raise UserInputError(f"model.lora_targets={list(lora_targets or [])}: "
                                     f"{str(ex).splitlines()[0][:200]}") from None
        if trainable != "all":
            freeze_to_buffers(encoder, keep=lambda name: trainable == "lora" and "lora_" in name)
        width = projection if projection is not None else (hidden if trainable == "head" else None)
        self.encoder = encoder
        self.projection = nn.Linear(hidden, width) if width is not None else None
        self.pooling = pooling
        self.trainable = trainable
        self.out_features = width if width is not None else hidden
        # DeBERTa builds its own mask from the 2-D one without a data-dependent branch; the rest go through
        # transformers' masking utilities, which return a prepared 4-D mask as it is
        self._mask_2d = str(getattr(config, "model_type", "")).startswith("deberta")

    def _attention_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        if self._mask_2d:
            return mask
        return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min

    def forward(self, x: Tensor) -> Tensor:
        """x int64 [N, 2, L] (ids, attention mask) -> pooled features [N, out_features]."""
        ids, mask = x[:, 0], x[:, 1]
        dtype = self.encoder.get_input_embeddings().weight.dtype
        hidden = self.encoder(input_ids=ids, attention_mask=self._attention_mask(mask, dtype)).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.projection(pooled) if self.projection is not None else pooled

