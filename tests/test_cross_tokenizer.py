"""Fusion with a source whose tokenizer differs from the target's: aligned automatically, rate reported."""

import pytest
import torch

from lightning_fuse import FusionModule, SelectionFeedback, SourceSpec


@pytest.fixture(scope="module")
def other_source(tiny_world, tmp_path_factory):
    from tiny import other_tokenizer_source

    return other_tokenizer_source(tiny_world, tmp_path_factory.getbasetemp())


def test_other_tokenizer_source_is_aligned_and_fusion_trains(tiny_world, other_source, tmp_path):
    from test_module import fit

    module = FusionModule(
        target=tiny_world["target"],
        sources=[SourceSpec("words", tiny_world["words"]), SourceSpec("other", other_source, alignment="min_ed")],
        strategy="avg_ce", clm_weight=0.2, alignment_cache_dir=str(tmp_path / "maps"),
    )
    module.configure_model()
    same, other = module.sources
    assert same.aligner is None and other.aligner is not None
    batch = next(iter(_loader(tiny_world, module)))
    first = float(module._step(batch, "train")["loss"])
    _, results = fit(module, tiny_world, steps=40, callbacks=[SelectionFeedback(beta=0.0)])
    last = float(module._step(batch, "train")["loss"])
    print(f"alignment rate of the metaspace source: {other.alignment_rate:.3f}; loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.3
    # byte-level BPE (320 tokens) target vs metaspace BPE (600 tokens) source: their merges differ, so only
    # positions where both split the text the same way align one-to-one. Measured 0.46 here; a marker bug
    # (unnormalised 'Ġ' / '▁') drops it towards 0 (see test_alignment.py), hence the floor of 0.3.
    assert other.alignment_rate > 0.3
    assert results["align/rate/other"] == pytest.approx(other.alignment_rate, abs=0.02)  # logged at validation
    assert list((tmp_path / "maps").glob("vocab_map-min_ed-*.pt")), "the vocabulary map is cached on disk"


def test_aligned_output_is_a_distribution_on_target_ids(tiny_world, other_source):
    module = FusionModule(target=tiny_world["target"], sources=[SourceSpec("other", other_source)],
                          strategy="uniform", alignment_cache_dir=None)
    module.configure_model()
    batch = next(iter(_loader(tiny_world, module)))
    out = module.run_sources(batch)[0]
    ids, probs = out.dist.ids, out.dist.probs
    assert ids.shape[:2] == batch["input_ids"].shape
    assert (ids < len(module.tokenizer)).all()
    assert (probs.sum(-1) <= 1 + 1e-4).all()
    assert torch.isfinite(out.ce).all() and (out.ce > 0).all()


def _loader(world, module):
    from lightning_fuse import TextDataModule

    dm = TextDataModule(world["corpus"], block_size=32, batch_size=8)
    dm.connect(module.tokenizer, module.max_seq_length)
    dm.setup("fit")
    return dm.train_dataloader()


def test_alignment_runs_in_the_dataloader_and_matches_the_step(tiny_world, other_source, tmp_path):
    """With a cross-tokenizer source, batches carry its alignment (computed by the DataLoader's worker), equal
    to aligning in the step, and the step's outputs do not depend on where it was computed."""
    import lightning.pytorch as pl

    from lightning_fuse import TextDataModule

    module = FusionModule(target=tiny_world["target"], sources=[SourceSpec("other", other_source)],
                          strategy="uniform", alignment_cache_dir=None)
    seen = []

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            (source,) = pl_module.sources
            aligned = batch["aligned"]["other"]
            inline = source.aligner.align_batch(batch["input_ids"], batch["attention_mask"])
            for key, value in inline.as_dict().items():
                assert torch.equal(aligned[key], value), key
            plain = {k: v for k, v in batch.items() if k != "aligned"}
            a, b = pl_module.run_sources(batch)[0], pl_module.run_sources(plain)[0]
            assert torch.equal(a.dist.ids, b.dist.ids) and torch.equal(a.ce, b.ce)
            seen.append(batch_idx)

    dm = TextDataModule(tiny_world["corpus"], block_size=32, batch_size=8, num_workers=1, max_blocks_per_domain=16,
                        max_val_blocks_per_domain=8)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, callbacks=[Check()])
    trainer.fit(module, dm)
    assert seen == [0, 1]
    trainer.validate(module, dm, verbose=False)  # validation batches carry the alignment too
    assert set(module.eval_results) >= {"align/rate/other", "align/mass_exact/other", "align/mass_dropped/other"}


@pytest.mark.parametrize("strategy", ["adaptive", "min_ce"])
def test_token_selection_with_a_cross_tokenizer_source(tiny_world, other_source, strategy):
    """``selection: token`` with a source of another tokenizer: at its unaligned positions the one-hot fallback on the
    gold token is what it teaches, with that position's token weight; the per-token gate trains everywhere."""
    from lightning_fuse.fusion import gold_next_tokens, next_token_mask

    module = FusionModule(target=tiny_world["target"], selection="token", strategy=strategy, top_k=2,
                          sources=[SourceSpec("words", tiny_world["words"]), SourceSpec("other", other_source)],
                          alignment_cache_dir=None)
    module.configure_model()
    batch = next(iter(_loader(tiny_world, module)))
    r = module._step(batch, "train")
    mask, gold = next_token_mask(batch["labels"]), gold_next_tokens(batch["labels"])
    weights = r["selection"].token_weights
    assert torch.allclose(weights[mask].sum(-1), torch.ones(int(mask.sum())))
    other = r["outputs"][1].dist
    one_hot = (other.ids[..., 0] == gold) & (other.logprobs[..., 0] == 0) & (other.ids[..., 1:] < 0).all(-1) & mask
    assert 0 < int(one_hot.sum()) < int(mask.sum())  # some positions fall back, others align 1:1
    assert (weights[..., 1][one_hot] > 0).any()  # the fallback source still teaches some of them
    teacher = module.fuse_distributions(r["outputs"], weights)
    p_gold = (teacher.probs * (teacher.ids == gold.unsqueeze(-1))).sum(-1)
    assert (p_gold[one_hot] >= weights[..., 1][one_hot] - 1e-5).all()  # its one-hot mass lands on the gold token
    if strategy == "adaptive":
        r["loss"].backward()
        grad = module.token_gate.mlp[-1].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
