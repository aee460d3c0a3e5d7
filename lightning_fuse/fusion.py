"""Sparse next-token distributions, fusion weights and distillation losses.

Shapes: B sequences, L positions, V target vocabulary, N sources, k kept ids per source and position.
A source's distribution is never materialised as a dense ``B x L x V`` tensor: it is kept as its top-k ids and
log-probs, the rest of its mass being one "other" bucket. The fused distribution is the union of the kept
sources' top-k ids (``M = N * k`` slots, duplicates merged), and the distillation losses compare teacher and
student on that union plus the "other" bucket (``lightning_fuse.distill``: proper divergences, lower bounds of the
full-vocabulary tempered divergence, exact once the support covers the vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fuse.distill import DISTILL_LOSSES, DistillLoss, distill_loss  # noqa: F401  (re-exported)
from lightning_fuse.logits import sparse_logprobs, sparse_logprobs_from_hidden

Strategy = Literal["adaptive", "uniform", "min_ce", "avg_ce", "softmax_ce", "clm"]
STRATEGIES: tuple[str, ...] = ("adaptive", "uniform", "min_ce", "avg_ce", "softmax_ce", "clm")
_EPS = 1e-12


@dataclass
class SparseDist:
    """Top-k slice of next-token distributions.

    Attributes:
        ids: ``[B, L, k]`` int64 target-vocabulary ids; ``-1`` marks an empty slot (probability 0).
        logprobs: ``[B, L, k]`` log-probabilities normalised over the full vocabulary (``-inf`` for empty slots).
        dense: the slots are the whole vocabulary in id order at every position (``distill_top_k >= V``, same
            tokenizer): ``logprobs`` is the full log-softmax and the losses take the dense path
            (``lightning_fuse.dense``).
    """

    ids: Tensor
    logprobs: Tensor
    dense: bool = False

    @property
    def probs(self) -> Tensor:
        return self.logprobs.exp().masked_fill(self.ids < 0, 0.0)


@dataclass
class SourceOutput:
    """What one source contributes for a batch.

    Attributes:
        dist: its top-k next-token distribution on the target's positions and vocabulary.
        gold_logprob: ``[B, L]`` log-probability it gives the gold next token (0 where there is none). For a source
            with another tokenizer: its log-likelihood, under its own tokenisation of the whole block, of the text
            of that target token (each source token credited to the target token holding its last byte).
        ce: ``[B]`` nats per target token: minus the mean of ``gold_logprob`` over each sequence's gold positions,
            comparable between sources of any tokenizer (every ranking uses it: min_ce, avg_ce, softmax_ce,
            rewards, the CE prior, the warm-up).
    """

    dist: SparseDist
    gold_logprob: Tensor
    ce: Tensor


def next_token_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``[B, L]`` bool: position t has a gold next token ``labels[:, t + 1]``."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def gold_next_tokens(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``[B, L]`` the gold next token at each position (0 where there is none; use with ``next_token_mask``)."""
    gold = torch.zeros_like(labels)
    gold[:, :-1] = labels[:, 1:].clamp_min(0)
    return gold.masked_fill(~next_token_mask(labels, ignore_index), 0)


def source_output_from_logits(logits: Tensor, labels: Tensor, top_k: int, chunk_size: int | None = None) -> SourceOutput:
    """Reduce a source's dense ``[B, L, V]`` logits to its sparse output right away (the logits can be freed).

    Works on chunks of ``chunk_size`` positions (``lightning_fuse.logits.sparse_logprobs``): no ``[B, L, V]``
    float32 copy of the logits is made.
    """
    mask = next_token_mask(labels)
    top_lp, top_ids, gold = sparse_logprobs(logits, top_k, gold_next_tokens(labels), chunk_size)
    gold = gold * mask
    return SourceOutput(SparseDist(top_ids, top_lp, dense=top_k >= logits.shape[-1]), gold, sequence_ce(gold, mask))


def source_output_from_hidden(
    hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, top_k: int, chunk_size: int | None = None
) -> SourceOutput:
    """``source_output_from_logits(head(hidden), ...)`` with the LM head applied one chunk of positions at a time,
    so that the source's ``[B, L, V]`` logits never exist (``lightning_fuse.logits.sparse_logprobs_from_hidden``)."""
    mask = next_token_mask(labels)
    top_lp, top_ids, gold = sparse_logprobs_from_hidden(hidden, head, top_k, gold_next_tokens(labels), chunk_size)
    gold = gold * mask
    # k = min(top_k, V): dense when top_k > k, or top_k = k = V (the head's width, from one row)
    dense = top_k > top_lp.shape[-1] or top_k == head(hidden.reshape(-1, hidden.shape[-1])[:1]).shape[-1]
    return SourceOutput(SparseDist(top_ids, top_lp, dense=dense), gold, sequence_ce(gold, mask))


def sequence_ce(gold_logprob: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` mean negative log-likelihood of the gold tokens per sequence (0 for a sequence with none)."""
    count = mask.sum(-1).clamp_min(1)
    return -(gold_logprob * mask).sum(-1) / count


def baseline_weights(strategy: Strategy, ce: Tensor) -> Tensor:
    """Fusion weights ``[B, N]`` of the fixed baselines from the sources' per-sequence CE ``[B, N]``.

    - ``uniform``: 1/N.
    - ``min_ce`` (FuseLLM's MinCE, ``distill_greater_as_gt``): one-hot on ``argmin_k CE_k`` (FuseLLM takes the source
      with the largest reward ``1 / exp(CE)``: the same choice; ties go to the first source here).
    - ``avg_ce`` (FuseLLM's AvgCE, ``distill_weighted_as_gt``): ``softmax(r)`` with the reward ``r_k = 1 / exp(CE_k)``,
      i.e. ``softmax(exp(-CE))`` (FuseLLM ``src/utils/trainer.py``, ``compute_loss``: ``align_reward = 1 /
      torch.exp(metric)``, ``torch.softmax(torch.stack(rewards), dim=1)``). Rewards lie in (0, 1], so the weights
      stay close to uniform: CE [2.1, 2.4, 3.0] gives [0.345, 0.334, 0.321].
    - ``softmax_ce``: ``softmax(-CE)``, a much sharper weighting (the same CEs give [0.466, 0.345, 0.189]); not in
      FuseLLM, it is the selector's CE prior at step 0.
    """
    if strategy == "uniform":
        return torch.full_like(ce, 1.0 / ce.shape[-1])
    if strategy == "min_ce":
        return F.one_hot(ce.argmin(-1), ce.shape[-1]).to(ce.dtype)
    if strategy == "avg_ce":
        return torch.softmax(torch.exp(-ce), dim=-1)
    if strategy == "softmax_ce":
        return torch.softmax(-ce, dim=-1)
    raise ValueError(
        f"`strategy` {strategy!r} has no fixed weights; fixed strategies are uniform, min_ce, avg_ce, softmax_ce."
    )


def fuse(outputs: list[SourceOutput], weights: Tensor) -> SparseDist:
    """Mix the sources' sparse distributions with per-sequence weights ``[B, N]`` or per-position weights
    ``[B, L, N]`` (rows sum to 1).

    Returns a ``SparseDist`` over the union of their ids (``[B, L, N * k]``, duplicates merged, empty slots -1).
    With one source its ids cannot repeat: no merge (no sort over the ``k`` slots, which is the whole vocabulary
    in dense mode).
    """
    w = weights[:, None, :, None] if weights.dim() == 2 else weights.unsqueeze(-1)  # [B, 1 or L, N, 1]
    if len(outputs) == 1:
        ids = outputs[0].dist.ids
        logprobs = outputs[0].dist.logprobs + w[:, :, 0].clamp_min(_EPS).log()
        ids = ids.masked_fill(torch.isneginf(logprobs), -1)
        return SparseDist(ids, logprobs.masked_fill(ids < 0, float("-inf")))
    ids = torch.cat([o.dist.ids for o in outputs], dim=-1)
    probs = torch.cat(
        [o.dist.probs * w[:, :, i] for i, o in enumerate(outputs)], dim=-1
    )
    ids, probs = merge_duplicates(ids, probs)
    return SparseDist(ids, probs.clamp_min(_EPS).log().masked_fill(ids < 0, float("-inf")))


def merge_duplicates(ids: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the probabilities of repeated ids along the last dim; slots left empty (or with p = 0) get id -1."""
    ids = ids.masked_fill(probs <= 0, -1)
    sorted_ids, order = ids.sort(dim=-1)
    sorted_p = probs.gather(-1, order)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    slot = first.long().cumsum(-1) - 1
    merged_p = torch.zeros_like(sorted_p).scatter_add_(-1, slot, sorted_p)
    merged_ids = torch.full_like(sorted_ids, -1).scatter_(-1, slot, sorted_ids)
    merged_ids = merged_ids.masked_fill(merged_p <= 0, -1)
    return merged_ids, merged_p.masked_fill(merged_ids < 0, 0.0)


def mixture_nll(gold_logprobs: Tensor, gate: Tensor, mask: Tensor, available: Tensor | None = None) -> Tensor:
    """Selector objective: mean over gold tokens of ``-log sum_k g_k P_k(y_t)``.

    Args:
        gold_logprobs: ``[B, N, L]`` each source's log-probability of the gold next token.
        gate: ``[B, N]`` selector probabilities (rows sum to 1; gradient flows into them).
        mask: ``[B, L]`` positions with a gold next token.
        available: ``[B, N]`` bool, the sources that ran on each row (routed mode); the gate is renormalised
            over them, so a row where one source ran teaches nothing and one where several ran compares them.

    The dense mixture (not the top-K renormalised weights) is used so that the selector gets a gradient for
    every source on every sample, also with K = 1 where the renormalised weight is identically 1.
    """
    if available is not None:
        gate = gate * available
        gate = gate / gate.sum(-1, keepdim=True).clamp_min(_EPS)
        gold_logprobs = gold_logprobs.masked_fill(~available.unsqueeze(-1), float("-inf"))
    log_gate = gate.clamp_min(_EPS).log()
    if available is not None:
        log_gate = log_gate.masked_fill(~available, float("-inf"))
    mix = torch.logsumexp(gold_logprobs + log_gate.unsqueeze(-1), dim=1)
    return -(mix * mask).sum() / mask.sum().clamp_min(1)
