"""Token alignment speed and exact-alignment rate: FuseLLM's full DTW vs `TokenAligner`'s byte-span merge.

Two tokenizers are trained here on Python stdlib sources (no download): a SentencePiece-like BPE target
('▁', byte fallback, vocab 3000, as Llama-2 in FuseLLM) and a GPT-2-like byte-level BPE source ('Ġ', vocab 2000,
as MPT/GPT-NeoX). Held-out stdlib text is tokenised by the target and cut into blocks (cuts may fall inside a
multibyte character, as in real packed data).

    python benchmarks/alignment.py                 # about 3 minutes on 2 CPU cores
    python benchmarks/alignment.py --vocab-50k     # + vocabulary maps between two 50k vocabularies
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_fuse.alignment import (
    DROPPED,
    MIN_ED,
    TokenAligner,
    alignment_rate,
    build_vocab_map,
    normalize_token,
)
from lightning_fuse.alignment.vocab_map import MAX_DISTANCE, nearest_strings
from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer


def _blocks(ids: list[int], length: int, max_tokens: int) -> torch.Tensor:
    n = min(len(ids) // length, max(1, max_tokens // length))
    return torch.tensor(ids[: n * length]).view(n, length)


def dtw_tokens_per_s(aligner: TokenAligner, ids: list[int], length: int, max_tokens: int) -> dict:
    """FuseLLM's full DTW (``align(method="dtw")``, one block at a time) on blocks of ``ids``: target tokens/s and
    exact-alignment rate, plus the fast method's rate on the same blocks."""
    blocks = _blocks(ids, length, max_tokens)
    t0 = time.perf_counter()
    dtw_pos = [aligner.align(b.tolist(), method="dtw").src_pos for b in blocks]
    dt = time.perf_counter() - t0
    fast = aligner.align_batch(blocks)
    return {"blocks": len(blocks), "tokens_per_s": blocks.numel() / dt, "rate": alignment_rate(dtw_pos),
            "fast_rate": alignment_rate(fast.src_pos)}


def fast_tokens_per_s(aligner: TokenAligner, ids: list[int], length: int, max_tokens: int) -> dict:
    """``TokenAligner.align_batch`` (byte spans) on blocks of ``ids``: target tokens/s and exact-alignment rate."""
    blocks = _blocks(ids, length, max_tokens)
    aligner.align_batch(blocks[:2])  # warm-up
    t0 = time.perf_counter()
    fast = aligner.align_batch(blocks)
    dt = time.perf_counter() - t0
    return {"blocks": len(blocks), "tokens_per_s": blocks.numel() / dt, "rate": alignment_rate(fast.src_pos)}


def _time_vocab_map(src, tgt, label: str) -> None:
    t0 = time.perf_counter()
    exact = build_vocab_map(src, tgt, mode="exact")
    t_exact = time.perf_counter() - t0
    print(
        f"| {label} | exact | - | {t_exact:.2f} | {(exact >= 0).float().mean().item():.1%} of source ids matched |"
    )
    for cutoff in (MAX_DISTANCE, 1.0):
        t0 = time.perf_counter()
        vmap, kind = build_vocab_map(src, tgt, mode="min_ed", max_distance=cutoff, with_kind=True, progress=False)
        dt = time.perf_counter() - t0
        print(f"| {label} | min_ed | {cutoff} | {dt:.2f} | {int((exact < 0).sum())} source ids searched, "
              f"{float((kind == MIN_ED).float().mean()):.1%} mapped by edit distance, "
              f"{float((kind == DROPPED).float().mean()):.1%} unmapped |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-chars", type=int, default=3_000_000, help="stdlib characters to train on")
    parser.add_argument("--eval-tokens", type=int, default=131_072, help="held-out target tokens per length")
    parser.add_argument("--dtw-tokens", type=int, default=4096, help="held-out target tokens for the DTW")
    parser.add_argument("--vocab-50k", action="store_true", help="also time 50k x 50k vocabulary maps")
    args = parser.parse_args()
    torch.set_num_threads(2)

    t0 = time.perf_counter()
    train = stdlib_texts(args.train_chars)
    tgt_tok = train_bpe_tokenizer(train, 3000, "metaspace")
    src_tok = train_bpe_tokenizer(train, 2000, "byte_level")
    print(f"trained tokenizers on {sum(map(len, train)):,} chars in {time.perf_counter() - t0:.1f}s")
    heldout = "".join(stdlib_texts(4 * args.eval_tokens * 4, skip_chars=args.train_chars + 1))
    ids = tgt_tok(heldout, add_special_tokens=False)["input_ids"]
    print(f"held-out text: {len(heldout):,} chars, {len(ids):,} target tokens\n")

    aligner = TokenAligner(src_tok, tgt_tok, mode="min_ed")
    print("| method | block length | blocks | target tokens/s | exact-alignment rate |")
    print("|---|---|---|---|---|")
    for length in (256, 1024, 4096):
        if length <= 1024:
            blocks = _blocks(ids, length, args.dtw_tokens)
            t0 = time.perf_counter()
            dtw_pos = [aligner.align(b.tolist(), method="dtw").src_pos for b in blocks]
            dt = time.perf_counter() - t0
            print(
                f"| full DTW | {length} | {len(blocks)} | {blocks.numel() / dt:,.0f} | {alignment_rate(dtw_pos):.3f} |"
            )
            fast = aligner.align_batch(blocks)
            print(
                f"| fast, same blocks | {length} | {len(blocks)} | - | {alignment_rate(fast.src_pos):.3f} |"
            )
        blocks = _blocks(ids, length, args.eval_tokens)
        aligner.align_batch(blocks[:2])  # warm-up
        t0 = time.perf_counter()
        fast = aligner.align_batch(blocks)
        dt = time.perf_counter() - t0
        print(
            f"| fast (align_batch) | {length} | {len(blocks)} | {blocks.numel() / dt:,.0f} | "
            f"{alignment_rate(fast.src_pos):.3f} |"
        )
        t0 = time.perf_counter()
        for b in blocks[:16]:
            aligner.align(b.tolist())
        dt = time.perf_counter() - t0
        print(
            f"| fast (align, one block) | {length} | {min(16, len(blocks))} | "
            f"{blocks[:16].numel() / dt:,.0f} | - |"
        )
    reverse = TokenAligner(tgt_tok, src_tok, mode="exact")
    src_ids = src_tok(heldout, add_special_tokens=False)["input_ids"]
    rb = _blocks(src_ids, 1024, args.eval_tokens)
    print(
        f"| fast, reverse direction (byte-level target) | 1024 | {len(rb)} | - | "
        f"{alignment_rate(reverse.align_batch(rb).src_pos):.3f} |"
    )

    print("\n| vocabularies (source -> target) | mode | min_ed cutoff | build time (s) | note |")
    print("|---|---|---|---|---|")
    _time_vocab_map(src_tok, tgt_tok, "2000 byte-level -> 3000 metaspace")
    if args.vocab_50k:
        t0 = time.perf_counter()
        big = stdlib_texts(30_000_000)
        half = len(big) // 2
        tgt50 = train_bpe_tokenizer(big[:half], 50_000, "metaspace")
        src50 = train_bpe_tokenizer(big[half:], 50_000, "byte_level")
        print(
            f"| (trained two 50k tokenizers on disjoint halves of 30M chars in {time.perf_counter() - t0:.0f}s) |"
            " | | | |"
        )
        _time_vocab_map(src50, tgt50, "50k byte-level -> 50k metaspace")
        # worst case: no exact match at all, every source string searched against every target string
        src_norm = [normalize_token(t, kind="byte_level") for t in src50.get_vocab()]
        tgt_norm = sorted({normalize_token(t, kind="metaspace") for t in tgt50.get_vocab()})
        for cutoff in (MAX_DISTANCE, 1.0):
            t0 = time.perf_counter()
            nearest_strings(src_norm, tgt_norm, cutoff)
            print(
                f"| 50k -> 50k, all {len(src_norm)} searched (no exact shortcut) | min_ed | {cutoff} | "
                f"{time.perf_counter() - t0:.2f} | worst case |"
            )


if __name__ == "__main__":
    main()
