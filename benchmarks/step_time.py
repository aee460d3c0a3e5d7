"""Training step time with a cross-tokenizer source vs an equal-size same-tokenizer source (issue 11, item 8).

Three fits of the same target on the same blocks, each with one frozen source of the same architecture and
vocabulary size:

- ``same``: the source shares the target's tokenizer (no alignment);
- ``cross``: the source has its own tokenizer; its alignment runs in the DataLoader (``AlignCollate``, one worker);
- ``cross, inline``: the same source aligned inside the training step (the behaviour before: the accelerator waits).

Rounds are interleaved (same, cross, inline, same, ...); the step time is measured by a callback from
``on_train_batch_start`` to ``on_train_batch_end`` plus the wait for the next batch, i.e. the wall time between
two batch starts, warm-up steps excluded. Tokenizers (byte-level target, metaspace source, 2000 tokens each) are
trained on Python stdlib sources: nothing is downloaded.

    python benchmarks/step_time.py                       # ~4 min on 2 CPU cores
    python benchmarks/step_time.py --device cuda --length 2048 --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_fuse import FusionModule, SourceSpec, TextDataModule
from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer


def _llama(vocab: int, hidden: int, layers: int, positions: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=positions, tie_word_embeddings=True,
    ))


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][self.warmup:]


def _fit(target: str, spec: SourceSpec, data: str, args, inline: bool) -> list[float]:
    module = FusionModule(target=target, sources=[spec], strategy="uniform", alignment_cache_dir=None,
                          learning_rate=1e-4)
    dm = TextDataModule(data, block_size=args.length, batch_size=args.batch, num_workers=1, val_fraction=0.05)
    if inline:  # the previous behaviour: no alignment in the DataLoader, the step aligns
        dm._collate = lambda: None
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(max_steps=args.warmup + args.steps + 1, accelerator=args.device, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, dm)
    return timer.times()


def _table(times: dict[str, list[float]], what: str, unit: str) -> None:
    """Markdown table: median and quartiles of each row's times, and its median relative to the ``same`` row."""
    print(f"| {what} | {unit} | p25-p75 | vs same |")
    print("|---|---|---|---|")
    base = statistics.median(times["same"])
    for name, t in times.items():
        q = statistics.quantiles(t, n=4)
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} | {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} | "
              f"{statistics.median(t) / base - 1:+.1%} |", flush=True)


def _forward_only(folders: dict[str, str], tgt_tok, src_tok, blocks, args) -> None:
    """The source forward alone (output reduction included), interleaved rounds: same-tokenizer, cross-tokenizer
    with the alignment given (as from the DataLoader), cross-tokenizer aligning in the call."""
    from lightning_fuse.sources import FrozenSource, SourceSpec, load_causal_lm

    dev = torch.device(args.device)
    same = FrozenSource(SourceSpec("same", folders["same"]), load_causal_lm(folders["same"], "same"), tgt_tok, False)
    cross = FrozenSource(SourceSpec("cross", folders["cross"]), load_causal_lm(folders["cross"], "cross"), src_tok,
                         False)
    same.to(dev), cross.to(dev)
    cross.attach_aligner(tgt_tok)
    ids = blocks.to(dev)
    mask = torch.ones_like(ids)
    aligned = cross.aligner.align_batch(blocks).as_dict()
    runs = {
        "same": lambda: same.forward(ids, mask, ids, 10, len(tgt_tok)),
        "cross, aligned by the DataLoader": lambda: cross.forward(ids, mask, ids, 10, len(tgt_tok), aligned),
        "cross, aligned in the call": lambda: cross.forward(ids, mask, ids, 10, len(tgt_tok)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            fn()
            for _ in range(args.steps):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    _table(times, "source forward", "median ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source-style", default="byte_level", choices=["byte_level", "metaspace"])
    parser.add_argument("--forward-only", action="store_true", help="only time the source forward passes")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    pl.seed_everything(0, verbose=False)
    root = Path(tempfile.mkdtemp(prefix="step_time_"))
    train = stdlib_texts(1_500_000)
    tgt_tok = train_bpe_tokenizer(train, args.vocab, "byte_level")
    # another tokenizer of the same kind and size, trained on other text: other merges, a similar token count, so
    # the difference in step time is the alignment's, not a longer source sequence (--source-style metaspace:
    # SentencePiece style, which cuts Python indentation into more tokens)
    other = stdlib_texts(1_500_000, skip_chars=6_000_000) if args.source_style == "byte_level" else train
    src_tok = train_bpe_tokenizer(other, args.vocab, args.source_style)
    data = root / "data"
    data.mkdir()
    (data / "code.txt").write_text("\n".join(stdlib_texts(4 * args.batch * args.length * 60, skip_chars=2_000_000)))
    folders = {}
    for name, tok, seed in (("target", tgt_tok, 0), ("same", tgt_tok, 1), ("cross", src_tok, 1)):
        model = _llama(len(tok), args.hidden, args.layers, 2 * args.length + 8, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders[name] = str(root / name)
    configs = {
        "same": (SourceSpec("src", folders["same"]), False),
        "cross": (SourceSpec("src", folders["cross"]), False),
        "cross, inline": (SourceSpec("src", folders["cross"]), True),
    }
    sample = "\n".join(stdlib_texts(200_000, skip_chars=2_000_000))
    ratio = len(src_tok(sample)["input_ids"]) / len(tgt_tok(sample)["input_ids"])
    print(f"source tokens per target token on the data: {ratio:.3f}")
    from lightning_fuse.alignment import TokenAligner
    from lightning_fuse.data import pack

    aligner = TokenAligner(src_tok, tgt_tok, progress=False)
    blocks = pack([sample], tgt_tok, args.length)[: args.batch]
    aligner.align_batch(blocks)
    t0 = time.perf_counter()
    for _ in range(5):
        aligner.align_batch(blocks)
    align_ms = (time.perf_counter() - t0) / 5 * 1e3
    print(f"align_batch of one {args.batch} x {args.length} batch: {align_ms:.1f} ms (now in the DataLoader)")
    _forward_only(folders, tgt_tok, src_tok, blocks, args)
    if args.forward_only:
        return
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, (spec, inline) in configs.items():
            t = _fit(folders["target"], spec, str(data), args, inline)
            times[name] += t
            print(f"round {r}: {name:14s} median {statistics.median(t) * 1e3:7.1f} ms/step", flush=True)
    print(f"\nB={args.batch} L={args.length} hidden={args.hidden} layers={args.layers} vocab={args.vocab} on "
          f"{args.device}, 1 DataLoader worker, {args.rounds} interleaved rounds x {args.steps} steps")
    _table(times, "source", "median ms/step")



if __name__ == "__main__":
    main()
