"""Dense distillation (``distill_top_k >= V``): the dense tempered divergence itself, against float64 autograd."""

import pytest
import torch

from lightning_fuse.dense import all_dense, dense_losses, dense_teacher, distill_terms
from lightning_fuse.fusion import (
    SourceOutput,
    SparseDist,
    fuse,
    gold_next_tokens,
    next_token_mask,
    source_output_from_hidden,
    source_output_from_logits,
)

B, L, V, H = 2, 6, 29, 8


def _batch():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = -100
    return labels, next_token_mask(labels), gold_next_tokens(labels)


def _reference(kind: str, z: torch.Tensor, p: torch.Tensor, t: float) -> torch.Tensor:
    """Per-position ``T^2 D(P_T || softmax(z / T))`` with plain float64 autograd."""
    p_t = torch.softmax(p.log() / t, -1)
    log_q = torch.log_softmax(z / t, -1)
    q = log_q.exp()
    if kind == "forward_kl":
        d = (p_t * (p_t.log() - log_q)).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (log_q - p_t.log())).sum(-1)
    else:
        m = (p_t + q) / 2
        d = 0.5 * (p_t * (p_t.log() - m.log())).sum(-1) + 0.5 * (q * (log_q - m.log())).sum(-1)
    return d * t**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("n_sources", [1, 2])
def test_dense_losses_equal_float64_autograd(kind, temperature, n_sources):
    """Loss, CE and the hand-written backward (hidden state and head weight, in chunks of 5 positions) equal
    plain autograd in float64 for the weighted mixture of the sources."""
    labels, mask, gold = _batch()
    g = torch.Generator().manual_seed(1)
    teacher_lps = [torch.log_softmax(3 * torch.randn(B, L, V, generator=g, dtype=torch.float64), -1)
                   for _ in range(n_sources)]
    outputs = [SourceOutput(SparseDist(torch.arange(V).expand(B, L, V), lp, dense=True), lp[..., 0], lp[:, 0, 0])
               for lp in teacher_lps]
    weights = torch.softmax(torch.randn(B, n_sources, generator=g, dtype=torch.float64), -1)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)

    log_p, has_teacher = dense_teacher(outputs, weights, temperature)
    assert has_teacher.all()
    gold_lp, kd = dense_losses(hidden, log_p, gold, mask, kind, temperature, head, chunk_size=5)
    ce = -(gold_lp * mask).sum() / mask.sum()
    torch.autograd.grad(kd + 0.3 * ce, (hidden, head))  # warm: the same graph twice must work
    gold_lp, kd = dense_losses(hidden, log_p, gold, mask, kind, temperature, head, chunk_size=5)
    ce = -(gold_lp * mask).sum() / mask.sum()
    ours = torch.autograd.grad(kd + 0.3 * ce, (hidden, head))

    z = hidden @ head.T
    p = sum(w.view(B, 1, 1) * lp.exp() for w, lp in zip(weights.unbind(-1), teacher_lps))
    ref_kd = (_reference(kind, z, p, temperature) * mask).sum() / mask.sum()
    ref_ce = -(torch.log_softmax(z, -1).gather(-1, gold.unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
    theirs = torch.autograd.grad(ref_kd + 0.3 * ref_ce, (hidden, head))
    assert float(kd) == pytest.approx(float(ref_kd), abs=1e-12)
    assert float(ce) == pytest.approx(float(ref_ce), abs=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_k_equal_v_takes_the_dense_path_and_agrees_with_the_sparse_one():
    """Sources reduced with top_k >= V are dense (top_k < V are not: k = min(top_k, V) alone cannot tell), and
    the module's loss terms on them equal the sparse path's (support = V, an empty "other" bucket)."""
    labels, mask, gold = _batch()
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(H, V, bias=False)
    src_hidden = torch.randn(B, L, H, generator=g)
    assert source_output_from_hidden(src_hidden, head, labels, V).dist.dense
    assert not source_output_from_hidden(src_hidden, head, labels, 5).dist.dense
    assert not source_output_from_logits(torch.randn(B, L, V), labels, 5).dist.dense
    outputs = [source_output_from_logits(3 * torch.randn(B, L, V, generator=g), labels, V + 3) for _ in range(2)]
    assert all_dense(outputs) and outputs[0].dist.ids.shape == (B, L, V)
    weights = torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    student = torch.randn(B, L, V, generator=g, requires_grad=True)
    for kind in ("forward_kl", "reverse_kl", "jsd"):  # the sparse jsd and reverse KL had NaN gradients here
        stats, kd = distill_terms(outputs, weights, student, (None, None), gold, mask, kind, 1.0, fuse)
        s_stats, s_kd = distill_terms(outputs, weights, student, (None, None), gold, mask, kind, 1.0, fuse, False)
        assert float(kd) == pytest.approx(float(s_kd), abs=2e-6)
        ce, s_ce = (st.picked[..., 0] - st.log_z for st in (stats, s_stats))
        torch.testing.assert_close(ce, s_ce, rtol=0, atol=1e-5)
        g_dense, = torch.autograd.grad(kd, student)
        g_sparse, = torch.autograd.grad(s_kd, student)
        torch.testing.assert_close(g_dense, g_sparse, rtol=0, atol=1e-6)
