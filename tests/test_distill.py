"""Sparse tempered distillation against a dense float64 reference (issue 13, items 1 and 2)."""

import math

import pytest
import torch

from lightning_fuse.distill import DISTILL_LOSSES, distill_loss, tail_interval
from lightning_fuse.fusion import SparseDist

V = 12
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)


def dense_divergence(teacher_p: torch.Tensor, student_logits: torch.Tensor, kind: str, t: float) -> torch.Tensor:
    """``T^2 D(P_T || Q_T)`` over the full vocabulary, float64, written independently of the library."""
    p = torch.softmax(teacher_p.log() / t, -1)
    q = torch.softmax(student_logits / t, -1)
    if kind == "forward_kl":
        d = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (q.log() - p.log())).sum(-1)
    else:
        m = 0.5 * (p + q)
        d = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return t * t * d.mean()


def _world(seed: int, positions: int = 6):
    g = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.3, 4.0, positions, dtype=torch.float64).view(1, -1, 1)
    teacher_p = torch.softmax(torch.randn(1, positions, V, generator=g, dtype=torch.float64) * sharp, -1)
    student = torch.randn(1, positions, V, generator=g, dtype=torch.float64) * sharp.flip(1)
    return teacher_p, student


def _top_k(teacher_p: torch.Tensor, k: int) -> SparseDist:
    lp, ids = teacher_p.log().topk(k, -1)
    return SparseDist(ids, lp)


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
@pytest.mark.parametrize("t", TEMPERATURES)
def test_sparse_is_a_lower_bound_that_grows_with_k_to_the_dense_divergence(kind, t):
    mask = torch.ones(1, 6, dtype=torch.bool)
    for seed in range(3):
        teacher_p, student = _world(seed)
        dense = float(dense_divergence(teacher_p, student, kind, t))
        losses = [float(distill_loss(student, _top_k(teacher_p, k), mask, kind, t)) for k in range(1, V + 1)]
        for k, loss in enumerate(losses, start=1):
            assert loss <= dense + 1e-9, f"k={k}: sparse {loss:.6f} > dense {dense:.6f} (T={t}, {kind})"
        for k in range(1, V):  # a larger support never loosens the bound
            assert losses[k] >= losses[k - 1] - 1e-9, f"k={k + 1}: {losses[k]:.6f} < k={k}: {losses[k - 1]:.6f}"
        for k in (V - 1, V):  # a tail of at most one id is known exactly: the bound is the dense divergence
            assert losses[k - 1] == pytest.approx(dense, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
@pytest.mark.parametrize("t", TEMPERATURES)
def test_sparse_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(kind, t):
    teacher_p, student = _world(7)
    mask = torch.ones(1, 6, dtype=torch.bool)
    for k in (1, 3, V):
        assert float(distill_loss(teacher_p.log(), _top_k(teacher_p, k), mask, kind, t)) == pytest.approx(0, abs=1e-9)
        assert float(distill_loss(student, _top_k(teacher_p, k), mask, kind, t)) > 1e-4


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
@pytest.mark.parametrize("t", [0.5, 2.0])
def test_gradient_matches_finite_differences(kind, t):
    """The minimiser r* carries no gradient; the envelope theorem says the gradient is still exact."""
    teacher_p, student = _world(3, positions=2)
    teacher = _top_k(teacher_p, 4)
    mask = torch.ones(1, 2, dtype=torch.bool)
    z = student.clone().requires_grad_(True)
    distill_loss(z, teacher, mask, kind, t).backward()
    eps = 1e-6
    for index in [(0, 0, 0), (0, 0, 5), (0, 1, 11)]:
        plus, minus = student.clone(), student.clone()
        plus[index] += eps
        minus[index] -= eps
        fd = (distill_loss(plus, teacher, mask, kind, t) - distill_loss(minus, teacher, mask, kind, t)) / (2 * eps)
        assert float(z.grad[index]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)


def test_tail_interval_brackets_the_true_tempered_tail():
    teacher_p, _ = _world(1)
    for t in TEMPERATURES:
        for k in (1, 4, 8):
            lp, ids = teacher_p.log().topk(k, -1)
            _, r_lo, r_hi = tail_interval(lp, ids >= 0, V, t)
            pt = torch.softmax(teacher_p.log() / t, -1)
            r_true = 1 - pt.gather(-1, ids).sum(-1)
            assert bool((r_lo <= r_true + 1e-12).all() and (r_true <= r_hi + 1e-12).all())


def test_free_student_keeps_the_teachers_tail_mass_at_every_temperature():
    """Issue 13: against one teacher whose tail mass is 0.235 the old loss drove a free student's tail (read at
    T = 1) to 0.003 at T = 2 and 0.0000 at T = 4. Now temperature never makes the student drop its tail."""
    probs = torch.tensor([0.40, 0.15, 0.10, 0.07, 0.045], dtype=torch.float64)  # top-5 mass 0.765
    tail = torch.full((45,), 0.235 / 45, dtype=torch.float64)
    teacher_p = torch.cat([probs, tail]).view(1, 1, -1)
    teacher = _top_k(teacher_p, 5)
    mask = torch.ones(1, 1, dtype=torch.bool)
    tails = {}
    for t in (1.0, 2.0, 4.0):
        z = torch.zeros(1, 1, 50, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(1500):
            opt.zero_grad()
            distill_loss(z, teacher, mask, "forward_kl", t).backward()
            opt.step()
        q = torch.softmax(z.detach(), -1)
        tails[t] = float(1 - q.gather(-1, teacher.ids).sum())
    assert tails[1.0] == pytest.approx(0.235, abs=1e-3)
    assert tails[2.0] > 0.1 and tails[4.0] > 0.1, tails


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_confident_student_tail_in_log_space(kind):
    """Student tail mass 1.9e-8: float32 logits give the float64 loss and gradient (1 - sum(q) cancels to 0)."""
    v = 100
    z64 = torch.zeros(1, 1, v, dtype=torch.float64)
    z64[..., 1:] = math.log(1.9e-8 / (v - 1))  # tail mass 1.9e-8 spread over 99 ids
    teacher = SparseDist(torch.tensor([[[0]]]), torch.tensor([[[math.log(0.5)]]], dtype=torch.float64))
    mask = torch.ones(1, 1, dtype=torch.bool)
    # float64 reference, by hand: p = (0.5, 0.5) against q = (q_0, q_tail) on {id 0, the rest}
    ref_z = z64.clone().requires_grad_(True)
    lq = torch.log_softmax(ref_z, -1)
    log_q = torch.stack([lq[0, 0, 0], torch.logsumexp(lq[0, 0, 1:], -1)])
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = log_q.exp()
    if kind == "forward_kl":
        ref = (p * (p.log() - log_q)).sum()
    elif kind == "reverse_kl":
        ref = (q * (log_q - p.log())).sum()
    else:
        m = 0.5 * (p + q)
        ref = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (log_q - m.log())).sum()
    ref.backward()
    z32 = z64.float().requires_grad_(True)
    loss = distill_loss(z32, SparseDist(teacher.ids, teacher.logprobs.float()), mask, kind)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    tail_grad = float(z32.grad[0, 0, 1:].sum())
    assert tail_grad == pytest.approx(float(ref_z.grad[0, 0, 1:].sum()), rel=1e-3)
    if kind == "forward_kl":  # the pull that restores the tail mass (p_o - q_o = 0.5) does not vanish
        assert tail_grad == pytest.approx(-0.5, rel=1e-6)
