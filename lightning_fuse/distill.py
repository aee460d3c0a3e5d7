"""Sparse distillation losses: a divergence between a sparse teacher and the full student, at any temperature.

The teacher ``P`` is known on its support ``S`` (``m`` ids: log-probs normalised over the full vocabulary of ``V``
ids) plus the mass ``p_o = 1 - sum_S p`` of its tail, whose shape is unknown. The student ``Q = softmax(z)`` is
known everywhere. What we want is the dense tempered divergence ``T^2 D(P_T || Q_T)`` with
``P_T ∝ P^(1/T)`` and ``Q_T = softmax(z / T)`` over the full vocabulary (Hinton et al.'s distillation at T).

Derivation of the sparse loss (forward KL, reverse KL and JSD are f-divergences, so all of this holds for each):

1. Coarsening. Merge the tail into one "other" outcome. By the data-processing inequality, for every teacher
   ``D(coarse(P_T) || coarse(Q_T)) <= D(P_T || Q_T)``. ``coarse(Q_T)`` is exact: ``Q_T`` on ``S`` and its tail mass
   ``exp(logsumexp_{i not in S}(z_i / T) - logsumexp(z / T))``, taken in log space so it never cancels to 0.
2. The tempered teacher's tail is unknown but bounded. ``coarse(P_T) = ((1 - r) s, r)`` with
   ``s = softmax(log p_S / T)`` (exact: the tempered shape on the support does not depend on the tail) and
   ``r = t / (sum_S p^(1/T) + t)``, where ``t = sum_tail p_j^(1/T)`` over the ``n = V - m`` tail ids whose masses
   sum to ``p_o``. ``x -> x^(1/T)`` is concave for T > 1 and convex for T < 1, so ``t`` lies between the tail as
   one bucket, ``p_o^(1/T)``, and the tail spread evenly, ``n^(1 - 1/T) p_o^(1/T)``: ``r`` lies in an interval
   ``[r_lo, r_hi]`` known from the teacher alone. At T = 1 the interval is the point ``r = p_o``.
3. The loss is the smallest coarse divergence over that interval:
   ``T^2 min_{r in [r_lo, r_hi]} D(((1 - r) s, r) || coarse(Q_T))``. It is at most the coarse divergence at the
   true ``r``, hence (1.) a lower bound of the dense tempered divergence for every possible tail; it is 0 when the
   student equals the teacher; it grows with ``k`` (a larger support refines the coarsening and narrows the
   interval) and equals the dense divergence once ``n <= 1`` (``k >= V - 1``). ``D`` is convex in ``r``, so the
   minimiser is the unconstrained one clipped to the interval: forward KL ``logit(r*) = log q_o - log Q_S +
   KL(s || q_S / Q_S)``, reverse KL ``r* = q_o``, JSD by bisection of its derivative. ``r*`` is computed without
   gradient; by the envelope theorem the gradient of the minimum is the gradient at ``r*``.

At T = 1 this is the previous loss (the support and the tail as one bucket) with the student's tail in log space.
Tempering the teacher inside its support only while keeping its tail mass (the old definition) is not a lower bound
(k = 5, T = 2: 3.53 against a dense 2.55) and drives a free student's tail mass to 0 as T grows.

Several sources: the fused teacher's support probabilities count only the sources whose top-k holds the id; the
rest of each source's mass is in the tail bucket, as at T = 1. For one source (or one kept source) every step
above is exact and the bound is rigorous.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_fuse.student import StudentStats, student_stats

if TYPE_CHECKING:
    from lightning_fuse.fusion import SparseDist

DistillLoss = Literal["forward_kl", "reverse_kl", "jsd"]
DISTILL_LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
_EPS = 1e-12
_BISECTION_STEPS = 40


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative x (``-inf`` at ``x = 0``)."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_interval(teacher_logprobs: Tensor, valid: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor, ...]:
    """The tempered teacher on its support: ``(log s [B, L, M], r_lo [B, L], r_hi [B, L])`` (see the module docstring).

    ``s`` is the tempered shape on the support (``-inf`` on empty slots); ``[r_lo, r_hi]`` bounds the tempered tail
    mass over every tail of mass ``p_o`` spread on the ``V - m`` ids outside the support.
    """
    t = temperature
    lp = teacher_logprobs.to(torch.promote_types(teacher_logprobs.dtype, torch.float32)).masked_fill(~valid, float("-inf"))
    log_s_unnorm = lp / t
    log_sum_t = torch.logsumexp(log_s_unnorm, -1)  # log sum_S p^(1/T)
    log_s = (log_s_unnorm - log_sum_t.unsqueeze(-1)).masked_fill(~valid, float("-inf"))
    log_p_o = _log1mexp(torch.logsumexp(lp, -1))  # -inf when the support holds all the mass
    n = (vocab_size - valid.sum(-1)).clamp_min(0).to(lp.dtype)
    log_bucket = log_p_o / t
    log_even = (1.0 - 1.0 / t) * n.clamp_min(1).log() + log_p_o / t
    r_bucket = torch.sigmoid(log_bucket - log_sum_t)
    r_even = torch.sigmoid(log_even - log_sum_t)
    no_tail = (n == 0) | torch.isneginf(log_p_o)
    r_lo = torch.minimum(r_bucket, r_even).masked_fill(no_tail, 0.0)
    r_hi = torch.maximum(r_bucket, r_even).masked_fill(no_tail, 0.0)
    return log_s, r_lo, r_hi


def _jsd_slope(r: Tensor, s: Tensor, log_s: Tensor, q: Tensor, q_o: Tensor) -> Tensor:
    """``d JSD(((1 - r) s, r) || (q, q_o)) / d r`` (twice it; increasing in r)."""
    p = (1 - r).unsqueeze(-1) * s
    inner = torch.where(s > 0, s * (math.log(2) + torch.log1p(-r).unsqueeze(-1) + log_s - torch.log(p + q)), 0.0)
    return math.log(2) + torch.log(r) - torch.log(r + q_o) - inner.sum(-1)


@torch.no_grad()
def _best_r(kind: str, log_s: Tensor, r_lo: Tensor, r_hi: Tensor, log_q: Tensor, log_q_o: Tensor) -> Tensor:
    """The minimiser over ``[r_lo, r_hi]`` of the coarse divergence (``[B, L]``, no gradient)."""
    dtype = torch.promote_types(log_s.dtype, log_q.dtype)
    log_s, r_lo, r_hi, log_q, log_q_o = (x.to(dtype) for x in (log_s, r_lo, r_hi, log_q, log_q_o))
    if kind == "reverse_kl":
        r = log_q_o.exp()
    elif kind == "forward_kl":
        log_q_sup = torch.logsumexp(log_q, -1)
        s = log_s.exp()
        kl = torch.where(s > 0, s * (log_s - log_q + log_q_sup.unsqueeze(-1)), 0.0).sum(-1)
        r = torch.sigmoid(log_q_o - log_q_sup + kl)
    else:
        s, q, q_o = log_s.exp(), log_q.exp(), log_q_o.exp()
        lo, hi = r_lo.clone(), r_hi.clone()
        open_ = (hi > lo) & (lo < 1)
        if bool(open_.any()):
            info = torch.finfo(dtype)
            lo_, hi_ = lo.clamp(info.tiny, 1 - info.eps), hi.clamp(info.tiny, 1 - info.eps)
            for _ in range(_BISECTION_STEPS):
                mid = 0.5 * (lo_ + hi_)
                up = _jsd_slope(mid, s, log_s, q, q_o) > 0  # minimum to the left of mid
                hi_ = torch.where(up, mid, hi_)
                lo_ = torch.where(up, lo_, mid)
            r = torch.where(open_, 0.5 * (lo_ + hi_), lo)
        else:
            r = lo
    return torch.minimum(torch.maximum(r, r_lo), r_hi)


def distill_loss(
    student_logits: Tensor,
    teacher: SparseDist,
    mask: Tensor,
    kind: DistillLoss = "forward_kl",
    temperature: float = 1.0,
    student_logprobs: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean tempered divergence between the sparse teacher ``P`` and the student ``Q`` where ``mask`` is True.

    Args:
        student_logits: ``[B, L, V]`` target logits.
        teacher: sparse teacher (fused distribution), ``[B, L, M]``; its ids must be distinct (``fuse`` merges
            duplicates), ``-1`` marks an empty slot.
        mask: ``[B, L]`` bool, positions that have a gold next token.
        kind: ``forward_kl`` = KL(P || Q) (soft-target CE up to P's entropy), ``reverse_kl`` = KL(Q || P),
            ``jsd`` = Jensen-Shannon divergence.
        temperature: T > 0; the loss is ``T^2`` times the divergence between the tempered distributions, the
            tightest lower bound of the dense one that the teacher's support and tail mass allow (module docstring).
        student_logprobs: ``log_softmax(student_logits)``, accepted in place of the logits (same result: the
            student's normalisers are recomputed chunk by chunk either way).
        chunk_size: positions per chunk for the student's statistics (``lightning_fuse.student.student_stats``).

    Returns:
        A scalar; 0 (with a gradient path) if ``mask`` is all False.
    """
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"`distill_loss` can be {', '.join(DISTILL_LOSSES)}, got {kind!r}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    z = student_logprobs if student_logprobs is not None else student_logits
    stats = student_stats(z, teacher.ids, temperature, teacher.ids, chunk_size=chunk_size)
    return sparse_divergence(stats, teacher, mask, kind, temperature, z.shape[-1])


def sparse_divergence(
    stats: StudentStats, teacher: SparseDist, mask: Tensor, kind: DistillLoss, temperature: float, vocab_size: int
) -> Tensor:
    """``distill_loss`` from the student's statistics: ``stats.picked`` holds the logits at ``teacher.ids`` and
    ``stats.log_z_out`` excludes them (``student_stats(z, teacher.ids, T, teacher.ids)``)."""
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"`distill_loss` can be {', '.join(DISTILL_LOSSES)}, got {kind!r}.")
    t = float(temperature)
    valid = teacher.ids >= 0
    log_q = (stats.picked / t - stats.log_z_t.unsqueeze(-1)).masked_fill(~valid, float("-inf"))
    log_q_o = stats.log_z_out - stats.log_z_t
    log_s, r_lo, r_hi = tail_interval(teacher.logprobs.detach(), valid, vocab_size, t)
    r = _best_r(kind, log_s, r_lo, r_hi, log_q.detach(), log_q_o.detach()).to(log_s.dtype)
    log_p = torch.cat([log_s + torch.log1p(-r).unsqueeze(-1), r.log().unsqueeze(-1)], -1).to(log_q.dtype)
    log_q_all = torch.cat([log_q, log_q_o.unsqueeze(-1)], -1)
    p, q = log_p.exp(), log_q_all.exp()
    if kind == "forward_kl":
        per_pos = torch.where(p > 0, p * (log_p - log_q_all), 0.0).sum(-1)
    # the where() goes inside the product: q * (-inf - x) at q = 0 (an empty student tail, k >= V) has a NaN gradient
    elif kind == "reverse_kl":  # where the teacher has exactly 0 (and the student not) its log-prob is log(1e-12)
        log_p_floor = torch.where(torch.isneginf(log_p), math.log(_EPS), log_p)
        per_pos = (q * torch.where(q > 0, log_q_all - log_p_floor, 0.0)).sum(-1)
    else:
        both = (p == 0) & (q == 0)  # logaddexp(-inf, -inf) has a NaN gradient: a finite stand-in, weighted 0 below
        log_m = torch.logaddexp(log_p.masked_fill(both, 0.0), log_q_all.masked_fill(both, 0.0)) - math.log(2)
        per_pos = 0.5 * torch.where(p > 0, p * (log_p - log_m), 0.0).sum(-1)
        per_pos = per_pos + 0.5 * (q * torch.where(q > 0, log_q_all - log_m, 0.0)).sum(-1)
    count = mask.sum()
    return (per_pos * mask).sum() / count.clamp_min(1) * t**2
