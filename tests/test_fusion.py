import math

import pytest
import torch

from lightning_fuse.fusion import (
    SourceOutput,
    SparseDist,
    baseline_weights,
    distill_loss,
    fuse,
    merge_duplicates,
    mixture_nll,
    next_token_mask,
    source_output_from_logits,
)


def test_baseline_weights_by_hand():
    ce = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.2, 0.9]])
    assert torch.equal(baseline_weights("uniform", ce), torch.full((2, 3), 1 / 3))
    assert torch.equal(baseline_weights("min_ce", ce), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    e = [math.exp(-1), math.exp(-2), math.exp(-3)]
    torch.testing.assert_close(baseline_weights("softmax_ce", ce)[0], torch.tensor([x / sum(e) for x in e]))
    r = [math.exp(x) for x in e]  # FuseLLM's AvgCE: softmax over the rewards 1 / exp(CE)
    torch.testing.assert_close(baseline_weights("avg_ce", ce)[0], torch.tensor([x / sum(r) for x in r]))


def test_avg_ce_is_fusellm_formula_and_softmax_ce_the_sharper_one():
    """The numbers of issue 13 / METHOD.md section 4: CE [2.1, 2.4, 3.0]."""
    ce = torch.tensor([[2.1, 2.4, 3.0]], dtype=torch.float64)
    avg = baseline_weights("avg_ce", ce)[0].tolist()
    sharp = baseline_weights("softmax_ce", ce)[0].tolist()
    assert [round(x, 3) for x in avg] == [0.345, 0.334, 0.321]
    assert [round(x, 3) for x in sharp] == [0.466, 0.345, 0.189]
    with pytest.raises(ValueError, match="no fixed weights"):
        baseline_weights("adaptive", ce)


def test_merge_duplicates_sums_repeated_ids():
    ids = torch.tensor([[3, 5, 3, 7, 5, 2]])
    p = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.1, 0.05]])
    mid, mp = merge_duplicates(ids, p)
    got = {int(i): round(float(q), 6) for i, q in zip(mid[0], mp[0]) if i >= 0}
    assert got == {3: 0.4, 5: 0.3, 2: 0.05}  # id 7 had p = 0: dropped
    assert float(mp.sum()) == pytest.approx(0.75)


def _dist(ids, probs):
    ids = torch.tensor(ids).view(1, 1, -1)
    probs = torch.tensor(probs).view(1, 1, -1)
    return SparseDist(ids, probs.log())


def test_fuse_mixes_with_weights():
    a = SourceOutput(_dist([1, 2], [0.6, 0.3]), torch.zeros(1, 1), torch.zeros(1))
    b = SourceOutput(_dist([2, 3], [0.5, 0.5]), torch.zeros(1, 1), torch.zeros(1))
    fused = fuse([a, b], torch.tensor([[0.25, 0.75]]))
    got = {int(i): float(p) for i, p in zip(fused.ids.flatten(), fused.probs.flatten()) if i >= 0}
    assert got == pytest.approx({1: 0.15, 2: 0.075 + 0.375, 3: 0.375})


def test_forward_kl_matches_dense_computation_on_full_support():
    torch.manual_seed(0)
    v = 6
    logits = torch.randn(1, 2, v, requires_grad=True)
    teacher_p = torch.softmax(torch.randn(1, 2, v), -1)
    teacher = SparseDist(torch.arange(v).expand(1, 2, v), teacher_p.log())
    mask = torch.tensor([[True, True]])
    loss = distill_loss(logits, teacher, mask, "forward_kl")
    dense = (teacher_p * (teacher_p.log() - torch.log_softmax(logits, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, dense)
    loss.backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergences_zero_when_equal_and_positive_otherwise(kind):
    logits = torch.randn(2, 3, 5)
    lp = torch.log_softmax(logits, -1)
    top_lp, top_ids = lp.topk(3, -1)
    same = distill_loss(logits, SparseDist(top_ids, top_lp), torch.ones(2, 3, dtype=torch.bool), kind)
    assert float(same) == pytest.approx(0.0, abs=1e-5)
    other = distill_loss(logits + 3 * torch.randn(2, 3, 5), SparseDist(top_ids, top_lp), torch.ones(2, 3, dtype=torch.bool), kind)
    assert float(other) > 1e-3


def test_distill_loss_all_masked_is_zero_with_grad():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    lp = torch.log_softmax(torch.randn(1, 4, 5), -1)
    loss = distill_loss(logits, SparseDist(*reversed(lp.topk(2, -1))), torch.zeros(1, 4, dtype=torch.bool))
    assert float(loss) == 0.0
    loss.backward()


def test_bad_distill_kind():
    with pytest.raises(ValueError, match="can be forward_kl"):
        distill_loss(torch.randn(1, 2, 3), _dist([0], [1.0]), torch.ones(1, 2, dtype=torch.bool), "kl")


def test_source_output_from_logits():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    out = source_output_from_logits(logits, labels, top_k=3)
    lp = torch.log_softmax(logits, -1)
    assert out.dist.ids.shape == (2, 4, 3)
    assert float(out.gold_logprob[0, 0]) == pytest.approx(float(lp[0, 0, 2]))
    assert torch.equal(next_token_mask(labels), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    expected_ce = -(lp[1, 0, 6])
    assert float(out.ce[1]) == pytest.approx(float(expected_ce))


def test_mixture_nll_prefers_better_source():
    gold = torch.log(torch.tensor([[[0.9, 0.8]], [[0.1, 0.2]]])).permute(1, 0, 2)  # [B=1, N=2, L=2]
    gate_logits = torch.zeros(1, 2, requires_grad=True)
    loss = mixture_nll(gold, torch.softmax(gate_logits, -1), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert gate_logits.grad[0, 0] < 0 < gate_logits.grad[0, 1]  # descent raises the better source's gate
