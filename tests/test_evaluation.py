"""Interference metric on constructed cases and the per-domain table against a direct computation."""

import math

import pytest
import torch

from lightning_fuse.evaluation import (
    domain_losses,
    format_table,
    interference,
    normalised_interference,
    parse_results,
    reduction,
    selection_matrix,
)

ORACLE = {"code": 2.0, "law": 3.0, "news": 2.5}


def test_method_equal_to_oracle_has_zero_interference():
    assert interference(dict(ORACLE), ORACLE) == 0.0


def test_swapping_a_specialist_for_the_weak_source_raises_interference():
    # a method that, on "law", distils the weak source instead of the law specialist ends up worse there
    swapped = {**ORACLE, "law": 3.6}
    assert interference(swapped, ORACLE) == pytest.approx(0.6 / 3)
    clm = {d: v + 0.9 for d, v in ORACLE.items()}
    assert normalised_interference(swapped, ORACLE, clm) == pytest.approx((0.6 / 3) / 0.9)
    assert reduction(0.1, 0.2) == pytest.approx(50.0)


def test_missing_domain_is_an_error():
    with pytest.raises(ValueError, match=r"No loss for domains \['news'\]"):
        interference({"code": 2.0, "law": 3.0}, ORACLE)


def test_table_numbers_match_a_direct_computation(tiny_world):
    from test_module import fit, make

    module = make(tiny_world, ["words", "sums"], strategy="avg_ce")
    _, results = fit(module, tiny_world, steps=2)
    # direct computation of the target's loss on the "sums" validation blocks
    dm = module.trainer.datamodule
    sums = dm.domains.index("sums")
    blocks = dm.val_set.blocks[dm.val_set.domains == sums]
    with torch.no_grad():
        logits = module.target(input_ids=blocks).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert domain_losses(results)["sums"] == pytest.approx(float(nll), rel=1e-4)
    table = parse_results(results)
    assert table["sums"]["target"]["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-3)
    shares = selection_matrix(results)
    for domain in ("words", "sums"):
        assert sum(shares[domain].values()) == pytest.approx(1.0, abs=1e-4)
    text = format_table(results)
    assert "sums" in text and "target" in text and "selection share" in text
