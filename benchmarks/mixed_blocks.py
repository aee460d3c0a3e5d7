"""Mixed-domain blocks for ``benchmarks/quality.py --mixed``: each block is 2-3 segments (16-96 tokens) of different
domains, with the domain of every token (``batch["segments"]``, ``[B, L]``), next to today's pure blocks.

Segments are cut from the same token streams as the pure blocks (the domains' packed train / val text). Validation
keeps the first half of each domain's held-out blocks as pure blocks and cuts the mixed blocks' segments from the
other half, in order (no held-out token is used twice while the stream lasts), so that no validation text appears
in both sets.
"""

from __future__ import annotations

import logging
import random

import torch

from lightning_fuse.data import BlockDataset, TextDataModule
from lightning_fuse.offline import CachedTextDataModule

log = logging.getLogger(__name__)
MIXED = "mixed"


class SegmentBlockDataset(BlockDataset):
    """Blocks with a domain index per token (``segments`` ``[S, L]``; a pure block's row is its domain)."""

    def __init__(self, blocks: torch.Tensor, domains: torch.Tensor, segments: torch.Tensor) -> None:
        super().__init__(blocks, domains)
        self.segments = segments

    def __getitem__(self, idx: int) -> dict:
        return {**super().__getitem__(idx), "segments": self.segments[idx]}


def segment_lengths(rng: random.Random, length: int, lo: int, hi: int, parts: int) -> list[int]:
    """``parts`` lengths in ``[lo, hi]`` summing to ``length`` (rejection sampling)."""
    for _ in range(10_000):
        cuts = [rng.randint(lo, hi) for _ in range(parts - 1)]
        last = length - sum(cuts)
        if lo <= last <= hi:
            return [*cuts, last]
    raise ValueError(f"cannot split {length} tokens into {parts} segments of {lo}-{hi} tokens")


def mixed_blocks(
    streams: list[torch.Tensor], n: int, length: int, lo: int, hi: int, seed: int, sequential: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` blocks of 2-3 segments of distinct domains: ``(blocks [n, L], segments [n, L])``."""
    rng = random.Random(seed)
    cursor = [0] * len(streams)
    blocks, segments = [], []
    for _ in range(n):
        parts = rng.choice([p for p in (2, 3) if p <= len(streams) and p * lo <= length <= p * hi])
        lengths = segment_lengths(rng, length, lo, hi, parts)
        domains = rng.sample(range(len(streams)), parts)
        ids, seg = [], []
        for d, size in zip(domains, lengths):
            stream = streams[d]
            if sequential:
                if cursor[d] + size > len(stream):
                    cursor[d] = 0
                    log.warning("mixed blocks: domain %d's held-out stream is used again", d)
                start = cursor[d]
                cursor[d] += size
            else:
                start = rng.randint(0, len(stream) - size)
            ids.append(stream[start : start + size])
            seg.append(torch.full((size,), d, dtype=torch.long))
        blocks.append(torch.cat(ids))
        segments.append(torch.cat(seg))
    return torch.stack(blocks), torch.stack(segments)


class MixedCachedDataModule(CachedTextDataModule):
    """``CachedTextDataModule`` with ``mixed_train_blocks`` / ``mixed_val_blocks`` mixed blocks (domain ``mixed``)
    appended to the pure ones; every batch carries ``segments`` (the domain of each token)."""

    def __init__(self, *args, mixed_train_blocks: int = 0, mixed_val_blocks: int = 0, segment_min: int = 16,
                 segment_max: int = 96, mixed_seed: int = 1234, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mixed_train_blocks = mixed_train_blocks
        self.mixed_val_blocks = mixed_val_blocks
        self.segment_min = segment_min
        self.segment_max = segment_max
        self.mixed_seed = mixed_seed
        self.pure_domains: list[str] = []

    def setup_blocks(self, stage: str | None = None) -> None:
        if isinstance(self.train_set, SegmentBlockDataset):
            return
        TextDataModule.setup(self, stage)
        self.pure_domains = list(self.domains)
        d_count = len(self.pure_domains)
        train, val = self.train_set, self.val_set
        tr_blocks, tr_dom, va_blocks, va_dom, streams_tr, streams_va = [], [], [], [], [], []
        for d in range(d_count):
            tr = train.blocks[train.domains == d]
            va = val.blocks[val.domains == d]
            keep = max(1, len(va) // 2) if self.mixed_val_blocks else len(va)
            tr_blocks.append(tr)
            va_blocks.append(va[:keep])
            tr_dom.append(torch.full((len(tr),), d))
            va_dom.append(torch.full((keep,), d))
            streams_tr.append(tr.reshape(-1))
            streams_va.append((va[keep:] if keep < len(va) else va).reshape(-1))
        length = train.blocks.shape[1]
        lo, hi = self.segment_min, self.segment_max
        mtr, mtr_seg = mixed_blocks(streams_tr, self.mixed_train_blocks, length, lo, hi, self.mixed_seed, False)
        mva, mva_seg = mixed_blocks(streams_va, self.mixed_val_blocks, length, lo, hi, self.mixed_seed + 1, True)
        self.domains = [*self.pure_domains, MIXED]

        def build(blocks, doms, mixed, mixed_seg):
            pure = torch.cat(blocks)
            pure_dom = torch.cat(doms).long()
            seg = pure_dom[:, None].expand(-1, length)
            return SegmentBlockDataset(torch.cat([pure, mixed]), torch.cat([pure_dom, torch.full((len(mixed),), d_count)]),
                                       torch.cat([seg, mixed_seg]))

        self.train_set = build(tr_blocks, tr_dom, mtr, mtr_seg)
        val_set = build(va_blocks, va_dom, mva, mva_seg)
        order = _interleaved_order(val_set.domains)
        self.val_set = SegmentBlockDataset(val_set.blocks[order], val_set.domains[order], val_set.segments[order])
        log.info("mixed blocks: %d train / %d val (plus %d / %d pure)", len(mtr), len(mva),
                 len(self.train_set) - len(mtr), len(self.val_set) - len(mva))


def _interleaved_order(domains: torch.Tensor) -> list[int]:
    rank = torch.zeros(len(domains), dtype=torch.long)
    for d in domains.unique():
        where = (domains == d).nonzero().squeeze(-1)
        rank[where] = torch.arange(len(where))
    return sorted(range(len(rank)), key=lambda i: (int(rank[i]), int(domains[i])))
