"""How close two runs of one source are: e.g. the same source in 8-bit (bitsandbytes) vs bf16, or on two devices.

Both runs give a :class:`~lightning_fuse.fusion.SourceOutput` (top-k ids and log-probs, gold log-probs, CE) on the
same batch; :func:`output_agreement` compares them on the positions that have a gold next token.

Example::

    eight = FrozenSource.load(SourceSpec("s", path, load_in_8bit=True), device)
    bf16 = FrozenSource.load(SourceSpec("s", path, load_in_8bit=False, dtype="bfloat16"), device).to(device)
    a = eight.forward(ids, mask, labels, top_k=5, vocab_size=V)
    b = bf16.forward(ids, mask, labels, top_k=5, vocab_size=V)
    output_agreement(a, b, next_token_mask(labels))   # Agreement(top1=0.98, ...)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_fuse.fusion import SourceOutput

__all__ = ["Agreement", "output_agreement"]


@dataclass(frozen=True)
class Agreement:
    """Closeness of run ``a`` to reference run ``b`` over the ``P`` compared positions."""

    positions: int
    """Positions compared (those with a gold next token)."""
    top1: float
    """Share of positions whose most likely id is the same."""
    top1_clear: float
    """The same, over the positions where ``b``'s top-1 leads its top-2 by at least ``margin`` nats (near-ties
    may flip under any rounding; 1.0 when there is no such position)."""
    topk_overlap: float
    """Mean share of ``b``'s top-k ids that are also in ``a``'s top-k."""
    max_abs_topk_logprob: float
    """Max over positions and ranks j of ``|a.logprobs[j] - b.logprobs[j]|`` (the j-th largest log-probs)."""
    mean_abs_gold_logprob: float
    """Mean ``|a.gold_logprob - b.gold_logprob|`` (full-vocabulary log-prob of the gold token)."""
    max_abs_gold_logprob: float
    """Max of the same."""
    max_rel_ce: float
    """Max over sequences of ``|a.ce - b.ce| / b.ce``."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def output_agreement(a: SourceOutput, b: SourceOutput, mask: Tensor, margin: float = 0.5) -> Agreement:
    """Compare source output ``a`` with the reference ``b`` (same batch, same ``top_k``) where ``mask`` (``[B, L]``
    bool, e.g. ``next_token_mask(labels)``) is set.

    Raises:
        ValueError: the two outputs do not have the same shapes, or ``mask`` selects no position.
    """
    if a.dist.ids.shape != b.dist.ids.shape:
        raise ValueError(f"outputs differ in shape: {tuple(a.dist.ids.shape)} vs {tuple(b.dist.ids.shape)} "
                         "(run both on the same batch with the same top_k)")  # fmt: skip
    mask = mask.to(a.dist.ids.device).bool()
    if not mask.any():
        raise ValueError("`mask` selects no position: pass next_token_mask(labels) of a batch with gold tokens")
    ids_a, ids_b = a.dist.ids[mask], b.dist.ids[mask].to(a.dist.ids.device)  # [P, k]
    lp_a, lp_b = a.dist.logprobs[mask].float(), b.dist.logprobs[mask].float().to(ids_a.device)
    same = ids_a[:, 0] == ids_b[:, 0]
    clear = (lp_b[:, 0] - lp_b[:, 1] >= margin) if lp_b.shape[1] > 1 else torch.ones_like(same)
    overlap = (ids_b.unsqueeze(-1) == ids_a.unsqueeze(-2)).any(-1).float().mean(-1)
    gold = (a.gold_logprob.float() - b.gold_logprob.float().to(ids_a.device)).abs()[mask]
    ce_b = b.ce.float().to(ids_a.device)
    rel_ce = (a.ce.float() - ce_b).abs() / ce_b.abs().clamp_min(1e-6)
    return Agreement(
        positions=int(mask.sum()),
        top1=float(same.float().mean()),
        top1_clear=float(same[clear].float().mean()) if clear.any() else 1.0,
        topk_overlap=float(overlap.mean()),
        max_abs_topk_logprob=float((lp_a - lp_b).abs().max()),
        mean_abs_gold_logprob=float(gold.mean()),
        max_abs_gold_logprob=float(gold.max()),
        max_rel_ce=float(rel_ce.max()),
    )
