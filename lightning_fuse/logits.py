"""Reduce dense logits to a sparse next-token output without a full ``[B, L, V]`` float32 copy.

A source's logits come out of its LM head as ``[B, L, V]`` (often bf16). What the fusion needs from them is small:
the top-k log-probabilities and ids and the log-probability of the gold next token at each position. Computing
them from ``log_softmax(logits.float())`` materialises ``B x L x V`` float32 values (8 x 2048 x 262k x 4 B = 17 GB
for one source). ``sparse_logprobs`` works on chunks of positions instead: per chunk it casts to float32, takes
the log-normaliser ``logZ = logsumexp(x)``, the top-k of the raw logits (the same ids as the top-k of the
log-probs: subtracting ``logZ`` keeps the order) and the gold logit, and subtracts ``logZ``. At most
``chunk_size x V`` float32 values (plus what ``logsumexp`` allocates for one chunk) are alive at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Default chunk: as many positions as fit 16M float32 values (64 MiB) per chunk, at least one position."""


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk such that one float32 chunk holds about ``DEFAULT_CHUNK_ELEMENTS`` values."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))


def sparse_logprobs(
    logits: Tensor, top_k: int, gold_ids: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probs, their ids and the gold log-prob of ``log_softmax(logits)``, computed chunk by chunk.

    Args:
        logits: ``[B, L, V]`` raw logits, any floating dtype (cast to float32 one chunk at a time).
        top_k: ids kept per position (``min(top_k, V)`` are returned).
        gold_ids: ``[B, L]`` int64, the id whose log-prob to return at each position (use any valid id, e.g. 0,
            where there is none and mask the result).
        chunk_size: positions (rows of the flattened ``[B * L, V]``) per chunk; ``None`` = ``default_chunk_size(V)``.

    Returns:
        ``(top_logprobs [B, L, k] float32, top_ids [B, L, k] int64, gold_logprob [B, L] float32)``; the top-k are
        sorted by decreasing probability, as ``torch.topk`` returns them. Differentiable in ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be [B, L, V], got shape {tuple(logits.shape)}.")
    b, length, vocab = logits.shape
    if gold_ids.shape != (b, length):
        raise ValueError(f"`gold_ids` must be [B, L] = {[b, length]} to match the logits, got {list(gold_ids.shape)}.")
    if top_k < 1:
        raise ValueError(f"`top_k` must be >= 1, got {top_k}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 (positions per chunk) or None, got {chunk_size}.")
    k = min(top_k, vocab)
    rows = logits.reshape(b * length, vocab)
    gold = gold_ids.reshape(b * length, 1).to(torch.long)
    step = chunk_size or default_chunk_size(vocab)
    tops, ids, golds = [], [], []
    for start in range(0, b * length, step):
        x = rows[start : start + step].float()
        log_z = torch.logsumexp(x, dim=-1, keepdim=True)
        top_val, top_id = x.topk(k, dim=-1)
        tops.append(top_val - log_z)
        ids.append(top_id)
        golds.append(x.gather(-1, gold[start : start + step]) - log_z)
        del x
    if not tops:  # B * L == 0
        empty = rows.new_zeros((0, k), dtype=torch.float32)
        return (empty.view(b, length, k), empty.long().view(b, length, k), empty[:, :0].reshape(b, length))
    return (
        torch.cat(tops).view(b, length, k),
        torch.cat(ids).view(b, length, k),
        torch.cat(golds).view(b, length),
    )
