"""output_agreement: how close two runs of one source are (used by the cuda tests and benchmarks/gpu.py)."""

import pytest
import torch

from lightning_fuse.compare import output_agreement
from lightning_fuse.fusion import next_token_mask, source_output_from_logits


def _outputs(seed=0, noise=0.0, b=3, length=6, v=20, k=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, v, generator=gen) * 3
    labels = torch.randint(0, v, (b, length), generator=gen)
    a = source_output_from_logits(logits, labels, k)
    bumped = logits + noise * torch.randn(b, length, v, generator=gen)
    return a, source_output_from_logits(bumped, labels, k), logits, bumped, labels


def test_identical_outputs_agree_fully():
    a, b, *_, labels = _outputs()
    got = output_agreement(a, b, next_token_mask(labels))
    assert got.positions == 3 * 5
    assert got.top1 == got.top1_clear == got.topk_overlap == 1.0
    assert got.max_abs_topk_logprob == got.mean_abs_gold_logprob == got.max_abs_gold_logprob == got.max_rel_ce == 0.0


def test_perturbed_outputs_against_a_dense_reference():
    a, b, la, lb, labels = _outputs(noise=0.5)
    mask = next_token_mask(labels)
    got = output_agreement(a, b, mask)
    pa, pb = torch.log_softmax(la, -1)[mask], torch.log_softmax(lb, -1)[mask]  # [P, V], computed independently
    top_a, top_b = pa.topk(4, -1), pb.topk(4, -1)
    assert got.top1 == pytest.approx(float((top_a.indices[:, 0] == top_b.indices[:, 0]).float().mean()))
    overlap = [len(set(x.tolist()) & set(y.tolist())) / 4 for x, y in zip(top_a.indices, top_b.indices)]
    assert got.topk_overlap == pytest.approx(sum(overlap) / len(overlap))
    assert got.max_abs_topk_logprob == pytest.approx(float((top_a.values - top_b.values).abs().max()), abs=1e-6)
    gold = labels[:, 1:][mask[:, :-1]]
    diff = (pa.gather(-1, gold[:, None]) - pb.gather(-1, gold[:, None])).abs()
    assert got.mean_abs_gold_logprob == pytest.approx(float(diff.mean()), abs=1e-6)
    assert 0 < got.top1 < 1 and got.top1_clear >= got.top1


def test_mismatched_or_empty_input():
    a, _, *_, labels = _outputs()
    other, *_ = _outputs(length=5)
    with pytest.raises(ValueError, match="outputs differ in shape"):
        output_agreement(a, other, next_token_mask(labels))
    with pytest.raises(ValueError, match="`mask` selects no position"):
        output_agreement(a, a, torch.zeros_like(labels, dtype=torch.bool))
