"""The student side of the losses, chunked: normalisers and picked logits of the target, never ``[B, L, V]`` float32.

``student_stats`` takes either the target's logits ``[B, L, V]`` or its last hidden state ``[B, L, H]`` with the LM
head's weight (then the logits are computed one chunk of positions at a time, in the forward and again in the
backward pass, and never exist as a whole: peak memory O(chunk x V) instead of O(B x L x V)). It returns what the
CE and the sparse distillation need:

- ``log_z = logsumexp(z)`` and ``log_z_t = logsumexp(z / T)`` per position;
- ``log_z_out = logsumexp(z / T)`` over the ids outside the teacher's support (the tempered student's tail in log
  space, never ``1 - sum(q)``, which cancels to 0 in float32 when the student is confident);
- ``picked = z`` at given ids per position (the gold token and the teacher's support).

The backward pass recomputes each chunk's softmaxes and adds the picked logits' gradients in the same chunk, so
the logits' gradient is one tensor (logits input) or none at all (hidden input: it goes straight into the hidden
state's and the head weight's gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fuse.logits import default_chunk_size


@dataclass
class StudentStats:
    """Per-position statistics of the student's logits z (``[B, L]`` each, ``picked`` ``[B, L, G]``)."""

    log_z: Tensor
    log_z_t: Tensor
    log_z_out: Tensor | None
    picked: Tensor


def _exclusion_mask(ids: Tensor, vocab: int) -> Tensor:
    """``[R, V]`` bool, True at the ids of each row (``-1`` entries exclude nothing)."""
    out = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(-1, ids.masked_fill(ids < 0, vocab), True)
    return out[:, :vocab]


def _chunk_logits(rows: Tensor, weight: Tensor | None, bias: Tensor | None, s: slice, work: torch.dtype) -> Tensor:
    x = rows[s] if weight is None else F.linear(rows[s].to(weight.dtype), weight, bias)
    return x.to(work)


class _Stats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, temperature, exclude, pick, step):  # type: ignore[override]
        n = rows.shape[0]
        vocab = rows.shape[1] if weight is None else weight.shape[0]
        source_dtype = rows.dtype if weight is None else weight.dtype
        work = torch.promote_types(source_dtype, torch.float32)  # float32, or float64 for float64 inputs
        log_z = rows.new_empty(n, dtype=work)
        log_z_t = rows.new_empty(n, dtype=work)
        log_z_out = rows.new_full((n,), float("nan"), dtype=work)
        picked = rows.new_empty(pick.shape, dtype=work)
        kept = None  # one chunk only: keep its logits for the backward pass (no recompute; still O(chunk x V))
        for start in range(0, n, step):
            s = slice(start, start + step)
            x = _chunk_logits(rows, weight, bias, s, work)
            log_z[s] = torch.logsumexp(x, -1)
            picked[s] = x.gather(-1, pick[s])
            xt = x / temperature if temperature != 1.0 else x
            log_z_t[s] = torch.logsumexp(xt, -1) if temperature != 1.0 else log_z[s]
            if exclude is not None:  # not in place: x may be the logits themselves
                log_z_out[s] = torch.logsumexp(xt.masked_fill(_exclusion_mask(exclude[s], vocab), float("-inf")), -1)
            if weight is not None and n <= step:
                kept = x
            del x, xt
        saved = [rows, log_z, log_z_t, log_z_out, pick]
        saved += [exclude] if exclude is not None else []
        saved += [weight] if weight is not None else []
        saved += [bias] if bias is not None else []
        saved += [kept] if kept is not None else []
        ctx.save_for_backward(*saved)
        ctx.flags = (temperature, step, exclude is not None, weight is not None, bias is not None, work, kept is not None)
        if exclude is None:
            ctx.mark_non_differentiable(log_z_out)
        return log_z, log_z_t, log_z_out, picked

    @staticmethod
    def backward(ctx, g_z, g_t, g_out, g_pick):  # type: ignore[override]
        temperature, step, has_exclude, has_weight, has_bias, work, has_kept = ctx.flags
        rows, log_z, log_z_t, log_z_out, pick, *rest = ctx.saved_tensors
        exclude = rest.pop(0) if has_exclude else None
        weight = rest.pop(0) if has_weight else None
        bias = rest.pop(0) if has_bias else None
        kept = rest.pop(0) if has_kept else None
        n = rows.shape[0]
        vocab = rows.shape[1] if weight is None else weight.shape[0]
        zeros = torch.zeros_like(log_z)
        g_z = zeros if g_z is None else g_z
        g_t = zeros if g_t is None else g_t
        g_out = zeros if (g_out is None or exclude is None) else torch.where(torch.isfinite(log_z_out), g_out, zeros)
        g_pick = torch.zeros_like(pick, dtype=work) if g_pick is None else g_pick
        t = temperature
        if t == 1.0:  # log_z_t is log_z: one softmax serves both
            g_z, g_t = g_z + g_t, zeros
        safe_out = torch.where(torch.isfinite(log_z_out), log_z_out, zeros)  # -inf: every id excluded, no tail
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=work) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=work) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.no_grad():
            for start in range(0, n, step):
                s = slice(start, start + step)
                x = kept if kept is not None else _chunk_logits(rows, weight, bias, s, work)
                g = torch.exp(x - log_z[s, None]) * g_z[s, None]
                xt = x / t if t != 1.0 else x
                if t != 1.0:
                    g += torch.exp(xt - log_z_t[s, None]) * (g_t[s, None] / t)
                if exclude is not None:
                    p_out = torch.exp(xt - safe_out[s, None]).masked_fill_(_exclusion_mask(exclude[s], vocab), 0.0)
                    g += p_out * (g_out[s, None] / t)
                g.scatter_add_(-1, pick[s], g_pick[s].to(work))
                del x, xt
                if weight is None:
                    grad_rows[s] = g.to(rows.dtype)
                    continue
                if grad_rows is not None:
                    grad_rows[s] = (g.to(weight.dtype) @ weight).to(rows.dtype)
                if grad_w is not None:
                    grad_w += g.t() @ rows[s].to(work)
                if grad_b is not None:
                    grad_b += g.sum(0)
        return (
            grad_rows,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None,
        )


def student_stats(
    inputs: Tensor,
    pick_ids: Tensor,
    temperature: float = 1.0,
    exclude_ids: Tensor | None = None,
    head_weight: Tensor | None = None,
    head_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> StudentStats:
    """Chunked statistics of the student's logits (module docstring).

    Args:
        inputs: ``[B, L, V]`` logits z, or ``[B, L, H]`` hidden states when ``head_weight`` is given
            (``z = hidden @ head_weight.T + head_bias``). Gradients flow back into them (and into the head).
        pick_ids: ``[B, L, G]`` int64 ids whose raw logits are returned (any valid id where unused).
        temperature: T > 0 of ``log_z_t`` and ``log_z_out``.
        exclude_ids: ``[B, L, M]`` int64 ids left out of ``log_z_out`` (``-1`` = none); None = no ``log_z_out``.
        head_weight: ``[V, H]`` the LM head's weight; head_bias: ``[V]`` its bias, if any.
        chunk_size: positions per chunk; None = ``default_chunk_size(V)``.

    Returns:
        ``StudentStats`` in float32 (float64 for float64 inputs); ``log_z_out`` is ``-inf`` where every id is
        excluded and None without ``exclude_ids``.
    """
    if inputs.dim() != 3:
        raise ValueError(f"`inputs` must be [B, L, V] logits or [B, L, H] hidden states, got {tuple(inputs.shape)}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    b, length, width = inputs.shape
    vocab = width if head_weight is None else head_weight.shape[0]
    if head_weight is not None and head_weight.shape[1] != width:
        raise ValueError(f"`head_weight` must be [V, H] with H = {width}, got {list(head_weight.shape)}.")
    if pick_ids.shape[:2] != (b, length):
        raise ValueError(f"`pick_ids` must be [B, L, G] with B, L = {b}, {length}, got {list(pick_ids.shape)}.")
    exclude = None
    if exclude_ids is not None:
        if exclude_ids.shape[:2] != (b, length):
            raise ValueError(f"`exclude_ids` must be [B, L, M] with B, L = {b}, {length}, got {list(exclude_ids.shape)}.")
        exclude = exclude_ids.reshape(b * length, -1).long()
    step = chunk_size or default_chunk_size(vocab)
    pick = pick_ids.reshape(b * length, -1).long().clamp(0, vocab - 1)
    log_z, log_z_t, log_z_out, picked = _Stats.apply(
        inputs.reshape(b * length, width), head_weight, head_bias, float(temperature), exclude, pick, step
    )
    shape = (b, length)
    return StudentStats(
        log_z.view(shape), log_z_t.view(shape), None if exclude is None else log_z_out.view(shape),
        picked.view(b, length, -1),
    )


@torch.no_grad()
def chunked_argmax(inputs: Tensor, head_weight: Tensor | None = None, head_bias: Tensor | None = None,
                   chunk_size: int | None = None) -> Tensor:
    """``[B, L]`` argmax of the logits (``inputs`` logits, or hidden states with the head), one chunk at a time."""
    b, length, width = inputs.shape
    vocab = width if head_weight is None else head_weight.shape[0]
    rows = inputs.reshape(b * length, width)
    step = chunk_size or default_chunk_size(vocab)
    out = [_chunk_logits(rows, head_weight, head_bias, slice(i, i + step), rows.dtype if head_weight is None
                         else head_weight.dtype).argmax(-1) for i in range(0, b * length, step)]
    return (torch.cat(out) if out else rows.new_zeros(0, dtype=torch.long)).view(b, length)
