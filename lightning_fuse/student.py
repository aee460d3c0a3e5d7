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


def _backprop_chunk(g: Tensor, rows: Tensor, weight: Tensor | None, s: slice, work: torch.dtype,
                    grad_rows: Tensor | None, grad_w: Tensor | None, grad_b: Tensor | None) -> None:
    """Add the gradient ``g`` w.r.t. chunk ``s``'s logits to the gradients of the rows and of the LM head (in place;
    without a head, the rows are the logits)."""
    if weight is None:
        grad_rows[s] = g.to(rows.dtype)
        return
    if grad_rows is not None:
        grad_rows[s] = (g.to(weight.dtype) @ weight).to(rows.dtype)
    if grad_w is not None:
        grad_w += g.t() @ rows[s].to(work)
    if grad_b is not None:
        grad_b += g.sum(0)


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
        kept = None  # one chunk only: keep its logits (or softmax) for the backward pass (no recompute)
        fast = []  # per chunk: T = 1 with a tail, taken from one softmax (_fast_tail)
        for start in range(0, n, step):
            s = slice(start, start + step)
            x = _chunk_logits(rows, weight, bias, s, work)
            picked[s] = x.gather(-1, pick[s])
            if temperature == 1.0 and exclude is not None:
                p1 = _fast_tail(x, exclude[s], vocab, log_z, log_z_out, s)
                fast.append(p1 is not None)
                if p1 is not None:
                    log_z_t[s] = log_z[s]
                    kept = p1 if weight is not None and n <= step else None
                    del x, p1
                    continue
            else:
                fast.append(False)
            log_z[s] = torch.logsumexp(x, -1)
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
        ctx.fast = fast
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
            for chunk, start in enumerate(range(0, n, step)):
                s = slice(start, start + step)
                if ctx.fast[chunk]:  # T = 1: one softmax serves the normaliser and the tail
                    p1 = kept if kept is not None else torch.exp(_chunk_logits(rows, weight, bias, s, work) - log_z[s, None])
                    g = _fast_tail_grad(p1, exclude[s], g_z[s], g_out[s] * torch.exp(log_z[s] - safe_out[s]))
                    del p1
                else:
                    x = kept if kept is not None else _chunk_logits(rows, weight, bias, s, work)
                    g = _exact_grad(x, log_z[s], log_z_t[s], safe_out[s], g_z[s], g_t[s], g_out[s], t,
                                    None if exclude is None else exclude[s], vocab)
                    del x
                g.scatter_add_(-1, pick[s], g_pick[s].to(work))
                _backprop_chunk(g, rows, weight, s, work, grad_rows, grad_w, grad_b)
        return (
            grad_rows,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None,
        )


_TINY_TAIL = 1e-30  # below it the tail's softmax entries may underflow: the exact masked logsumexp is used


def _fast_tail(x: Tensor, exclude: Tensor, vocab: int, log_z: Tensor, log_z_out: Tensor, s: slice) -> Tensor | None:
    """T = 1: ``log_z`` and ``log_z_out`` from one fused ``log_softmax`` (``logsumexp`` costs twice as much on CPU,
    and the tail needed a second one): ``log_z_out = log_z + log(sum of the softmax outside the support)``, the tail
    summed entry by entry (never ``1 - sum(support)``). Returns the softmax, or None (nothing written) when a tail
    is below ``_TINY_TAIL``, where its entries may underflow: then the caller takes the exact path."""
    lsm = torch.log_softmax(x, -1)
    top, where = x.max(-1, keepdim=True)
    lz = (top - lsm.gather(-1, where)).squeeze(-1)  # at the argmax lsm is near 0: no precision lost
    p1 = lsm.exp_()
    tail = p1.masked_fill(_exclusion_mask(exclude, vocab), 0.0).sum(-1)
    if bool((tail < _TINY_TAIL).any()):
        return None
    log_z[s] = lz
    log_z_out[s] = lz + tail.log()
    return p1


def _fast_tail_grad(p1: Tensor, exclude: Tensor, g_z: Tensor, c_out: Tensor) -> Tensor:
    """The logits' gradient on a ``_fast_tail`` chunk: ``p1 (g_z + c_out)`` outside the support, ``p1 g_z`` on it
    (written, not subtracted: no cancellation), with ``c_out = g_out exp(log_z - log_z_out)``."""
    g = p1 * (g_z + c_out).unsqueeze(-1)
    first = exclude.max(-1, keepdim=True).values  # a valid support id of the row, -1 if none
    place = torch.where(exclude >= 0, exclude, first.clamp_min(0))  # empty slots rewrite a support id (or id 0)
    on_support = (exclude >= 0) | (first >= 0)
    value = torch.where(on_support, g_z.unsqueeze(-1), (g_z + c_out).unsqueeze(-1))
    return g.scatter_(-1, place, p1.gather(-1, place) * value)


def _exact_grad(x: Tensor, log_z: Tensor, log_z_t: Tensor, safe_out: Tensor, g_z: Tensor, g_t: Tensor, g_out: Tensor,
                t: float, exclude: Tensor | None, vocab: int) -> Tensor:
    """The logits' gradient from each softmax separately (any T; tails of any size)."""
    g = torch.exp(x - log_z[:, None]) * g_z[:, None]
    xt = x / t if t != 1.0 else x
    if t != 1.0:
        g += torch.exp(xt - log_z_t[:, None]) * (g_t[:, None] / t)
    if exclude is not None:
        p_out = torch.exp(xt - safe_out[:, None]).masked_fill_(_exclusion_mask(exclude, vocab), 0.0)
        g += p_out * (g_out[:, None] / t)
    return g


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
