"""Learning-rate schedule from the module's settings (``lr_schedule``, ``lr_floor``)."""

import math

import pytest
import torch
from test_module import fit, make

from lightning_fuse.schedule import lr_factor


def test_lr_factor_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 4, 100, "cosine", 0.1) == pytest.approx(1 / 5)
    assert lr_factor(4, 4, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(52, 4, 100, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 4, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 4, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 4, 100, "constant", 0.1) == 1.0


def test_cosine_schedule_from_the_module_settings(tiny_world):
    module = make(tiny_world, ["words", "sums"], strategy="avg_ce", learning_rate=1e-3, lr_schedule="cosine",
                  lr_floor=0.2, warmup_steps=2)
    trainer, _ = fit(module, tiny_world, steps=10, gradient_clip_val=1.0)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * lr_factor(10, 2, 10, "cosine", 0.2))
    assert lr == pytest.approx(2e-4)
    assert all(torch.isfinite(p).all() for p in module.target.parameters())


def test_bad_schedule(tiny_world):
    with pytest.raises(ValueError, match=r"`--model.lr_schedule` can be constant, cosine \(got 'linear'\)"):
        make(tiny_world, ["words"], lr_schedule="linear")
