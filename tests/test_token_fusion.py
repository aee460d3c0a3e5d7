"""Per-token fusion (``selection: token``, lightning_fuse/token_fusion.py): math against dense references, the gate's
gradient at every position, and a constructed world where the right teacher switches in the middle of every block."""

import lightning.pytorch as pl
import pytest
import torch
from test_module import fit, make
from torch.utils.data import DataLoader, Dataset

from lightning_fuse import FusionModule, SelectionFeedback, SourceSpec
from lightning_fuse.fusion import SourceOutput, SparseDist, fuse, next_token_mask
from lightning_fuse.selector import Selection
from lightning_fuse.token_fusion import fixed_token_weights, token_mixture_nll, token_selection, window_mean


def _random_outputs(b=2, length=6, n=3, k=4, vocab=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(n):
        ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(b * length)]).view(b, length, k)
        lp = torch.log_softmax(torch.randn(b, length, vocab, generator=g), -1)
        outs.append(SourceOutput(SparseDist(ids, lp.gather(-1, ids)), torch.randn(b, length, generator=g) - 2, torch.rand(b)))
    return outs


def _dense(dist: SparseDist, vocab: int) -> torch.Tensor:
    p = torch.zeros(*dist.ids.shape[:-1], vocab, dtype=torch.float64)
    return p.scatter_add_(-1, dist.ids.clamp_min(0), dist.probs.double() * (dist.ids >= 0))


def test_fuse_per_position_weights_match_a_dense_mixture():
    outs = _random_outputs()
    w = torch.softmax(torch.randn(2, 6, 3), -1)
    fused = _dense(fuse(outs, w), 12)
    ref = sum(w[..., i, None].double() * _dense(o.dist, 12) for i, o in enumerate(outs))
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-5)
    seq = torch.softmax(torch.randn(2, 3), -1)  # [B, N] is the same as [B, L, N] constant over positions
    torch.testing.assert_close(_dense(fuse(outs, seq), 12), _dense(fuse(outs, seq[:, None].expand(2, 6, 3)), 12))


def test_token_baselines():
    gold = torch.tensor([[[-1.0, -3.0], [-3.0, -1.0], [-1.0, -3.0], [-0.5, -2.0]]])  # [1, 4, 2]
    kept = torch.ones_like(gold, dtype=torch.bool)
    w = fixed_token_weights("min_ce", gold, kept)
    assert w.argmax(-1).tolist() == [[0, 1, 0, 0]]
    smoothed = fixed_token_weights("min_ce", gold, kept, window=3)  # position 1 is outvoted by its neighbours
    assert smoothed.argmax(-1).tolist() == [[0, 0, 0, 0]]
    torch.testing.assert_close(window_mean(gold, 3)[0, 1], gold[0, :3].mean(0))
    avg = fixed_token_weights("avg_ce", gold, kept)  # FuseLLM's softmax(reward) per token, reward = P(gold)
    torch.testing.assert_close(avg, torch.softmax(gold.exp(), -1))
    only_b = kept.clone()
    only_b[..., 0] = False
    assert fixed_token_weights("min_ce", gold, only_b).argmax(-1).tolist() == [[1, 1, 1, 1]]


def test_token_mixture_nll_matches_reference():
    gold = torch.randn(2, 5, 3) - 1
    gate = torch.softmax(torch.randn(2, 5, 3), -1)
    mask = torch.rand(2, 5) > 0.3
    ref = -(torch.log((gate.double() * gold.double().exp()).sum(-1)) * mask).sum() / mask.sum()
    torch.testing.assert_close(token_mixture_nll(gold, gate, mask).double(), ref)


@pytest.mark.parametrize("top_k", [1, 2])
def test_token_gate_gets_gradient_at_every_position(tiny_world, top_k):
    """The per-position mixture likelihood reaches the gate's logits at every gold position, also with K = 1 (where
    the distilled weight over the one kept source is identically 1)."""
    module = make(tiny_world, ["words", "sums", "general"], strategy="adaptive", top_k=top_k, selection="token",
                  token_features="hidden")
    module.configure_model()
    captured = {}

    def keep(_, __, out):
        out.retain_grad()
        captured["logits"] = out

    module.token_gate.register_forward_hook(keep)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (4, 24), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "domain": torch.zeros(4)}
    r = module._step(batch, "train")
    r["token_selector_loss"].backward()
    grad = captured["logits"].grad.abs().sum(-1)  # [B, L]
    mask = next_token_mask(batch["labels"])
    assert bool((grad[mask] > 0).all()), grad
    assert r["selection"].token_weights.shape == (4, 24, 3)
    kept = r["selection"].mask.unsqueeze(1).expand(-1, 24, -1)
    assert bool((r["selection"].token_weights[~kept] == 0).all())  # only the row's kept sources teach
    torch.testing.assert_close(r["selection"].token_weights.sum(-1), torch.ones(4, 24))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.token_gate.parameters())


def test_routed_rows_never_weight_a_source_that_did_not_run():
    outs = _random_outputs(b=3, n=3)
    ran = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    for i, o in enumerate(outs):
        o.gold_logprob[~ran[:, i]] = float("-inf")
    sel = Selection(torch.full((3, 3), 1 / 3), ran, ran.float() / ran.sum(-1, keepdim=True))
    for strategy in ("min_ce", "avg_ce"):  # fixed strategies keep every source that has an output
        tw = token_selection(strategy, sel, outs, torch.ones(3, 6, dtype=torch.bool)).token_weights
        assert bool((tw[~ran.unsqueeze(1).expand(-1, 6, -1)] == 0).all())


# ---------------------------------------------------------------------------- a world where the teacher switches
HALF = 16
RANGES = ((20, 60), (100, 140))  # first-half tokens, second-half tokens: next = x + 1 inside the range


class SwitchWorld(Dataset):
    """Offline batches: each block is HALF tokens counting up in range 1, then HALF counting up in range 2. Source
    A gives 0.9 to the gold token at first-half positions and 0.9 to a wrong one at second-half positions; B the
    opposite. Both have the same per-sequence CE, so no per-sequence weighting can pick the right one for a half."""

    def __init__(self, batches: int, batch_size: int = 16, seed: int = 0) -> None:
        self.batches, self.batch_size, self.seed = batches, batch_size, seed

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_000 + index)
        rows = []
        for lo, hi in RANGES:
            start = torch.randint(lo, hi, (self.batch_size, 1), generator=g)
            rows.append(lo + (start - lo + torch.arange(HALF)) % (hi - lo))
        ids = torch.cat(rows, dim=1)
        labels = ids.clone()
        gold = torch.zeros_like(ids)
        gold[:, :-1] = ids[:, 1:]
        wrong = (gold + 7).clamp_max(300)
        mask = next_token_mask(labels)
        first = torch.arange(2 * HALF) < HALF
        cached = {}
        for name, right in (("A", first), ("B", ~first)):
            right = right.expand_as(ids)
            top = torch.where(right, gold, wrong)
            other = torch.where(right, wrong, gold)
            lp = torch.log(torch.tensor([0.9, 0.05])).expand(*ids.shape, 2)
            gold_lp = torch.where(right, lp[..., 0], lp[..., 1]) * mask
            cached[name] = {"ids": torch.stack([top, other], -1), "logprobs": lp.clone(), "gold_logprob": gold_lp,
                            "ce": -gold_lp.sum(-1) / mask.sum(-1)}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "domain": torch.zeros(self.batch_size, dtype=torch.long), "cached": cached}


def _fit_switch(world, steps=100, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = FusionModule(target=world["target"], sources=[SourceSpec("A", world["words"]), SourceSpec("B", world["sums"])],
                          offline=True, clm_weight=0.1, learning_rate=1e-2, **kwargs)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[SelectionFeedback(beta=0.0)])
    trainer.fit(module, DataLoader(SwitchWorld(steps), batch_size=None))
    batch = SwitchWorld(1, seed=1)[0]
    module.eval()
    with torch.no_grad():
        r = module._step(batch, "val")
        logits = module.target(input_ids=batch["input_ids"]).logits
    lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    halves = (slice(0, HALF - 1), slice(HALF, 2 * HALF - 1))  # positions predicting inside each half
    ce = [float(-lp[:, h].mean()) for h in halves]
    return module, r["selection"], ce


def test_per_token_fusion_switches_teacher_mid_block_and_per_sequence_cannot(tiny_world):
    _, sel, token_ce = _fit_switch(tiny_world, strategy="adaptive", top_k=2, selection="token", token_features="hidden",
                                   selector_features="rewards")
    w = sel.token_weights  # [B, L, 2], learned from the target's hidden states only (no gold signal in the features)
    assert float(w[:, : HALF - 1, 0].mean()) > 0.9 and float(w[:, HALF : 2 * HALF - 1, 1].mean()) > 0.9, w.mean(0)
    _, seq_sel, seq_ce = _fit_switch(tiny_world, strategy="adaptive", top_k=2, selector_features="rewards")
    _, _, min_ce = _fit_switch(tiny_world, strategy="min_ce")
    _, _, tok_min_ce = _fit_switch(tiny_world, strategy="min_ce", selection="token")
    # per sequence, one weight per row teaches both halves: at least one half is taught the wrong token
    assert max(token_ce) < 0.5, token_ce
    assert max(tok_min_ce) < 0.5, tok_min_ce
    assert max(seq_ce) > max(token_ce) + 0.3, (seq_ce, token_ce)
    assert max(min_ce) > max(token_ce) + 0.4, (min_ce, token_ce)


def test_online_token_fusion_trains_gate_and_restores_it_exactly(tiny_world, tmp_path):
    """Online sources, per-token adaptive: the gate trains, lives in the checkpoint and in the optimizer, resumes
    bit-exact, and evaluation reports per-token shares."""
    module = make(tiny_world, ["words", "sums"], strategy="adaptive", top_k=2, selection="token")
    module.configure_model()
    initial = {k: v.clone() for k, v in module.token_gate.state_dict().items()}
    trainer, results = fit(module, tiny_world, steps=8, callbacks=[SelectionFeedback(beta=0.1)], default_root_dir=tmp_path)
    trained = module.token_gate.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "token gate did not change"
    for d in ("words", "sums"):  # shares of the domain's gold tokens, summing to 1 over the sources
        assert abs(results[f"val/{d}/words_share"] + results[f"val/{d}/sums_share"] - 1) < 1e-4
    ckpt = tmp_path / "token.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert any(k.startswith("token_gate.") for k in saved["state_dict"])
    n_params = sum(1 for _ in module.parameters())
    assert len(saved["optimizer_states"][0]["state"]) == n_params  # the gate's AdamW moments are saved too
    restored = FusionModule.load_from_checkpoint(ckpt)
    for k, v in trained.items():
        assert torch.equal(restored.token_gate.state_dict()[k], v), k


def test_token_selection_bad_input(tiny_world):
    with pytest.raises(ValueError, match=r"`--model.selection` can be sequence, token, got 'word'"):
        make(tiny_world, ["words"], selection="word")
    with pytest.raises(ValueError, match=r"`--model.token_window` must be >= 1"):
        make(tiny_world, ["words"], strategy="min_ce", selection="token", token_window=0)


def test_tensorboard_token_shares_weight_histograms_and_token_picture(tiny_world, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_fuse import SelectionMatrixLogger, TokenPictureLogger

    module = make(tiny_world, ["words", "sums"], strategy="adaptive", top_k=2, selection="token")
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    callbacks = [SelectionFeedback(beta=0.0, log_every_n_steps=2), SelectionMatrixLogger(), TokenPictureLogger(rows=2)]
    fit(module, tiny_world, steps=4, callbacks=callbacks, logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    for name in ("words", "sums"):
        assert f"selection/token_share/{name}" in tags["scalars"]
        assert f"selection/weight/{name}" in tags["histograms"]
        assert f"selection/token_weight/{name}" in tags["histograms"]
        assert f"val/{name}/words_share" in tags["scalars"]  # per-domain (per-token) shares
    assert {"selection/val_tokens", "selection/val_matrix"} <= set(tags["images"])
    assert "hp_metric" not in tags["scalars"]
    image = acc.Images("selection/val_tokens")[-1]
    assert image.width > 400 and image.height > 100


def test_teachers_shift_by_one_and_follow_token_weights():
    from lightning_fuse.token_picture import teachers

    tw = torch.zeros(1, 4, 2)
    tw[0, :2, 0], tw[0, 2:, 1] = 1.0, 0.8
    tw[0, 2:, 0] = 0.2
    sel = Selection(torch.ones(1, 2) / 2, torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0.6, 0.4]]), tw)
    mask = torch.tensor([[True, True, True, False]])
    teacher, weight = teachers(sel, mask)
    assert teacher.tolist() == [[-1, 0, 0, 1]]  # token t is taught at position t - 1
    torch.testing.assert_close(weight, torch.tensor([[0.0, 1.0, 1.0, 0.8]]))


def test_shipped_configs_log_the_selection_matrix_and_no_hp_metric():
    from pathlib import Path

    import yaml

    for path in ("demo", "offline", "two_family", "smollm2", "example_subclass"):
        cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{path}.yaml").read_text())
        classes = [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]
        assert "SelectionMatrixLogger" in classes and "TokenPictureLogger" in classes, path
        assert cfg["trainer"]["logger"]["init_args"]["default_hp_metric"] is False, path
