"""The adaptive selection network: scores every source for each sequence and keeps the top-K.

Features per sequence (``B`` rows): the sources' rewards ``exp(-CE_k)`` on the gold tokens and their centred logs (``[B, 2N]``) and/or the
target's mean-pooled last hidden state (``[B, H]``, detached: the selector does not train the target).

CE prior (default whenever the selector sees rewards): ``logits = MLP(features) + s * (mean_j CE_j - CE_k)`` with the
MLP's output layer zero-initialised and ``s`` (trainable) starting at 1. At step 0 the gate is ``softmax(-CE)``
(the ``softmax_ce`` baseline's weights; FuseLLM's AvgCE, ``softmax(exp(-CE))``, is much flatter; FuseLLM has no
selector) and its top-1 is min_ce's choice, so the target never distils from sources an untrained
selector picked at random; the MLP then learns corrections from the mixture likelihood and the feedback loss.
Measured in ``benchmarks/quality.py``: without the prior a randomly initialised selector costs ~0.2 nats of
interference in a 300-step distillation-heavy run; with it, interference is at or below min_ce's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

SelectorFeatures = Literal["rewards", "hidden", "both"]


@dataclass
class Selection:
    """One batch's selection.

    Attributes:
        gate: ``[B, N]`` softmax scores (differentiable w.r.t. the selector).
        mask: ``[B, N]`` bool, the kept sources (top-K or ``gate >= threshold``, always at least the argmax).
        weights: ``[B, N]`` ``gate * mask`` renormalised over the kept sources (rows sum to 1); with per-token
            selection, each source's share of the row's gold positions.
        token_weights: ``[B, L, N]`` per-position fusion weights (per-token selection only, else None).
        token_gate: ``[B, L, N]`` the per-position gate over every source that ran (adaptive per-token only).
    """

    gate: Tensor
    mask: Tensor
    weights: Tensor
    token_weights: Tensor | None = None
    token_gate: Tensor | None = None


class Selector(nn.Module):
    """MLP scoring ``num_sources`` sources from per-sequence features.

    Args:
        num_sources: N, the number of sources scored.
        hidden_size: the target's hidden size H (used when ``features`` includes ``hidden``).
        features: which signals the selector sees: ``rewards`` (exp(-CE) of each source), ``hidden`` (pooled
            target hidden state; lets the selector decide before the sources run), or ``both``.
        width: width of the MLP's hidden layer.
        top_k: how many sources to keep per sequence (1 <= top_k <= num_sources).
        threshold: if set, keep every source with ``gate >= threshold`` (in (0, 1]) instead of the top-K.
        prior: add the CE prior ``s * (mean CE - CE_k)`` to the logits and start the MLP's output at zero (see the
            module docstring). Needs rewards (``features`` rewards or both); ignored for ``hidden``.
        relative_threshold: if set (in (0, 1]), a source kept by the top-K / threshold is dropped when its gate is
            below ``relative_threshold`` x the row's largest gate, so that a source much worse than the best one
            never gets a large weight (with the CE prior, 0.5 drops a source ~0.7 nats per token worse at step 0).
    """

    def __init__(
        self,
        num_sources: int,
        hidden_size: int,
        features: SelectorFeatures = "both",
        width: int = 64,
        top_k: int = 2,
        threshold: float | None = None,
        prior: bool = True,
        relative_threshold: float | None = None,
    ) -> None:
        super().__init__()
        if num_sources < 1:
            raise ValueError(f"The selector needs at least one source, got num_sources={num_sources}.")
        if not 1 <= top_k <= num_sources:
            raise ValueError(
                f"`--model.top_k` must be between 1 and the number of sources ({num_sources}), got {top_k}. "
                "Lower top_k or declare more sources."
            )
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"`--model.threshold` must be in (0, 1], got {threshold}.")
        if relative_threshold is not None and not 0.0 < relative_threshold <= 1.0:
            raise ValueError(f"`--model.relative_threshold` must be in (0, 1] (or null: off), got {relative_threshold}.")
        if features not in ("rewards", "hidden", "both"):
            raise ValueError(f"`--model.selector_features` can be rewards, hidden, both, got {features!r}.")
        self.num_sources = num_sources
        self.features = features
        self.top_k = top_k
        self.threshold = threshold
        self.relative_threshold = relative_threshold
        in_dim = (2 * num_sources if features != "hidden" else 0) + (hidden_size if features != "rewards" else 0)
        self.hidden_norm = nn.LayerNorm(hidden_size) if features != "rewards" else None
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, num_sources))
        self.prior = prior and features != "hidden"
        if self.prior:
            self.prior_scale = nn.Parameter(torch.ones(1))  # shape [1], not a scalar: FSDP2 shards along dim 0
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, rewards: Tensor | None = None, hidden: Tensor | None = None) -> Tensor:
        """Logits ``[B, N]`` from rewards ``[B, N]`` and/or pooled hidden states ``[B, H]``."""
        parts, centred = [], None
        if self.features != "hidden":
            if rewards is None:
                raise ValueError(f"This selector (features={self.features!r}) needs the sources' rewards.")
            rewards = rewards.float()
            log_r = rewards.clamp_min(1e-30).log()  # = -CE_k; centred, it is a scale-free relative signal
            centred = log_r - log_r.mean(-1, keepdim=True)
            parts += [rewards, centred]
        if self.features != "rewards":
            if hidden is None:
                raise ValueError(f"This selector (features={self.features!r}) needs the target's hidden states.")
            parts.append(self.hidden_norm(hidden.float()))
        logits = self.mlp(torch.cat(parts, dim=-1))
        if self.prior:
            logits = logits + self.prior_scale * centred
        return logits

    def select(self, logits: Tensor) -> Selection:
        """Gate, kept-source mask and renormalised fusion weights from logits ``[B, N]``."""
        gate = torch.softmax(logits.float(), dim=-1)
        mask = torch.zeros_like(gate, dtype=torch.bool)
        mask.scatter_(-1, gate.argmax(-1, keepdim=True), True)
        if self.threshold is not None:
            mask |= gate >= self.threshold
        else:
            mask.scatter_(-1, gate.topk(self.top_k, dim=-1).indices, True)
        if self.relative_threshold is not None:  # the argmax always passes (its ratio is 1)
            mask &= gate >= self.relative_threshold * gate.amax(-1, keepdim=True)
        kept = gate * mask
        return Selection(gate, mask, kept / kept.sum(-1, keepdim=True))

    @torch.no_grad()
    def grow(self, num_sources: int) -> None:
        """Add output rows for new sources: old sources keep their scores, new ones start neutral (mean logit)."""
        if num_sources < self.num_sources:
            raise ValueError(f"The selector can only grow: it scores {self.num_sources} sources, asked {num_sources}.")
        if num_sources == self.num_sources:
            return
        extra = num_sources - self.num_sources
        old_out: nn.Linear = self.mlp[-1]
        new_out = nn.Linear(old_out.in_features, num_sources).to(old_out.weight)
        new_out.weight.zero_()
        new_out.weight[: self.num_sources] = old_out.weight
        new_out.weight[self.num_sources :] = old_out.weight.mean(0, keepdim=True)
        new_out.bias[: self.num_sources] = old_out.bias
        new_out.bias[self.num_sources :] = old_out.bias.mean()
        self.mlp[-1] = new_out
        if self.features != "hidden":
            old_in: nn.Linear = self.mlp[0]
            n_old = self.num_sources  # input columns: [rewards (N) | centred log-rewards (N) | hidden (H)]
            new_in = nn.Linear(old_in.in_features + 2 * extra, old_in.out_features).to(old_in.weight)
            new_in.weight.zero_()
            new_in.weight.zero_()
            new_in.weight[:, :n_old] = old_in.weight[:, :n_old]
            new_in.weight[:, num_sources : num_sources + n_old] = old_in.weight[:, n_old : 2 * n_old]
            new_in.weight[:, 2 * num_sources :] = old_in.weight[:, 2 * n_old :]
            new_in.bias.copy_(old_in.bias)
            self.mlp[0] = new_in
        self.num_sources = num_sources
