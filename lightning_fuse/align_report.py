"""``lightning-fuse align-report``: how well each source's knowledge reaches the target, before any GPU hour is spent.

Per source, on blocks of real text tokenised by the target: the share of target positions that get the source's
own distribution (1:1 alignment), how its top-k probability mass maps onto the target vocabulary (exact string,
nearest string by edit distance, dropped to the "other" bucket), the worst edit-distance mappings by mass, and
its CE: on its own tokens, per target token (the comparable CE sources are ranked by), with and without its BOS,
and at the 1:1 positions before and after the distribution is carried over.

Example::

    lightning-fuse align-report --config configs/two_family.yaml
    lightning-fuse align-report --source pkg://gemma3-270m --target pkg://smollm2 --text notes.txt
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lightning_fuse.alignment.carry import carry_over, reduce_logits
from lightning_fuse.alignment.vocab_map import MIN_ED
from lightning_fuse.fusion import next_token_mask
from lightning_fuse.sources import FrozenSource, SourceSpec, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

__all__ = ["align_report", "format_report"]


@dataclass
class _Tally:
    positions: int = 0  # target gold positions
    aligned: int = 0  # of which 1:1
    nll_target: float = 0.0  # comparable: sum over covered positions of -gold_logprob
    covered: int = 0
    nll_no_bos: float = 0.0
    covered_no_bos: int = 0
    nll_own: float = 0.0  # over the source's own tokens
    own_tokens: int = 0
    bytes: int = 0  # of the covered gold tokens
    nll_1to1_own: float = 0.0  # at 1:1 positions: -log p(source's own token)
    nll_1to1_carried: float = 0.0  # at 1:1 positions: -log p(gold target token) under the carried distribution
    mass: dict[str, float] = field(default_factory=lambda: {"exact": 0.0, "min_ed": 0.0, "dropped": 0.0})
    by_id: torch.Tensor | None = None  # [V_src] top-k mass at 1:1 positions on ids mapped by edit distance


def align_report(
    config: str | list[str] | None = None,
    source: str | list[str] | None = None,
    target: str | None = None,
    text: str | None = None,
    alignment: Literal["exact", "min_ed"] = "min_ed",
    block_size: int = 256,
    max_blocks: int = 32,
    batch_size: int = 4,
    top_k: int = 10,
    worst: int = 8,
    device: str | None = None,
    cache_dir: str | None = "~/.cache/lightning_fuse/vocab_maps",
) -> list[dict[str, Any]]:
    """Report, per source, how its next-token distributions reach the target's positions and vocabulary.

    Args:
        config: a ``lightning-fuse fit`` YAML: its sources, target tokenizer and validation blocks.
        source: instead of ``--config``: a source model path (folder, hub id, ``pkg://...``; a ``.gguf`` file
            path is read as its folder + ``gguf_file``), or a list of them (``--source '[a, b]'``).
        target: with ``--source``: the target's tokenizer (or model) path.
        text: with ``--source``: a UTF-8 text file, tokenised by the target and cut into blocks.
        alignment: with ``--source``: vocabulary map mode, ``min_ed`` or ``exact``.
        block_size: target tokens per block (``--source`` mode).
        max_blocks: blocks to evaluate.
        batch_size: blocks per source forward pass.
        top_k: ids kept per position (as ``model.distill_top_k``).
        worst: edit-distance mappings to list per source, by the top-k mass they carry.
        device: device the sources run on; default CUDA when available.
        cache_dir: where vocabulary maps are cached (None: no cache).

    Returns:
        One dict per source (the printed table's numbers).
    """
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target_tok, specs, blocks = _inputs(config, source, target, text, alignment, block_size, max_blocks)
    rows = []
    for spec in specs:
        src = FrozenSource.load(spec, dev)
        if tokenizer_fingerprint(src.tokenizer) != tokenizer_fingerprint(target_tok):
            src.attach_aligner(target_tok, cache_dir)
        rows.append(_report_source(src, target_tok, blocks, batch_size, top_k, worst, dev))
        del src
    print(format_report(rows), flush=True)
    return rows


def _inputs(config, source, target, text, alignment, block_size, max_blocks):
    if (config is None) == (source is None):
        raise ValueError("align-report: give either `--config FILE` or `--source PATH --target PATH --text FILE`.")
    if config is not None:
        from lightning_fuse.precompute import load_fit_config

        module, dm = load_fit_config(config)
        if not module.source_specs:
            raise ValueError(f"{config} declares no sources in `model.init_args.sources`: nothing to report.")
        dm.connect(module.tokenizer, module.max_seq_length)
        dm.setup("fit")
        return module.tokenizer, module.source_specs, dm.val_set.blocks[:max_blocks]
    if target is None or text is None:
        raise ValueError("align-report: `--source` needs `--target` (the target tokenizer) and `--text FILE`.")
    if not Path(text).is_file():
        raise FileNotFoundError(f"align-report: `--text` {text!r} is not a file. Pass a UTF-8 text file.")
    from lightning_fuse.data import pack, read_texts

    target_tok = load_tokenizer(target, "target tokenizer")
    texts = read_texts(Path(text)) if text.endswith(".jsonl") else [Path(text).read_text(encoding="utf-8")]
    blocks = pack(texts, target_tok, block_size)
    if len(blocks) == 0:
        raise ValueError(f"align-report: {text} holds fewer than --block_size {block_size} target tokens.")
    specs = []
    for i, path in enumerate([source] if isinstance(source, str) else source):
        gguf = None
        if path.endswith(".gguf"):
            path, gguf = os.path.dirname(path) or ".", os.path.basename(path)
        name = Path(path.rstrip("/")).name or f"source{i}"
        specs.append(SourceSpec(name if name not in {s.name for s in specs} else f"{name}-{i}", path,
                                gguf_file=gguf, alignment=alignment, load_in_8bit=False))
    return target_tok, specs, blocks[:max_blocks]


@torch.no_grad()
def _report_source(src: FrozenSource, target_tok, blocks, batch_size, top_k, worst, dev) -> dict[str, Any]:
    t = _Tally()
    aligner = src.aligner
    vocab = len(target_tok)
    bar = tqdm(total=blocks.numel(), desc=f"align-report {src.name}", unit="tok", unit_scale=True, dynamic_ncols=True)
    for b0 in range(0, len(blocks), batch_size):
        ids = blocks[b0 : b0 + batch_size].to(dev)
        labels, mask = ids, next_token_mask(ids)
        t.positions += int(mask.sum())
        if aligner is None:
            out = src.forward(ids, torch.ones_like(ids), labels, top_k, vocab)
            n = int(mask.sum())
            t.aligned += n
            t.nll_target += float(-(out.gold_logprob * mask).sum())
            t.covered += n
            t.nll_own += float(-(out.gold_logprob * mask).sum())
            t.own_tokens += n
            t.nll_1to1_own += float(-(out.gold_logprob * mask).sum())
            t.nll_1to1_carried += float(-(out.gold_logprob * mask).sum())
            t.mass["exact"] += float((out.dist.probs.sum(-1) * mask).sum())
            t.bytes += _gold_bytes(target_tok, ids, mask)
            bar.update(ids.numel())
            continue
        aligned = aligner.align_batch(ids.cpu()).to(src.device)
        logits = src.model(input_ids=aligned.src_ids, attention_mask=aligned.src_mask.long()).logits
        out, mass, n_aligned = carry_over(logits, aligned, aligner.vocab_map, aligner.vocab_kind, labels.to(src.device),
                                          top_k, vocab)
        top_lp, top_ids, next_lp = reduce_logits(logits, aligned.src_ids, top_k)
        del logits
        cov = aligned.covered & mask.to(src.device)
        t.aligned += n_aligned
        t.covered += int(cov.sum())
        t.nll_target += float(-(out.gold_logprob * cov).sum())
        own = aligned.src_mask.clone()
        own[:, 0] = False  # the first source token is predicted by nothing
        t.nll_own += float(-(next_lp[:, :-1] * own[:, 1:]).sum())
        t.own_tokens += int(own.sum())
        t.bytes += _gold_bytes(target_tok, ids, cov.cpu(), aligner)
        for key, value in vars(mass).items():
            t.mass[key] += value
        ok = (aligned.src_pos >= 0) & mask.to(src.device)
        j = aligned.src_pos.clamp_min(0)
        own_lp = next_lp.gather(1, j)  # position j predicts source token j + 1: the 1:1 token
        t.nll_1to1_own += float(-(own_lp * ok).sum())
        gold = torch.zeros_like(labels)
        gold[:, :-1] = labels[:, 1:]
        p = out.dist.probs
        p_gold = (p * (out.dist.ids == gold.unsqueeze(-1))).sum(-1)
        # outside the carried support, the gold gets its share of the "other" mass spread over the rest of the
        # target vocabulary: a full-vocabulary distribution, comparable with the source's own token's CE
        rest = (vocab - (out.dist.ids >= 0).sum(-1)).clamp_min(1)
        p_other = (1 - p.sum(-1)).clamp_min(0) / rest
        full = torch.where(p_gold > 0, p_gold, p_other).clamp_min(1e-30)
        t.nll_1to1_carried += float(-(full.log() * ok).sum())
        kinds = aligner.vocab_kind.to(src.device)
        sel = ok.unsqueeze(-1) & (kinds[top_ids.gather(1, j.unsqueeze(-1).expand(-1, -1, top_ids.shape[-1]))] == MIN_ED)
        sids = top_ids.gather(1, j.unsqueeze(-1).expand(-1, -1, top_ids.shape[-1]))[sel]
        probs = top_lp.gather(1, j.unsqueeze(-1).expand(-1, -1, top_lp.shape[-1])).exp()[sel]
        counts = torch.bincount(sids.cpu(), weights=probs.double().cpu(), minlength=len(aligner.vocab_map))
        t.by_id = counts if t.by_id is None else t.by_id + counts[: len(t.by_id)]
        if aligner.src_prefix:  # the same text without the BOS the source's tokenizer adds
            prefix, aligner.src_prefix = aligner.src_prefix, []
            try:
                nob = aligner.align_batch(ids.cpu()).to(src.device)
                logits = src.model(input_ids=nob.src_ids, attention_mask=nob.src_mask.long()).logits
                out_nob, _, _ = carry_over(logits, nob, aligner.vocab_map, aligner.vocab_kind, labels.to(src.device),
                                           top_k, vocab)
                del logits
                cov_nob = nob.covered & mask.to(src.device)
                t.nll_no_bos += float(-(out_nob.gold_logprob * cov_nob).sum())
                t.covered_no_bos += int(cov_nob.sum())
            finally:
                aligner.src_prefix = prefix
        bar.update(ids.numel())
    bar.close()
    total_mass = sum(t.mass.values()) or 1.0
    row: dict[str, Any] = {
        "source": src.name,
        "tokenizer": "same as target" if aligner is None else f"{len(src.tokenizer)} tokens",
        "bos": "" if aligner is None or not aligner.src_prefix else src.tokenizer.convert_ids_to_tokens(aligner.src_prefix)[0],
        "rate_1to1": t.aligned / max(t.positions, 1),
        "mass_exact": t.mass["exact"] / total_mass,
        "mass_min_ed": t.mass["min_ed"] / total_mass,
        "mass_dropped": t.mass["dropped"] / total_mass,
        "ce_own_token": t.nll_own / max(t.own_tokens, 1),
        "ce_per_target_token": t.nll_target / max(t.covered, 1),
        "ce_no_bos": (t.nll_no_bos / t.covered_no_bos) if t.covered_no_bos else None,
        "nats_per_byte": t.nll_target / max(t.bytes, 1),
        "ce_1to1_own": t.nll_1to1_own / max(t.aligned, 1),
        "ce_1to1_carried": t.nll_1to1_carried / max(t.aligned, 1),
        "positions": t.positions,
        "worst_min_ed": [],
    }
    if t.by_id is not None and float(t.by_id.sum()) > 0:
        from rapidfuzz.distance import Levenshtein

        top = torch.argsort(t.by_id, descending=True)[:worst]
        for sid in top.tolist():
            if t.by_id[sid] <= 0:
                break
            tid = int(aligner.vocab_map[sid])
            a, b = aligner._src_norm[sid], aligner._tgt_norm[tid]
            row["worst_min_ed"].append({
                "source_token": a, "target_token": b, "mass_share": float(t.by_id[sid]) / total_mass,
                "distance": Levenshtein.normalized_distance(a, b),
            })
    return row


def _gold_bytes(target_tok, ids, mask, aligner=None) -> int:
    """Bytes of the gold target tokens at the positions in ``mask``."""
    table = aligner._tgt_bytes if aligner is not None else None
    total = 0
    for row, m in zip(ids.tolist(), mask.tolist()):
        for t, keep in enumerate(m):
            if keep and t + 1 < len(row):
                tok = row[t + 1]
                total += len(table[tok]) if table is not None else len(target_tok.decode([tok]).encode())
    return total


def format_report(rows: list[dict[str, Any]]) -> str:
    """The report as markdown tables: one row per source, then the worst edit-distance mappings."""

    def f(x, pct=False):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        return f"{100 * x:.1f}%" if pct else f"{x:.3f}"

    lines = [
        "| source | vocabulary | 1:1 positions | top-k mass exact / edit distance / dropped | CE own tokens | "
        "CE per target token (ranking) | same without BOS | nats/byte | CE at 1:1: own token / carried |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bos = f" (BOS {r['bos']})" if r["bos"] else ""
        lines.append(
            f"| {r['source']} | {r['tokenizer']}{bos} | {f(r['rate_1to1'], True)} | {f(r['mass_exact'], True)} / "
            f"{f(r['mass_min_ed'], True)} / {f(r['mass_dropped'], True)} | {f(r['ce_own_token'])} | "
            f"{f(r['ce_per_target_token'])} | {f(r['ce_no_bos'])} | {f(r['nats_per_byte'])} | "
            f"{f(r['ce_1to1_own'])} / {f(r['ce_1to1_carried'])} |"
        )
    for r in rows:
        if r["worst_min_ed"]:
            lines += ["", f"{r['source']}: edit-distance mappings carrying the most top-k mass",
                      "| source token | -> target token | share of top-k mass | normalised distance |",
                      "|---|---|---|---|"]
            lines += [f"| {m['source_token']!r} | {m['target_token']!r} | {100 * m['mass_share']:.2f}% | "
                      f"{m['distance']:.2f} |" for m in r["worst_min_ed"]]
    return "\n".join(lines)
