"""Dense distillation: when every source keeps the whole vocabulary (``distill_top_k >= V``, same tokenizer).

Then the sparse machinery (a V-wide support pushed through ``fuse``, the "other" bucket, the tail interval and the
student's statistics outside the support) only recomputes the dense divergence the slow way. This module computes
it directly, as TRL's GKD does (``log_softmax`` of both sides over V, one KL per position), in one chunked pass:

- ``dense_teacher``: the fused teacher's log-probs ``[B, L, V]``, the weighted mixture of the sources' dense
  distributions ``log(sum_k w_k P_k / sum_k w_k)`` (one source: its own log-probs, no copy), tempered
  (``log_softmax(log P / T)``) when ``T != 1``;
- ``dense_losses``: from the student's logits (or its hidden state and LM head, applied one chunk of positions at a
  time as in ``lightning_fuse.student``), the gold log-prob (for the CE) and ``T^2 D(P_T || Q_T)`` per position, with
  a hand-written backward that recomputes each chunk's softmax: the gradient of the divergence in the tempered
  logits is ``q * (h - <q, h>)`` with ``h = dD/dq`` (forward KL: ``q - p``; reverse KL: ``q (log q - log p - D)``;
  JSD: ``h = log(q / m) / 2``), so no ``[B, L, V]`` autograd graph is kept.

There is no "other" bucket: the loss is the dense divergence itself (TRL GKD's at beta 0, lmbda 0, to float32
rounding; ``tests/test_peers.py``), not a lower bound of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_fuse.distill import sparse_divergence
from lightning_fuse.fusion import SourceOutput, SparseDist
from lightning_fuse.logits import default_chunk_size
from lightning_fuse.student import StudentStats, _backprop_chunk, _chunk_logits, student_stats

_LOG_EPS = math.log(1e-12)  # reverse KL: the floor of a teacher log-prob that is exactly -inf (as in distill.py)


def all_dense(outputs: list[SourceOutput]) -> bool:
    """Whether every source's distribution covers the whole vocabulary in id order (``SparseDist.dense``)."""
    return bool(outputs) and all(o.dist.dense for o in outputs)


def dense_teacher(outputs: list[SourceOutput], weights: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(log P_T [B, L, V], has_teacher [B, L] bool)``: the fused, tempered teacher over the whole vocabulary.

    ``weights``: ``[B, N]`` per sequence or ``[B, L, N]`` per position; the mixture is normalised by their sum, and
    rows (positions) whose weights are all 0 have no teacher (``has_teacher`` False: no distillation there).
    """
    w = (weights[:, None, :] if weights.dim() == 2 else weights).detach()  # [B, 1 or L, N]
    total = w.sum(-1)
    b, length = outputs[0].dist.logprobs.shape[:2]
    has_teacher = (total > 0).expand(b, length)
    if len(outputs) == 1:
        log_p = outputs[0].dist.logprobs
    else:
        log_w = (w / total.clamp_min(1e-30).unsqueeze(-1)).log()  # -inf for weight 0
        log_p = outputs[0].dist.logprobs + log_w[..., :1]
        for i in range(1, len(outputs)):
            log_p = torch.logaddexp(log_p, outputs[i].dist.logprobs + log_w[..., i : i + 1])
    if temperature != 1.0:
        log_p = torch.log_softmax(log_p / temperature, dim=-1)
    return log_p, has_teacher


def _divergence(kind: str, log_q: Tensor, log_p: Tensor) -> Tensor:
    """``[R]`` D(P || Q) per row of dense log-probs (``forward_kl``, ``reverse_kl`` or ``jsd``)."""
    if kind == "forward_kl":
        return torch.where(torch.isneginf(log_p), 0.0, log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - torch.where(torch.isneginf(log_p), _LOG_EPS, log_p))).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    p_part = torch.where(torch.isneginf(log_p), 0.0, log_p.exp() * (log_p - log_m))
    return 0.5 * (p_part + log_q.exp() * (log_q - log_m)).sum(-1)


def _divergence_grad(kind: str, log_q: Tensor, log_p: Tensor, div: Tensor) -> Tensor:
    """``[R, V]`` dD/d(tempered logits) = ``q * (h - <q, h>)`` with ``h = dD/dq`` (module docstring)."""
    q = log_q.exp()
    if kind == "forward_kl":
        return q - log_p.exp()
    if kind == "reverse_kl":
        return q * (log_q - torch.where(torch.isneginf(log_p), _LOG_EPS, log_p) - div.unsqueeze(-1))
    h = 0.5 * (log_q - torch.logaddexp(log_p, log_q) + math.log(2))
    return q * (h - (q * h).sum(-1, keepdim=True))


def _fast(temperature: float, kind: str) -> bool:
    """Forward KL at T = 1, the common case (TRL GKD's loss): its own lean kernels below."""
    return temperature == 1.0 and kind == "forward_kl"


def _forward_kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``[R]`` KL(P || Q) = ``<p, log p - log q>``: 0 where ``p`` is 0 (``log p`` -inf), one dot product per row."""
    d = (log_p - log_q).nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)  # -inf - -inf and -inf - x: p = 0 there
    return torch.linalg.vecdot(log_p.exp(), d)


class _DenseLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, teacher, gold, temperature, kind, step):  # type: ignore[override]
        n = rows.shape[0]
        work = torch.promote_types(rows.dtype if weight is None else weight.dtype, torch.float32)
        gold_lp = rows.new_empty(n, dtype=work)
        div = rows.new_empty(n, dtype=work)
        kept = None  # one chunk only: keep its log-softmax for the backward pass (no recompute)
        for start in range(0, n, step):
            s = slice(start, start + step)
            log_q1 = torch.log_softmax(_chunk_logits(rows, weight, bias, s, work), -1)  # T = 1: the CE's
            gold_lp[s] = log_q1.gather(-1, gold[s]).squeeze(-1)
            if _fast(temperature, kind):
                div[s] = _forward_kl_rows(log_q1, teacher[s].to(work))
            else:
                log_q = torch.log_softmax(_chunk_logits(rows, weight, bias, s, work) / temperature, -1)
                div[s] = _divergence(kind, log_q, teacher[s].to(work))
                del log_q
            if n <= step:
                kept = log_q1
            del log_q1
        saved = [rows, teacher, gold, div] + [t for t in (weight, bias, kept) if t is not None]
        ctx.save_for_backward(*saved)
        ctx.flags = (temperature, kind, step, weight is not None, bias is not None, kept is not None, work)
        return gold_lp, div

    @staticmethod
    def backward(ctx, g_gold, g_div):  # type: ignore[override]
        temperature, kind, step, has_weight, has_bias, has_kept, work = ctx.flags
        rows, teacher, gold, div, *rest = ctx.saved_tensors
        weight = rest.pop(0) if has_weight else None
        bias = rest.pop(0) if has_bias else None
        kept = rest.pop(0) if has_kept else None
        zeros = div.new_zeros(div.shape)
        g_gold, g_div = (zeros if g is None else g for g in (g_gold, g_div))
        t = temperature
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=work) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=work) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.no_grad():
            for start in range(0, rows.shape[0], step):
                s = slice(start, start + step)
                log_q1 = kept if kept is not None else torch.log_softmax(_chunk_logits(rows, weight, bias, s, work), -1)
                if _fast(t, kind):  # q (g_div - g_gold) - p g_div + g_gold at the gold id
                    g = log_q1.exp().mul_((g_div[s] - g_gold[s]).unsqueeze(-1))
                    g.addcmul_(teacher[s].to(work).exp(), g_div[s, None], value=-1.0)
                else:
                    log_q = torch.log_softmax(_chunk_logits(rows, weight, bias, s, work) / t, -1)
                    g = _divergence_grad(kind, log_q, teacher[s].to(work), div[s]).mul_(g_div[s, None] / t)
                    g.addcmul_(log_q1.exp(), g_gold[s, None], value=-1.0)
                    del log_q
                g.scatter_add_(-1, gold[s], g_gold[s, None])
                del log_q1
                _backprop_chunk(g, rows, weight, s, work, grad_rows, grad_w, grad_b)
        return (grad_rows, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def dense_losses(
    inputs: Tensor,
    teacher_logprobs: Tensor,
    gold: Tensor,
    mask: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    head_weight: Tensor | None = None,
    head_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(gold_logprob [B, L], kd)``: the student's log-prob of the gold tokens (the CE's) and the distillation.

    Args:
        inputs: ``[B, L, V]`` student logits, or ``[B, L, H]`` hidden states with ``head_weight`` ``[V, H]``.
        teacher_logprobs: ``[B, L, V]`` the (tempered) teacher's log-probs (``dense_teacher``); no gradient.
        gold: ``[B, L]`` int64 gold next tokens (any valid id where ``mask`` is False).
        mask: ``[B, L]`` bool, positions distilled (a gold next token and a teacher).
        kind: ``forward_kl`` KL(P || Q), ``reverse_kl`` KL(Q || P) or ``jsd``; temperature: T > 0 (the loss is
            ``T^2 D(P_T || Q_T)``, the teacher already tempered).
        chunk_size: positions per chunk; None = ``default_chunk_size(V)``.

    Returns:
        ``log_softmax(z)`` at the gold ids and the mean divergence over ``mask`` (0 with a gradient path when
        ``mask`` is all False).
    """
    b, length, width = inputs.shape
    vocab = width if head_weight is None else head_weight.shape[0]
    if teacher_logprobs.shape != (b, length, vocab):
        raise ValueError(f"`teacher_logprobs` must be [B, L, V] = {[b, length, vocab]}, got {list(teacher_logprobs.shape)}.")
    step = chunk_size or default_chunk_size(vocab)
    gold_lp, div = _DenseLosses.apply(
        inputs.reshape(b * length, width), head_weight, head_bias, teacher_logprobs.detach().reshape(b * length, vocab),
        gold.reshape(b * length, 1).long().clamp(0, vocab - 1), float(temperature), kind, step,
    )
    div = div.view(b, length)
    kd = (div * mask).sum() / mask.sum().clamp_min(1) * temperature**2
    return gold_lp.view(b, length), kd


def distill_terms(
    outputs: list[SourceOutput],
    weights: Tensor,
    inputs: Tensor,
    head: tuple[Tensor | None, Tensor | None],
    gold: Tensor,
    mask: Tensor,
    kind: str,
    temperature: float,
    fuse: Callable[[list[SourceOutput], Tensor], SparseDist],
    dense_ok: bool = True,
) -> tuple[StudentStats, Tensor]:
    """The student's statistics for the CE (``picked[..., 0]`` the gold logit, ``log_z``) and the distillation loss
    against the sources fused with ``weights``: dense (this module) when every source covers the vocabulary and
    ``dense_ok`` (the module's fusion is the default mixture), else sparse (``fuse``, then one chunked pass of
    ``student_stats`` for both and ``lightning_fuse.distill.sparse_divergence``)."""
    if dense_ok and all_dense(outputs):
        log_p, has_teacher = dense_teacher(outputs, weights, temperature)
        gold_lp, kd = dense_losses(inputs, log_p, gold, mask & has_teacher, kind, temperature, *head)
        zero = torch.zeros_like(gold_lp)  # picked - log_z is the gold log-prob: normalised logits, log_z = 0
        return StudentStats(zero, zero, None, gold_lp.unsqueeze(-1)), kd
    teacher = fuse(outputs, weights)
    stats = student_stats(inputs, torch.cat([gold.unsqueeze(-1), teacher.ids], -1), temperature, teacher.ids,
                          head_weight=head[0], head_bias=head[1])
    vocab = inputs.shape[-1] if head[0] is None else head[0].shape[0]
    kd_stats = StudentStats(stats.log_z, stats.log_z_t, stats.log_z_out, stats.picked[..., 1:])
    return stats, sparse_divergence(kd_stats, teacher, mask, kind, temperature, vocab)
