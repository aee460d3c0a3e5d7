"""Carry a source's logits over to the target: top-k distributions on target positions and ids, gold log-probs
and a CE comparable with any other source's.

Memory: log-normalisers, top-k and the log-prob of each source token are read in chunks of positions (at most
``chunk_elements`` float32 values at once, `lightning_fuse.logits`): from the LM head applied per chunk
(`reduce_hidden`, no ``[B, M, V_src]`` tensor at all), or from the logits when the model post-processes them
(`reduce_logits`: the logits are then the only dense source tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_fuse.alignment.aligner import AlignedBatch
from lightning_fuse.alignment.vocab_map import DROPPED, EXACT, MIN_ED
from lightning_fuse.fusion import (
    SourceOutput,
    SparseDist,
    gold_next_tokens,
    merge_duplicates,
    next_token_mask,
)
from lightning_fuse.logits import DEFAULT_CHUNK_ELEMENTS, sparse_logprobs, sparse_logprobs_from_hidden

__all__ = ["CHUNK_ELEMENTS", "MassShares", "carry_over", "carry_reduced", "reduce_hidden", "reduce_logits"]

CHUNK_ELEMENTS = DEFAULT_CHUNK_ELEMENTS
"""Default chunk of `reduce_logits` / `reduce_hidden`: 16M float32 values (64 MiB), 64 positions of a 262k
vocabulary."""


@dataclass
class MassShares:
    """Top-k probability mass at aligned positions, by how its source ids map onto the target vocabulary."""

    exact: float = 0.0
    min_ed: float = 0.0
    dropped: float = 0.0

    def add(self, other: MassShares) -> None:
        self.exact += other.exact
        self.min_ed += other.min_ed
        self.dropped += other.dropped

    def shares(self) -> dict[str, float]:
        """Each kind's share of the total (zeros when there was no mass)."""
        total = self.exact + self.min_ed + self.dropped
        return {k: (v / total if total else 0.0) for k, v in vars(self).items()}


def _next_ids(src_ids: Tensor) -> Tensor:
    nxt = torch.zeros_like(src_ids)
    nxt[:, :-1] = src_ids[:, 1:]
    return nxt


def reduce_logits(
    logits: Tensor, src_ids: Tensor, top_k: int, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probs ``[B, M, k]``, their ids and the log-prob of each next source token ``[B, M]`` (position
    ``j`` predicts ``src_ids[:, j + 1]``; 0 at the last position), read from the logits in chunks of positions
    (`lightning_fuse.logits.sparse_logprobs`): no float32 copy of the logits."""
    top_lp, top_ids, next_lp = sparse_logprobs(
        logits, top_k, _next_ids(src_ids), chunk_size=max(1, chunk_elements // max(1, logits.shape[-1]))
    )
    next_lp[:, -1:] = 0.0
    return top_lp, top_ids, next_lp


def reduce_hidden(
    hidden: Tensor, head: Callable[[Tensor], Tensor], src_ids: Tensor, top_k: int, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor, Tensor]:
    """`reduce_logits` of ``head(hidden)``, the LM head applied per chunk of positions: no ``[B, M, V]`` logits
    at all (`lightning_fuse.logits.sparse_logprobs_from_hidden`)."""
    vocab = head(hidden[:1, :1].reshape(1, -1)).shape[-1] if hidden.numel() else 1
    top_lp, top_ids, next_lp = sparse_logprobs_from_hidden(
        hidden, head, top_k, _next_ids(src_ids), chunk_size=max(1, chunk_elements // max(1, vocab))
    )
    next_lp[:, -1:] = 0.0
    return top_lp, top_ids, next_lp


def carry_over(
    logits: Tensor,
    aligned: AlignedBatch,
    vocab_map: Tensor,
    vocab_kind: Tensor,
    labels: Tensor,
    top_k: int,
    vocab_size: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[SourceOutput, MassShares, int]:
    """`carry_reduced` of the source's logits ``[B, M, V_src]`` (reduced in chunks of positions)."""
    reduced = reduce_logits(logits, aligned.src_ids.to(logits.device), top_k, chunk_elements)
    return carry_reduced(*reduced, aligned, vocab_map, vocab_kind, labels, vocab_size)


def carry_reduced(
    top_lp: Tensor,
    top_ids: Tensor,
    next_lp: Tensor,
    aligned: AlignedBatch,
    vocab_map: Tensor,
    vocab_kind: Tensor,
    labels: Tensor,
    vocab_size: int,
) -> tuple[SourceOutput, MassShares, int]:
    """The source's output on the target's positions and vocabulary, from its reduced logits (`reduce_logits`,
    `reduce_hidden`).

    - at a 1:1 position, the source's top-k distribution with ids mapped by ``vocab_map`` (ids mapping nowhere
      drop out: their mass goes to the "other" bucket; ids mapping to one target id are merged), sorted;
      elsewhere one-hot on the gold token;
    - ``gold_logprob[t]``: the log-likelihood the source gives the text of gold token ``t + 1``, from its own
      tokens credited there (see `AlignedBlock.src_credit`; exact at a 1:1 position);
    - ``ce``: minus their mean over the covered gold positions: the source's log-likelihood of the block's
      text (its own tokenisation, its BOS) in nats per target token, comparable with a same-tokenizer
      source's per-token CE (equal to it when the tokenisations agree). Uncovered positions get the mean.

    Returns:
        (output, top-k mass by mapping kind at the 1:1 positions, number of 1:1 positions).
    """
    device = labels.device
    top_lp, top_ids, next_lp = top_lp.to(device), top_ids.to(device), next_lp.to(device)
    aligned = aligned.to(device)
    v = max(vocab_map.numel(), int(top_ids.max()) + 1 if top_ids.numel() else 0)
    vocab_map, vocab_kind = vocab_map.to(device), vocab_kind.to(device)
    if vocab_map.numel() < v:  # padded embedding rows beyond the source tokenizer's ids
        vocab_map = torch.cat([vocab_map, vocab_map.new_full((v - vocab_map.numel(),), -1)])
        vocab_kind = torch.cat([vocab_kind, vocab_kind.new_full((v - vocab_kind.numel(),), DROPPED)])

    mask = next_token_mask(labels)
    pos = aligned.src_pos
    ok = (pos >= 0) & mask
    k = top_lp.shape[-1]
    idx = pos.clamp_min(0).unsqueeze(-1).expand(-1, -1, k)
    lp, sids = top_lp.gather(1, idx), top_ids.gather(1, idx)
    ids = vocab_map[sids]
    kind = vocab_kind[sids].masked_fill(ids >= vocab_size, DROPPED)
    ids = ids.masked_fill(kind == DROPPED, -1)
    p = lp.exp() * ok.unsqueeze(-1)
    mass = MassShares(
        float(p[kind == EXACT].sum()), float(p[kind == MIN_ED].sum()), float(p[kind == DROPPED].sum())
    )
    ids, probs = merge_duplicates(ids, p)
    probs, order = probs.sort(dim=-1, descending=True)
    ids = ids.gather(-1, order).masked_fill(probs <= 0, -1)
    lp = probs.log()  # log 0 = -inf: empty slot

    # gold: each source token's log-prob (predicted at the position before it) credited to a target position
    tok_lp = torch.zeros_like(next_lp)
    tok_lp[:, 1:] = next_lp[:, :-1]
    cred = aligned.src_credit.masked_fill(~aligned.src_mask, -1)
    gold_lp = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    gold_lp.scatter_add_(1, cred.clamp_min(0), tok_lp * (cred >= 0))
    cov = aligned.covered & mask
    ce = -(gold_lp * cov).sum(-1) / cov.sum(-1).clamp_min(1)
    gold_lp = torch.where(cov, gold_lp, -ce.unsqueeze(-1)) * mask

    onehot_ids = torch.full_like(ids, -1)
    onehot_ids[..., 0] = gold_next_tokens(labels)
    onehot_lp = torch.full_like(lp, float("-inf"))
    onehot_lp[..., 0] = 0.0
    ids = torch.where(ok.unsqueeze(-1), ids, onehot_ids)
    lp = torch.where(ok.unsqueeze(-1), lp, onehot_lp)
    return SourceOutput(SparseDist(ids, lp), gold_lp, ce), mass, int(ok.sum())
