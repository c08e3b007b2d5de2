"""Offline fixtures for model=hf and benchmark=text: a tiny BERT-like encoder built from a config, a WordPiece
tokenizer trained on the fixture text, both saved with save_pretrained into a directory that is then loaded
through `model.name_or_path` exactly as a user's model; and text data in the real on-disk formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

# a few topics, each with its own words, so that the classes are learnable and the tokenizer has a vocabulary
TOPICS = {
    "sport": "match goal team player score coach league season win ball",
    "weather": "rain snow wind storm cloud sunny forecast cold warm fog",
    "finance": "stock market price bank trade profit loss share fund rate",
    "food": "bread cheese soup salad pasta spice sugar bake cook taste",
    "music": "song guitar drum concert album band melody rhythm piano tune",
    "travel": "flight train hotel ticket beach map tour road airport trip",
    "science": "atom cell gene energy light orbit theory data lab test",
    "health": "doctor nurse fever pain sleep diet heart blood clinic cure",
    "film": "actor scene movie camera script studio drama comedy screen star",
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]", "[unused2]", "[unused3]"]


def sentences(topic: str, count: int, seed: int) -> list[str]:
    """`count` short sentences of a topic's words (seeded), some longer than a small max_length (truncation)."""
    rng = random.Random(f"{topic}/{seed}")
    words = TOPICS[topic].split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(count)]


def write_jsonl_splits(root: Path, per_class: int = 8, splits: dict[str, list[str]] | None = None) -> Path:
    """<root>/{train,val,test}.jsonl with disjoint topics per split."""
    splits = splits or {"train": ["sport", "weather", "finance"], "val": ["food", "music", "travel"],
                        "test": ["science", "health", "film"]}
    root.mkdir(parents=True, exist_ok=True)
    for split, topics in splits.items():
        lines = [json.dumps({"text": text, "label": topic}) for topic in topics
                 for text in sentences(topic, per_class, 0)]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_bao_file(root: Path, per_class: int = 8) -> Path:
    """One JSON-lines file in Bao et al.'s form: integer labels, the text as a list of tokens."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"label": i, "text": text.split(), "raw": text})
             for i, topic in enumerate(TOPICS) for text in sentences(topic, per_class, 1)]
    (root / "tiny.json").write_text("\n".join(lines) + "\n")
    return root / "tiny.json"


def write_fewrel(root: Path, relations: list[str], name: str, per_class: int = 7) -> Path:
    """A FewRel-format file: relation -> instances with tokens and head/tail entity positions."""
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for r, topic in enumerate(relations):
        items = []
        for text in sentences(topic, per_class, 2):
            tokens = text.split() + ["and", "more"]
            items.append({"tokens": tokens, "h": [tokens[0], f"Q{r}", [[0]]],
                          "t": [" ".join(tokens[-2:]), f"Q{r + 100}", [[len(tokens) - 2, len(tokens) - 1]]]})
        data[f"P{r}"] = items
    (root / name).write_text(json.dumps(data))
    return root / name


def all_text() -> list[str]:
    return [text for topic in TOPICS for text in sentences(topic, 20, 0)] + ["and more"]


def save_tiny_model(directory: Path, *, hidden: int = 32, layers: int = 2, vocab_extra: int = 0,
                    dropout: float = 0.0, positions: int = 64, seed: int = 0, whole_words: bool = True) -> Path:
    """A tiny BERT (config only, random weights) and a WordPiece tokenizer of the fixture text's vocabulary,
    saved side by side with save_pretrained. whole_words=False: characters only (another tokenizer);
    `vocab_extra` < 0 makes the model's vocabulary smaller than the tokenizer's (a mismatch)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    # WordPiece's trainer picks among merges of equal frequency in hash-map order, so two trainings on the same
    # text give different vocabularies (measured, tokenizers 0.23): the vocabulary is the fixture text's own
    # characters, their "##" continuations and (whole_words) its words, sorted, the same in every run
    words = sorted({w for text in all_text() for w in text.split()})
    chars = sorted({c for w in words for c in w})
    vocab = [*SPECIAL, *chars, *(f"##{c}" for c in chars), *(words if whole_words else [])]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   additional_special_tokens=SPECIAL[5:])
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    config = BertConfig(vocab_size=len(fast) + vocab_extra, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    return directory
