"""Per-token fusion (METHOD.md §8): choose which source teaches each token, not each sequence.

The per-sequence selection still decides which sources run on (are kept for) a row; at every position ``t`` the
fusion weights ``w_t`` (``[B, L, N]``, rows sum to 1 over the row's kept sources) mix them:

- ``adaptive``: a trained gate ``g_t = softmax(TokenGate(h_t, signals_t))`` over the sources available at ``t``
  (``h_t``: the target's detached hidden state; signals: each source's gold log-prob, top-1 log-prob and top-k
  mass at ``t``). It trains by the per-position mixture likelihood ``mean_t -log sum_k g_{t,k} P_k(y_t)`` over
  every source that ran on the row (dense, so that it gets a gradient at every position also with K = 1); the
  target distils ``sum_k w_{t,k} P_{k,t}`` with ``w_t = g_t`` renormalised over the kept sources, detached.
- ``min_ce`` (token-level MinCE): ``w_t`` one-hot on the kept source with the largest gold log-prob at ``t``,
  optionally averaged over a centred window of positions first.
- ``avg_ce`` (token-level AvgCE): ``w_t = softmax_k(P_k(y_t))``, FuseLLM's ``softmax(exp(-CE))`` per token.
- ``uniform`` / ``softmax_ce``: ``1 / K`` and ``softmax_k(log P_k(y_t))``.

Positions where a cross-tokenizer source has no aligned distribution carry its one-hot gold distribution and its
mean gold log-prob (``lightning_fuse.alignment.carry``), as in per-sequence mode: nothing special happens here.
A source that did not run on a row (routed mode) has gold log-prob ``-inf`` there and is never available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fuse.fusion import SourceOutput
from lightning_fuse.selector import Selection

TokenFeatures = Literal["hidden", "signals", "both"]
TOKEN_FEATURES: tuple[str, ...] = ("hidden", "signals", "both")
SIGNALS_PER_SOURCE = 3  # centred gold log-prob, top-1 log-prob, log top-k mass
_FLOOR = -30.0  # log-probs below this are clamped in the features (a source giving ~0 to the gold token)


class TokenGate(nn.Module):
    """Scores the sources at every position: ``[B, L, H]`` hidden states and ``[B, L, 3N]`` signals -> ``[B, L, N]``.

    Args:
        num_sources: N.
        hidden_size: the target's hidden size H (used when ``features`` includes ``hidden``).
        features: ``hidden`` (the target's hidden state at the position), ``signals`` (the sources' per-position
            signals) or ``both``.
        width: hidden width of the MLP.
        prior: with signals, add ``s * (log P_k(y_t) - mean_j log P_j(y_t))`` to the logits and start the MLP's output
            at zero, so that the gate starts at the sources' posterior responsibility for the gold token (a soft
            token-level MinCE) and learns corrections.
    """

    def __init__(
        self, num_sources: int, hidden_size: int, features: TokenFeatures = "both", width: int = 64, prior: bool = True
    ) -> None:
        super().__init__()
        if features not in TOKEN_FEATURES:
            raise ValueError(f"`--model.token_features` can be {', '.join(TOKEN_FEATURES)}, got {features!r}.")
        self.num_sources = num_sources
        self.features = features
        signals = features != "hidden"
        in_dim = (SIGNALS_PER_SOURCE * num_sources if signals else 0) + (hidden_size if features != "signals" else 0)
        self.hidden_norm = nn.LayerNorm(hidden_size) if features != "signals" else None
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, num_sources))
        self.prior = prior and signals
        if self.prior:
            self.prior_scale = nn.Parameter(torch.ones(1))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, hidden: Tensor | None, signals: Tensor | None, centred_gold: Tensor | None) -> Tensor:
        parts = []
        if self.features != "hidden":
            if signals is None:
                raise ValueError(f"This token gate (features={self.features!r}) needs the sources' signals.")
            parts.append(signals.float())
        if self.features != "signals":
            if hidden is None:
                raise ValueError(f"This token gate (features={self.features!r}) needs the target's hidden states.")
            parts.append(self.hidden_norm(hidden.detach().float()))
        logits = self.mlp(torch.cat(parts, dim=-1))
        if self.prior:
            logits = logits + self.prior_scale * centred_gold
        return logits


def gold_logprobs(outputs: Sequence[SourceOutput]) -> Tensor:
    """``[B, L, N]`` each source's log-prob of the gold next token (``-inf`` where it did not run)."""
    return torch.stack([o.gold_logprob.float() for o in outputs], dim=-1)


def availability(gold: Tensor, rows: Tensor) -> Tensor:
    """``[B, L, N]`` bool: source k is kept for the row (``rows`` ``[B, N]``) and has an output at position t."""
    return rows.unsqueeze(1) & torch.isfinite(gold)


def source_signals(outputs: Sequence[SourceOutput], gold: Tensor, available: Tensor) -> tuple[Tensor, Tensor]:
    """``([B, L, 3N] signals, [B, L, N] centred gold log-prob)``; unavailable sources get zeros."""
    lp = gold.clamp_min(_FLOOR).masked_fill(~available, 0.0)
    count = available.sum(-1, keepdim=True).clamp_min(1)
    centred = (lp - lp.sum(-1, keepdim=True) / count).masked_fill(~available, 0.0)
    top1 = torch.stack([o.dist.logprobs.float().amax(-1) for o in outputs], -1)
    mass = torch.stack([torch.logsumexp(o.dist.logprobs.float(), -1) for o in outputs], -1)
    top1 = top1.clamp_min(_FLOOR).masked_fill(~available, 0.0)
    mass = mass.clamp_min(_FLOOR).masked_fill(~available, 0.0)
    return torch.cat([centred, top1, mass], dim=-1), centred


def masked_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the allowed entries of the last dim; a position with none allowed gets all zeros."""
    z = logits.float().masked_fill(~allowed, float("-inf"))
    out = torch.softmax(z, dim=-1)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


def _renormalise(w: Tensor) -> Tensor:
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def window_mean(x: Tensor, window: int) -> Tensor:
    """``[B, L, N]`` mean of ``x`` over a centred window of ``window`` positions (fewer at the edges)."""
    if window <= 1:
        return x
    flat = x.permute(0, 2, 1).reshape(-1, 1, x.shape[1])
    pad = window // 2
    out = F.avg_pool1d(flat, window, stride=1, padding=pad, count_include_pad=False)[..., : x.shape[1]]
    return out.reshape(x.shape[0], x.shape[2], x.shape[1]).permute(0, 2, 1)


def fixed_token_weights(strategy: str, gold: Tensor, kept: Tensor, window: int = 1) -> Tensor:
    """``[B, L, N]`` weights of the per-token baselines over the kept, available sources ``kept`` ``[B, L, N]``."""
    lp = gold.clamp_min(_FLOOR).masked_fill(~kept, 0.0)
    if strategy == "min_ce":
        score = window_mean(lp, window).masked_fill(~kept, float("-inf"))
        w = F.one_hot(score.argmax(-1), gold.shape[-1]).float()
        return w * kept.any(-1, keepdim=True)
    if strategy == "avg_ce":
        return masked_softmax(lp.exp(), kept)
    if strategy == "softmax_ce":
        return masked_softmax(lp, kept)
    if strategy == "uniform":
        return _renormalise(kept.float())
    raise ValueError(f"`strategy` {strategy!r} has no per-token weights; use uniform, min_ce, avg_ce or softmax_ce.")


def token_mixture_nll(gold: Tensor, gate: Tensor, mask: Tensor) -> Tensor:
    """Per-position selector objective ``mean_t -log sum_k g_{t,k} P_k(y_t)`` (``gate`` ``[B, L, N]``, 0 where a
    source is unavailable; ``mask`` ``[B, L]`` the positions with a gold next token)."""
    log_gate = gate.clamp_min(1e-12).log().masked_fill(gate <= 0, float("-inf"))
    mix = torch.logsumexp(gold + log_gate, dim=-1)
    mix = torch.where(mask, mix, torch.zeros_like(mix))
    return -mix.sum() / mask.sum().clamp_min(1)


def row_shares(token_weights: Tensor, mask: Tensor) -> Tensor:
    """``[B, N]`` the share of each row's gold positions taught by each source (mean per-token weight)."""
    m = mask.unsqueeze(-1).float()
    return (token_weights * m).sum(1) / m.sum(1).clamp_min(1)


def token_selection(
    strategy: str,
    selection: Selection,
    outputs: Sequence[SourceOutput],
    mask: Tensor,
    gate_net: TokenGate | None = None,
    hidden: Tensor | None = None,
    ran: Tensor | None = None,
    window: int = 1,
) -> Selection:
    """The per-token selection of one batch, from the per-sequence one (which sources are kept for each row).

    Returns a ``Selection`` whose ``weights`` are the per-row token shares (``[B, N]``, what evaluation reports), with
    ``token_weights`` ``[B, L, N]`` (distilled) and, for ``adaptive``, ``token_gate`` ``[B, L, N]`` (the dense gate
    over every source that ran on the row: the mixture likelihood's and the feedback loss's input).
    """
    gold = gold_logprobs(outputs)
    rows = selection.mask if strategy == "adaptive" else torch.ones_like(selection.mask)
    kept = availability(gold, rows)
    kept = kept | (~kept.any(-1, keepdim=True) & rows.unsqueeze(1))  # a row's positions without any output: as today
    gate = None
    if strategy == "adaptive":
        ran_rows = ran if ran is not None else torch.ones_like(selection.mask)
        ran_avail = availability(gold, ran_rows | selection.mask)
        signals, centred = source_signals(outputs, gold, ran_avail)
        logits = gate_net(hidden, signals if gate_net.features != "hidden" else None, centred)
        gate = masked_softmax(logits, ran_avail)
        token_weights = _renormalise(masked_softmax(logits, kept))
    else:
        token_weights = fixed_token_weights(strategy, gold, kept, window)
    return Selection(selection.gate, selection.mask, row_shares(token_weights, mask), token_weights, gate)


def flat_positions(values: Tensor, mask: Tensor) -> Tensor:
    """``[T, N]`` the rows of ``[B, L, N]`` at the positions of ``mask`` ``[B, L]``."""
    return values[mask]
