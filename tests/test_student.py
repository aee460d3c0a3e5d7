"""student_stats (chunked normalisers and picked logits, with or without the LM head) against float64 autograd."""

import pytest
import torch

from lightning_fuse.student import chunked_argmax, student_stats


def _reference(z, pick, t, exclude):
    log_z = torch.logsumexp(z, -1)
    log_z_t = torch.logsumexp(z / t, -1)
    keep = torch.ones_like(z, dtype=torch.bool)
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            for j in exclude[b, i].tolist():
                if j >= 0:
                    keep[b, i, j] = False
    log_z_out = torch.logsumexp((z / t).masked_fill(~keep, float("-inf")), -1)
    return log_z, log_z_t, log_z_out, z.gather(-1, pick)


def _loss(parts, coef):
    """A weighted sum of every output (finite entries only), so every gradient path is exercised."""
    return sum((c * p.masked_fill(~torch.isfinite(p), 0.0)).sum() for c, p in zip(coef, parts))


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_student_stats_match_float64_autograd(with_head, t, chunk_size):
    torch.manual_seed(0)
    b, length, vocab, width = 2, 5, 11, 6
    hidden = torch.randn(b, length, width, dtype=torch.float64)
    weight = torch.randn(vocab, width, dtype=torch.float64)
    bias = torch.randn(vocab, dtype=torch.float64)
    logits = torch.randn(b, length, vocab, dtype=torch.float64) * 3
    pick = torch.randint(0, vocab, (b, length, 3))
    exclude = torch.randint(0, vocab, (b, length, 4))
    exclude[0, 0, -1] = -1  # an empty slot excludes nothing
    exclude[1, 2] = torch.tensor([0, 1, 2, 3])
    coef = [torch.randn(b, length, dtype=torch.float64) for _ in range(3)] + [torch.randn(b, length, 3, dtype=torch.float64)]

    if with_head:
        args = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        z_ref = args[0] @ args[1].T + args[2]
    else:
        args = [logits.clone().requires_grad_()]
        z_ref = args[0]
    ref = _reference(z_ref, pick, t, exclude)
    _loss(ref, coef).backward()
    ref_grads = [a.grad.clone() for a in args]

    got_args = [a.detach().clone().requires_grad_() for a in args]
    head = {"head_weight": got_args[1], "head_bias": got_args[2]} if with_head else {}
    stats = student_stats(got_args[0], pick, t, exclude, chunk_size=chunk_size, **head)
    got = (stats.log_z, stats.log_z_t, stats.log_z_out, stats.picked)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r.detach(), atol=1e-12, rtol=1e-12)
    _loss(got, coef).backward()
    for a, r in zip(got_args, ref_grads):
        torch.testing.assert_close(a.grad, r, atol=1e-12, rtol=1e-10)


def test_fully_excluded_row_has_no_tail_and_no_nan_gradient():
    z = torch.randn(1, 1, 4, dtype=torch.float64, requires_grad=True)
    stats = student_stats(z, torch.zeros(1, 1, 1, dtype=torch.long), 2.0, torch.arange(4).view(1, 1, 4))
    assert torch.isneginf(stats.log_z_out).all()
    (stats.log_z_t.sum() + torch.where(torch.isfinite(stats.log_z_out), stats.log_z_out, 0.0).sum()).backward()
    assert torch.isfinite(z.grad).all()


def test_chunked_argmax_matches_argmax():
    torch.manual_seed(1)
    hidden, weight = torch.randn(3, 7, 5), torch.randn(13, 5)
    assert torch.equal(chunked_argmax(hidden, weight, None, chunk_size=2), (hidden @ weight.T).argmax(-1))
    logits = torch.randn(3, 7, 13)
    assert torch.equal(chunked_argmax(logits, chunk_size=4), logits.argmax(-1))


@pytest.mark.parametrize("tail_gap", [0.0, 80.0])
def test_t1_tail_from_one_softmax_and_tiny_tail_fallback(tail_gap):
    """T = 1 takes the tail from one softmax; a tail below 1e-30 of the mass (a gap of 80 nats: its softmax
    entries would underflow in float32) takes the exact masked logsumexp instead. Both equal float64 autograd,
    in float32 too, to float32 rounding."""
    torch.manual_seed(1)
    z = torch.randn(2, 3, 9, dtype=torch.float64) * 2
    exclude = torch.tensor([0, 1, -1]).expand(2, 3, 3).clone()
    exclude[1, 1] = -1  # a row without support: no exclusion
    z[..., :2] += tail_gap
    pick = torch.randint(0, 9, (2, 3, 2))
    coef = [torch.randn(2, 3, dtype=torch.float64) for _ in range(3)] + [torch.randn(2, 3, 2, dtype=torch.float64)]
    ref_z = z.clone().requires_grad_()
    ref = _reference(ref_z, pick, 1.0, exclude)
    _loss(ref, coef).backward()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        got_z = z.to(dtype).detach().requires_grad_()
        stats = student_stats(got_z, pick, 1.0, exclude)
        for a, r in zip((stats.log_z, stats.log_z_out, stats.picked), (ref[0], ref[2], ref[3])):
            torch.testing.assert_close(a.double(), r.detach(), atol=tol * (1 + tail_gap), rtol=tol)
        _loss((stats.log_z, stats.log_z_t, stats.log_z_out, stats.picked), [c.to(dtype) for c in coef]).backward()
        torch.testing.assert_close(got_z.grad.double(), ref_z.grad, atol=tol, rtol=tol)
