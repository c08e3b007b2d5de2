"""Few-shot text classification (`benchmark=text`): N-way K-shot episodes of tokenised texts.

The texts (benchmarks/text_source.py: JSON lines per split, Bao et al. 2020's one file with class lists, FewRel)
are tokenised once with the model's fast tokenizer into an int store, cached on disk (benchmarks/store.py) under
a key of the tokenizer's full definition, the maximum length and the files' listing. The store is [texts, L]
int16 (int32 for vocabularies past 32,767 tokens) holding the token ids where the attention mask is 1 and -1
where it is 0: ids and mask in one tensor, exactly. Each split's classes are contiguous and each class's texts
too, so an episode is index arithmetic, as EpisodeSampler does for images (benchmarks/sampler.py), but over
classes of unequal sizes: classes are the top-N of T x C uniform numbers, a class's examples the top-(K+Q) of
uniform numbers over its own count (the rest masked out). Inputs are int64 [T, S, 2, L] (ids, mask).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metarun.benchmarks.base import SPLITS, Benchmark, TaskSpec, check_positive
from metarun.benchmarks.store import cached_store
from metarun.benchmarks.text_source import TextSource, read_source
from metarun.defaults import option_defaults
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.base import TokenShape

TOKENISE_CHUNK = 4096  # texts per call of the fast tokenizer: bounded memory, the batch API's speed


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of everything that decides the ids: the fast tokenizer's full JSON definition and its class."""
    definition = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{definition}".encode()).hexdigest()[:20]


def tokenise(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tensor:
    """[len(texts), max_length] ids where the attention mask is 1, -1 where it is 0 (int16 or int32)."""
    dtype = torch.int16 if len(tokenizer) <= torch.iinfo(torch.int16).max else torch.int32
    out = torch.empty(len(texts), max_length, dtype=dtype)
    for start in range(0, len(texts), TOKENISE_CHUNK):
        part = list(texts[start:start + TOKENISE_CHUNK])
        encoded = tokenizer(part, padding="max_length", truncation=True, max_length=max_length,
                            return_attention_mask=True, return_tensors="pt")
        ids = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -1)
        out[start:start + len(part)] = ids.to(dtype)
    return out


def build_store(source: TextSource, tokenizer: Any, max_length: int) -> tuple[Tensor, dict[str, Any]]:
    """The store and its meta (class names, first row and count of each class, each split's class range)."""
    texts: list[str] = []
    names, starts, counts, ranges = [], [], [], {}
    for split in SPLITS:
        first = len(names)
        for label, items in source.splits[split].items():
            names.append(label)
            starts.append(len(texts))
            counts.append(len(items))
            texts.extend(items)
        ranges[split] = [first, len(names)]
    store = tokenise(tokenizer, texts, max_length)
    return store, {"classes": names, "starts": starts, "counts": counts, "ranges": ranges}


class TokenEpisodeSampler:
    """TaskBatches of int64 [T, N*K, 2, L] (ids, attention mask) from the token store; labels class-major."""

    def __init__(self, store: Tensor, starts: Tensor, counts: Tensor, ranges: dict[str, tuple[int, int]],
                 pad_id: int, names: Sequence[str], name: str = "text") -> None:
        self.store = store
        self.starts, self.counts = starts.long(), counts.long()
        self.ranges = dict(ranges)
        self.pad_id = pad_id
        self.names = list(names)
        self.name = name
        self._checked: set[tuple[str, int, int, int]] = set()

    def check(self, split: str, ways: int, shots: int, queries: int, prefix: str = "benchmark.") -> None:
        """Refuse a shape the split cannot give: too many ways, or a class with fewer texts than shots + queries
        (named, with its count), in one line each."""
        key = (split, ways, shots, queries)
        if key in self._checked:
            return
        start, stop = self.ranges[split]
        if ways > stop - start:
            raise UserInputError(f"{prefix}ways={ways} but the {split} split of {self.name} has only {stop - start} "
                                 f"classes; use {prefix}ways <= {stop - start}")
        need = shots + queries
        for c in range(start, stop):
            if int(self.counts[c]) < need:
                raise UserInputError(f"label '{self.names[c]}' of the {split} split of {self.name} has "
                                     f"{int(self.counts[c])} examples but {prefix}shots + {prefix}queries = "
                                     f"{shots} + {queries} = {need}; lower shots or queries, or drop that label")
        self._checked.add(key)

    def to(self, device: torch.device | str) -> "TokenEpisodeSampler":
        self.store = self.store.to(device)
        return self

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, ways: int, shots: int,
               queries: int) -> TaskBatch:
        if split not in self.ranges:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.ranges)}")
        self.check(split, ways, shots, queries, "episode ")
        t, n, k, q = num_tasks, ways, shots, queries
        start, stop = self.ranges[split]
        draw = generator.device
        classes = torch.rand(t, stop - start, generator=generator, device=draw).topk(n, dim=1).indices + start
        counts = self.counts.to(draw)[classes]  # [T, N]
        most = int(self.counts[start:stop].max())
        scores = torch.rand(t, n, most, generator=generator, device=draw)
        scores = scores.masked_fill(torch.arange(most, device=draw) >= counts.unsqueeze(-1), -1.0)
        picks = scores.topk(k + q, dim=2).indices  # [T, N, K+Q]: distinct examples within each class's count
        rows = picks + self.starts.to(draw)[classes].unsqueeze(-1)
        index = torch.cat((rows[:, :, :k].reshape(-1), rows[:, :, k:].reshape(-1))).to(self.store.device)
        tokens = self.store.index_select(0, index).long()
        mask = tokens >= 0
        x = torch.stack((tokens.masked_fill(~mask, self.pad_id), mask.long()), dim=1)  # [M, 2, L]
        labels = torch.arange(n, device=self.store.device)
        support_y = labels.repeat_interleave(k).repeat(t, 1)
        query_y = labels.repeat_interleave(q).repeat(t, 1)
        length = x.shape[-1]
        return TaskBatch(x[: t * n * k].view(t, n * k, 2, length), support_y,
                         x[t * n * k:].view(t, n * q, 2, length), query_y)


_DEFAULTS = option_defaults("benchmark", "text")


class TextBenchmark(Benchmark):
    """Constructor parameters are the `benchmark.*` keys of configs/benchmark/text.yaml."""

    def __init__(
        self,
        root: str = _DEFAULTS["root"],
        ways: int = _DEFAULTS["ways"],
        shots: int = _DEFAULTS["shots"],
        queries: int = _DEFAULTS["queries"],
        format: str = _DEFAULTS["format"],
        file: str | None = _DEFAULTS["file"],
        files: Mapping[str, Any] | None = _DEFAULTS["files"],
        classes: Any = _DEFAULTS["classes"],
        entity_markers: Sequence[str] = _DEFAULTS["entity_markers"],
        tokenizer: str | None = _DEFAULTS["tokenizer"],
        max_length: int | None = _DEFAULTS["max_length"],
        cache_dir: str | None = _DEFAULTS["cache_dir"],
    ) -> None:
        from metarun.console import console
        from metarun.models.hf import load_tokenizer

        if max_length is None:
            raise UserInputError("benchmark.max_length is not set: it follows model.max_length with model=hf")
        check_positive(ways=ways, shots=shots, queries=queries, max_length=max_length)
        if not tokenizer:
            raise UserInputError("benchmark=text tokenises with the model's tokenizer: use model=hf "
                                 "model.name_or_path=<model directory or cached id> (or set benchmark.tokenizer)")
        started = time.perf_counter()
        source = read_source(root, format, file, files, classes, tuple(entity_markers))
        tok = load_tokenizer(tokenizer, "model.name_or_path / benchmark.tokenizer")
        if tok.pad_token_id is None:
            raise UserInputError(f"benchmark.tokenizer={tokenizer} has no padding token; metarun pads every text to "
                                 "benchmark.max_length")
        settings = {"tokenizer": tokenizer_identity(tok), "max_length": int(max_length), "format": format,
                    "markers": list(entity_markers) if format == "fewrel" else None,
                    "splits": {s: list(source.splits[s]) for s in SPLITS}}
        store, meta, cache_file, hit = cached_store("text", source.listing(), settings,
                                                    lambda: build_store(source, tok, int(max_length)), cache_dir)
        ranges = {s: (int(a), int(b)) for s, (a, b) in meta["ranges"].items()}
        self.sampler = TokenEpisodeSampler(store, torch.tensor(meta["starts"]), torch.tensor(meta["counts"]), ranges,
                                           int(tok.pad_token_id), meta["classes"], name=f"benchmark=text ({root})")
        for split in SPLITS:
            self.sampler.check(split, ways, shots, queries)
        self.tokenizer, self.max_length, self.pad_id = tok, int(max_length), int(tok.pad_token_id)
        self.spec = TaskSpec(name="text", kind="classification", input_shape=TokenShape(int(max_length), len(tok)),
                             output_size=ways, ways=ways, shots=shots, queries=queries)
        self.ways, self.shots, self.queries = ways, shots, queries
        counts = "/".join(str(ranges[s][1] - ranges[s][0]) for s in SPLITS)
        how = "loaded from cache" if hit else f"tokenised {store.shape[0]} texts, cached"
        console.print(f"{source.description}: {counts} train/val/test classes, {max_length} tokens; {how} "
                      f"{cache_file} ({time.perf_counter() - started:.1f} s)", highlight=False, soft_wrap=True)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator, *, ways: int | None = None,
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        return self.sampler.sample(split, num_tasks, generator, ways or self.ways, shots or self.shots,
                                   queries or self.queries)

    def load_inputs(self, paths: Sequence[Path]) -> Tensor:
        """UTF-8 .txt files, one example each, tokenised as the store was: int64 [N, 2, L] (ids, attention mask)."""
        texts = []
        for path in paths:
            if Path(path).suffix.lower() != ".txt":
                raise UserInputError(f"benchmark=text reads .txt files, one example each: {path} is not one")
            try:
                texts.append(Path(path).read_text(encoding="utf-8").strip())
            except (OSError, UnicodeDecodeError) as ex:
                raise UserInputError(f"cannot read text file {path}: {str(ex).splitlines()[0]}") from None
        tokens = tokenise(self.tokenizer, texts, self.max_length).long()
        mask = tokens >= 0
        return torch.stack((tokens.masked_fill(~mask, self.pad_id), mask.long()), dim=1)

    def to(self, device: torch.device | str) -> "TextBenchmark":
        self.sampler.to(device)
        return self
