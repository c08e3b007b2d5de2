"""Text meta-learning figures: episodes/s of ProtoNet and of MAML over LoRA on a tiny encoder, the tokenised
store's build time and size for a generated corpus, and peak memory of MAML over LoRA against MAML over every
parameter of the same model.

    python scripts/bench_text.py                          # all three, the tests' tiny BERT (hidden 32, 2 layers)
    python scripts/bench_text.py --hidden 128 --layers 4  # a bigger random encoder
    python scripts/bench_text.py --model /path/to/bert    # a real pretrained encoder (a local directory)
    python scripts/bench_text.py --tables store --lines 100000

No pretrained weights or real text datasets are needed (none can be had offline): the encoder is built from a
config with random weights and its WordPiece tokenizer from the generated text (tests/hf_fixtures.py), so the
figures are speeds and sizes, never accuracies. Timing is only meaningful on an idle machine: say so beside them.
Peak memory is measured in a fresh subprocess per variant (growth of peak RSS over the set-up, as
scripts/bench.py does), two meta-iterations each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from metarun.algorithms.maml import MAML  # noqa: E402
from metarun.algorithms.protonet import ProtoNet  # noqa: E402
from metarun.benchmarks.text import TextBenchmark  # noqa: E402
from metarun.models.hf import HFEncoder  # noqa: E402
from metarun.runtime import configure_runtime  # noqa: E402
from tests.hf_fixtures import TOPICS, save_tiny_model, write_jsonl_splits  # noqa: E402


def setup_model(args: argparse.Namespace, work: Path) -> Path:
    if args.model:
        return Path(args.model)
    return save_tiny_model(work / "encoder", hidden=args.hidden, layers=args.layers, positions=max(64, args.length))


def setup_benchmark(model: Path, args: argparse.Namespace, work: Path) -> TextBenchmark:
    root = write_jsonl_splits(work / "episodes", per_class=40,
                              splits={"train": list(TOPICS)[:5], "val": list(TOPICS)[4:], "test": list(TOPICS)[4:]})
    return TextBenchmark(root=str(root), ways=5, shots=args.shots, queries=args.queries, tokenizer=str(model),
                         max_length=args.length, cache_dir=str(work / "cache"))


def make_algorithm(name: str, model: Path, bench: TextBenchmark, args: argparse.Namespace) -> torch.nn.Module:
    trainable = {"protonet": args.protonet_trainable, "maml_lora": "lora", "maml_all": "all"}[name]
    backbone = HFEncoder(bench.spec.input_shape, name_or_path=str(model), max_length=args.length, trainable=trainable)
    if name == "protonet":
        return ProtoNet(backbone, bench.spec)
    return MAML(backbone, bench.spec, inner_steps=1, inner_lr=0.01)


def iteration_of(algorithm: torch.nn.Module, bench: TextBenchmark, tasks: int) -> Callable[[], None]:
    """One training step's work: sample, meta-loss, backward (the optimizer step is the trainer's, not measured)."""
    generator = torch.Generator().manual_seed(0)
    algorithm.train()

    def iteration() -> None:
        batch = bench.sample("train", tasks, generator)
        loss, _ = algorithm.meta_loss(batch)
        loss.backward()
        algorithm.zero_grad(set_to_none=True)

    return iteration


def rate(iteration: Callable[[], None], seconds: float) -> float:
    iteration()  # warm-up
    count, start = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - start < seconds:
        iteration()
        count += 1
    return count / (time.perf_counter() - start)


def rates_table(args: argparse.Namespace, work: Path) -> None:
    model = setup_model(args, work)
    bench = setup_benchmark(model, args, work)
    names = ["protonet", "maml_lora"]
    iterations = {n: iteration_of(make_algorithm(n, model, bench, args), bench, args.tasks) for n in names}
    runs: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):  # interleaved, so a change of machine load hits both
        for n in names:
            runs[n].append(rate(iterations[n], args.seconds) * args.tasks)
    print(f"\nepisodes/s (5-way {args.shots}-shot, {args.queries} queries, {args.length} tokens, {args.tasks} tasks a "
          f"step, median of {args.rounds}; {torch.get_num_threads()} thread(s)):")
    for n in names:
        label = {"protonet": f"ProtoNet (trainable={args.protonet_trainable})",
                 "maml_lora": "MAML over LoRA, second order, 1 inner step"}[n]
        print(f"  {label:48s} {statistics.median(runs[n]):9.1f}   runs: {', '.join(f'{r:.1f}' for r in runs[n])}")


def write_corpus(path: Path, lines: int, classes: int, seed: int = 0) -> None:
    """`lines` JSON lines of 5-40 words drawn from a 5,000-word vocabulary, labels round robin."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "zu", "ri", "no", "ba", "te"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    with path.open("w") as f:
        for i in range(lines):
            words = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(5, 40)))
            f.write(json.dumps({"text": words, "label": f"c{i % classes}"}) + "\n")


def corpus_tokenizer(files: list[Path], directory: Path, vocab_size: int = 30522) -> Path:
    """A BERT-sized WordPiece tokenizer trained on the corpus (a user's tokenizer knows its language's words)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train([str(f) for f in files], trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                              ("[SEP]", sep)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(directory)
    return directory


def store_table(args: argparse.Namespace, work: Path) -> None:
    data = work / "corpus"
    data.mkdir(parents=True)
    classes = 60
    per_split = {"train": args.lines * 3 // 5, "val": args.lines // 5}
    per_split["test"] = args.lines - per_split["train"] - per_split["val"]
    for i, (split, lines) in enumerate(per_split.items()):
        write_corpus(data / f"{split}.jsonl", lines, classes // 3, seed=i)
    model = Path(args.model) if args.model else corpus_tokenizer(sorted(data.glob("*.jsonl")), work / "tokenizer")
    cache = work / "store-cache"
    started = time.perf_counter()
    bench = TextBenchmark(root=str(data), tokenizer=str(model), max_length=args.store_length, cache_dir=str(cache))
    cold = time.perf_counter() - started
    started = time.perf_counter()
    TextBenchmark(root=str(data), tokenizer=str(model), max_length=args.store_length, cache_dir=str(cache))
    warm = time.perf_counter() - started
    file = next(cache.glob("text-*.pt"))
    store = bench.sampler.store
    corpus_bytes = sum(p.stat().st_size for p in data.glob("*.jsonl"))
    print(f"\ntokenised store, {args.lines:,} lines ({corpus_bytes / 2**20:.1f} MiB of JSON lines), "
          f"{args.store_length} tokens, {len(bench.sampler.names)} classes, "
          f"tokenizer of {bench.spec.input_shape.vocab_size:,} tokens:")
    print(f"  build (read, tokenise, save): {cold:.1f} s; load from cache: {warm:.2f} s")
    print(f"  store {tuple(store.shape)} {store.dtype}: {file.stat().st_size / 2**20:.1f} MiB on disk")


def memory_table(args: argparse.Namespace) -> None:
    peaks = {}
    for variant in ("maml_lora", "maml_all"):
        command = [sys.executable, __file__, "--probe-memory", variant, "--hidden", str(args.hidden), "--layers",
                   str(args.layers), "--length", str(args.length), "--tasks", str(args.tasks), "--shots",
                   str(args.shots), "--queries", str(args.queries), "--threads", str(args.threads),
                   *(["--model", args.model] if args.model else [])]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        peaks[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\npeak memory of two MAML meta-iterations (second order, 1 inner step, {args.tasks} tasks; growth of peak "
          f"RSS in a fresh process):")
    for variant, label in (("maml_lora", "over LoRA (encoder frozen)"), ("maml_all", "over every parameter")):
        p = peaks[variant]
        print(f"  {label:28s} {p['peak_bytes'] / 2**20:8.1f} MiB   adapted parameters: {p['adapted']:,}")
    print(f"  ratio all / LoRA: {peaks['maml_all']['peak_bytes'] / max(peaks['maml_lora']['peak_bytes'], 1):.2f}")


def probe_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = setup_model(args, work)
        bench = setup_benchmark(model, args, work)
        algorithm = make_algorithm(args.probe_memory, model, bench, args)
        iteration = iteration_of(algorithm, bench, args.tasks)
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
        iteration(), iteration()
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        adapted = sum(p.numel() for p in algorithm.parameters())
        print(json.dumps({"peak_bytes": peak - before, "adapted": adapted}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="rates,store,memory", help="comma-separated: rates, store, memory")
    parser.add_argument("--model", default=None,
                        help="a local pretrained encoder directory (default: a tiny random BERT)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=32, help="tokens per text in the episodes")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=25)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-iteration")
    parser.add_argument("--protonet-trainable", default="all", choices=["all", "lora", "head", "none"])
    parser.add_argument("--seconds", type=float, default=5.0, help="per timed run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=100_000, help="store table: corpus lines")
    parser.add_argument("--store-length", type=int, default=128, help="store table: tokens per text")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_runtime(args.threads)
    if args.probe_memory:
        probe_memory(args)
        return
    tables = set(args.tables.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if "rates" in tables:
            rates_table(args, Path(tmp) / "rates")
        if "store" in tables:
            store_table(args, Path(tmp) / "store")
    if "memory" in tables:
        memory_table(args)


if __name__ == "__main__":
    main()
