"""Reduce dense logits to a sparse next-token output without a full ``[B, L, V]`` float32 copy.

A source's logits come out of its LM head as ``[B, L, V]`` (often bf16). What the fusion needs from them is small:
the top-k log-probabilities and ids and the log-probability of the gold next token at each position. Computing
them from ``log_softmax(logits.float())`` materialises ``B x L x V`` float32 values (8 x 2048 x 262k x 4 B = 17 GB
for one source). ``sparse_logprobs`` works on chunks of positions instead: per chunk it casts to float32, takes
``log_softmax`` (one fused pass; ``logsumexp`` and a subtraction take twice as long on CPU), its top-k and the
gold log-prob. At most two ``chunk_size x V`` float32 tensors are alive at once. On the CPU a chunk has at most
``CPU_CHUNK_POSITIONS`` positions: chunks that stay in the core's cache and, mostly, in the allocator's reused memory
(a chunk of 64 MiB is a fresh ``mmap`` each time: up to half of its time went to page faults).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Default chunk: as many positions as fit 16M float32 values (64 MiB) per chunk, at least one position."""


CPU_CHUNK_POSITIONS = 256
"""On the CPU, at most this many positions per chunk: 4 MiB of float32 logits at a vocabulary of 4096, and enough rows
per LM-head matmul to amortise reading its weights (measured, 1 thread: 1.3-2x faster than 4096 positions at V = 4096,
H = 64; within 5% of the best at V = 32000, H = 256)."""


def default_chunk_size(vocab_size: int, device: torch.device | str | None = None) -> int:
    """Positions per chunk such that one float32 chunk holds about ``DEFAULT_CHUNK_ELEMENTS`` values; on a CPU
    ``device``, at most ``CPU_CHUNK_POSITIONS``."""
    step = max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))
    if device is not None and torch.device(device).type == "cpu":
        step = min(step, CPU_CHUNK_POSITIONS)
    return step


def sparse_logprobs(
    logits: Tensor, top_k: int, gold_ids: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probs, their ids and the gold log-prob of ``log_softmax(logits)``, computed chunk by chunk.

    Args:
        logits: ``[B, L, V]`` raw logits, any floating dtype (cast to float32 one chunk at a time).
        top_k: ids kept per position (``min(top_k, V)`` are returned).
        gold_ids: ``[B, L]`` int64, the id whose log-prob to return at each position (use any valid id, e.g. 0,
            where there is none and mask the result).
        chunk_size: positions (rows of the flattened ``[B * L, V]``) per chunk; ``None`` = ``default_chunk_size(V,
            logits.device)``.

    Returns:
        ``(top_logprobs [B, L, k] float32, top_ids [B, L, k] int64, gold_logprob [B, L] float32)``; the top-k are
        sorted by decreasing probability, as ``torch.topk`` returns them, except when ``top_k >= V`` (dense mode):
        then no ``topk`` runs and the ids are ``0 .. V-1`` in order (a broadcast view; the log-probs are the
        log-softmax itself). Differentiable in
        ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be [B, L, V], got shape {tuple(logits.shape)}.")
    b, length, vocab = logits.shape
    rows = logits.reshape(b * length, vocab)
    return _sparse_rows(lambda start, stop: rows[start:stop], b, length, vocab, top_k, gold_ids, chunk_size)


def sparse_logprobs_from_hidden(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    top_k: int,
    gold_ids: Tensor,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``sparse_logprobs`` of ``head(hidden)`` without ever holding the ``[B, L, V]`` logits: the head runs per chunk.

    Args:
        hidden: ``[B, L, H]`` the LM's last hidden states (after its final norm).
        head: maps ``[R, H]`` hidden states to ``[R, V]`` logits (the LM head, e.g. ``model.get_output_embeddings()``).
        top_k, gold_ids, chunk_size: as in ``sparse_logprobs``.

    Peak memory is one chunk of logits (``chunk_size x V``, in the head's dtype, plus its float32 copy).
    """
    if hidden.dim() != 3:
        raise ValueError(f"`hidden` must be [B, L, H], got shape {tuple(hidden.shape)}.")
    b, length, width = hidden.shape
    rows = hidden.reshape(b * length, width)
    vocab = head(rows[:1] if rows.shape[0] else rows.new_zeros(1, width)).shape[-1]
    return _sparse_rows(lambda start, stop: head(rows[start:stop]), b, length, vocab, top_k, gold_ids, chunk_size)


def plain_lm_head(model: nn.Module) -> nn.Module | None:
    """The LM head of a HF causal LM whose logits are exactly ``head(base_model(...).last_hidden_state)``, else None.

    Models that post-process their logits (Gemma's soft-capping, Cohere's ``logit_scale``, Granite's
    ``logits_scaling``) return None: use their full logits.
    """
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESSING):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    return head


_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _sparse_rows(
    rows: Callable[[int, int], Tensor],
    b: int,
    length: int,
    vocab: int,
    top_k: int,
    gold_ids: Tensor,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk loop of ``sparse_logprobs``: ``rows(start, stop)`` gives the logits of rows start..stop-1."""
    if gold_ids.shape != (b, length):
        raise ValueError(f"`gold_ids` must be [B, L] = {[b, length]} to match the logits, got {list(gold_ids.shape)}.")
    if top_k < 1:
        raise ValueError(f"`top_k` must be >= 1, got {top_k}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 (positions per chunk) or None, got {chunk_size}.")
    k = min(top_k, vocab)
    gold = gold_ids.reshape(b * length, 1).to(torch.long)
    step = chunk_size or default_chunk_size(vocab, gold_ids.device)
    dense = top_k >= vocab
    tops, ids, golds = [], [], []
    for start in range(0, b * length, step):
        lp = torch.log_softmax(rows(start, start + step).float(), dim=-1)  # one fused pass (logsumexp takes two)
        golds.append(lp.gather(-1, gold[start : start + step]))
        if dense:  # every id is kept: no sort
            tops.append(lp)
        else:
            top_val, top_id = lp.topk(k, dim=-1)
            tops.append(top_val)
            ids.append(top_id)
        del lp
    if not tops:  # B * L == 0
        empty = torch.zeros((0, k), dtype=torch.float32, device=gold_ids.device)
        return (empty.view(b, length, k), empty.long().view(b, length, k), empty[:, :0].reshape(b, length))
    top_lp = torch.cat(tops).view(b, length, k) if len(tops) > 1 else tops[0].view(b, length, k)
    if dense:  # ids 0 .. V-1 at every position: a broadcast view, no [B, L, V] int64 tensor
        all_ids = torch.arange(vocab, device=top_lp.device).expand(b, length, vocab)
    return (
        top_lp,
        all_ids if dense else torch.cat(ids).view(b, length, k),
        torch.cat(golds).view(b, length),
    )
