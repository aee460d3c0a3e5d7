"""The GPU path on the tiny world: 8-bit sources, bf16-mixed steps, routed mode and exact resume on CUDA.

Every test is marked ``cuda``: skipped without CUDA, run on CUDA when there is one. ``LIGHTNING_FUSE_TEST_DEVICE=cpu``
runs the same bodies on the CPU (bitsandbytes' int8 layers and Lightning's ``bf16-mixed`` run there too), which
checks the test code where no GPU is lent; ``LIGHTNING_FUSE_TEST_DEVICE=cuda`` turns a missing GPU into an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from gpu_device import accelerator
from lightning.pytorch.callbacks import Callback

from lightning_fuse import FrozenSource, FusionModule, SelectionFeedback, SourceSpec, TextDataModule
from lightning_fuse.compare import output_agreement
from lightning_fuse.fusion import next_token_mask

pytestmark = pytest.mark.cuda

# 8-bit vs bf16 on the tiny world's sources (32 x 32 validation tokens of both domains, top-5). LLM.int8 rounds
# each weight to 1/127 of its row's absmax (outlier activations > 6 stay in fp16) and bf16 rounds every value to 8
# mantissa bits: two errors of the same order, so the two runs differ by about what bf16 differs from fp32.
# Measured with bitsandbytes 0.50 on CPU (words / sums / general): top-1 agreement 0.946 / 0.983 / 0.985 (the
# flips are near-ties: 1.0 where the top-1 leads by >= 0.5 nats), top-5 id overlap 0.95-0.98, max |top-k log-prob
# diff| 0.06-0.09 nats, mean |gold log-prob diff| 0.006-0.012, max relative CE diff <= 0.25%; bf16 vs fp32 alone
# gives max top-k diffs of 0.03-0.06. The thresholds leave 3-5x headroom for CUDA's int8 kernels; a wrong scale or
# a lost outlier path gives another distribution (top-1 agreement near chance, log-prob diffs of nats).
MIN_TOP1 = 0.9
MIN_TOP1_CLEAR = 0.99
MIN_TOPK_OVERLAP = 0.85
MAX_TOPK_LOGPROB = 0.3
MAX_MEAN_GOLD_LOGPROB = 0.05
MAX_REL_CE = 0.02

# bf16-mixed vs fp32, one fused training step from the same weights on the same batch (autocast: matmuls in bf16,
# losses and the log-softmax in fp32). Measured on CPU: relative diff of loss / clm / kd / selector loss 5e-5 /
# 2e-6 / 6e-4 / 5e-5, target gradient cosine 0.99991, norm ratio 1.00002.
MAX_REL_LOSS = 0.02
MIN_GRAD_COSINE = 0.99
MAX_REL_GRAD_NORM = 0.05


def _blocks(world: dict[str, str], tokenizer, n: int = 32, length: int = 32) -> torch.Tensor:
    """``[n, length]`` token ids of both domains' validation text (half each)."""
    rows = []
    for domain in ("words", "sums"):
        text = (Path(world["corpus"]) / domain / "val.txt").read_text()
        ids = torch.tensor(tokenizer(text)["input_ids"][: (n // 2) * length])
        rows.append(ids.view(n // 2, length))
    return torch.cat(rows)


def _make(world, names, **kwargs) -> FusionModule:
    kwargs.setdefault("selector_features", "rewards")
    return FusionModule(target=world["target"], sources=[SourceSpec(n, world[n]) for n in names], **kwargs)


def _trainer(device: torch.device, steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator(device), devices=1, max_steps=steps, callbacks=list(callbacks), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, **kwargs,
    )


def _data(world, batch_size: int = 8) -> TextDataModule:
    return TextDataModule(world["corpus"], block_size=32, batch_size=batch_size, max_blocks_per_domain=16, seed=0)


# ----------------------------------------------------------------------------------------------- 8-bit sources
@pytest.mark.parametrize("name", ["words", "sums", "general"])
def test_8bit_source_loads_through_bitsandbytes_and_matches_its_bf16_self(tiny_world, cuda_device, name):
    import bitsandbytes as bnb

    eight = FrozenSource.load(SourceSpec(name, tiny_world[name], load_in_8bit=True), cuda_device)
    bf16 = FrozenSource.load(SourceSpec(name, tiny_world[name], load_in_8bit=False, dtype="bfloat16"), cuda_device)
    bf16.to(cuda_device)
    layers = [m for m in eight.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert eight.quantized and layers, "no bitsandbytes int8 layer in the 8-bit source"
    assert all(m.weight.dtype == torch.int8 for m in layers)
    assert eight.device.type == bf16.device.type == cuda_device.type
    ids = _blocks(tiny_world, bf16.tokenizer).to(cuda_device)
    mask = torch.ones_like(ids)
    vocab = len(bf16.tokenizer)
    a = eight.forward(ids, mask, ids, top_k=5, vocab_size=vocab)
    b = bf16.forward(ids, mask, ids, top_k=5, vocab_size=vocab)
    assert a.dist.ids.device.type == cuda_device.type
    got = output_agreement(a, b, next_token_mask(ids))
    assert got.positions == 32 * 31
    assert got.top1 >= MIN_TOP1 and got.top1_clear >= MIN_TOP1_CLEAR, got
    assert got.topk_overlap >= MIN_TOPK_OVERLAP, got
    assert got.max_abs_topk_logprob <= MAX_TOPK_LOGPROB, got
    assert got.mean_abs_gold_logprob <= MAX_MEAN_GOLD_LOGPROB and got.max_rel_ce <= MAX_REL_CE, got


def test_load_in_8bit_auto_is_8bit_on_cuda_only(tiny_world, cuda_device):
    source = FrozenSource.load(SourceSpec("words", tiny_world["words"]), cuda_device)  # load_in_8bit="auto"
    assert source.quantized == (cuda_device.type == "cuda")


# ----------------------------------------------------------------------------------------------- bf16-mixed
class _StepRecord(Callback):
    """The first step's loss parts and the target's gradients just before the optimizer uses them."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.dtypes: set[torch.dtype] = set()
        self.losses: dict[str, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            params = list(pl_module.target.named_parameters())
            self.dtypes = {p.dtype for _, p in params}
            self.grads = {n: p.grad.detach().float().cpu().clone() for n, p in params if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.losses:
            self.losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def _one_step(world, device, precision: str) -> _StepRecord:
    pl.seed_everything(0, verbose=False)
    module = _make(world, ["words", "sums"], strategy="adaptive", top_k=1)
    record = _StepRecord()
    _trainer(device, 1, [record], precision=precision).fit(module, _data(world))
    return record


def test_fused_step_in_bf16_mixed_matches_fp32(tiny_world, cuda_device):
    full = _one_step(tiny_world, cuda_device, "32-true")
    mixed = _one_step(tiny_world, cuda_device, "bf16-mixed")
    assert mixed.dtypes == full.dtypes == {torch.float32}  # mixed: fp32 weights, bf16 compute
    assert full.losses.keys() == mixed.losses.keys() and {"train/loss", "train/clm", "train/kd"} <= full.losses.keys()
    for key, ref in full.losses.items():
        assert abs(mixed.losses[key] - ref) <= MAX_REL_LOSS * abs(ref) + 1e-4, (key, mixed.losses[key], ref)
    assert full.grads.keys() == mixed.grads.keys() and full.grads
    a = torch.cat([full.grads[k].flatten() for k in sorted(full.grads)])
    b = torch.cat([mixed.grads[k].flatten() for k in sorted(full.grads)])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert cosine >= MIN_GRAD_COSINE, cosine
    assert abs(float(b.norm() / a.norm()) - 1) <= MAX_REL_GRAD_NORM, (float(b.norm()), float(a.norm()))


# ----------------------------------------------------------------------------------------------- routed mode
def test_routed_mode_runs_only_the_kept_sources(tiny_world, cuda_device):
    module = _make(tiny_world, ["words", "sums", "general"], strategy="adaptive", top_k=1, routing="before_sources",
                   selector_features="hidden", explore=0.0)
    pl.seed_everything(0, verbose=False)
    dm = _data(tiny_world)
    _trainer(cuda_device, 5).fit(module, dm)
    assert all(s.device.type == cuda_device.type for s in module.sources)
    assert all(s.quantized == (cuda_device.type == "cuda") for s in module.sources)  # load_in_8bit="auto"
    assert sum(s.rows_forwarded for s in module.sources) == 5 * 8  # K = 1: one source row per sequence, not N = 3
    assert sum(s.rows_forwarded > 0 for s in module.sources) >= 1


# ----------------------------------------------------------------------------------------------- exact resume
@pytest.fixture
def restore_determinism():
    """Lightning's ``deterministic=True`` switches torch's global flags: put them back after the test."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    benchmark = torch.backends.cudnn.benchmark
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.benchmark = benchmark
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def _state(module: FusionModule, feedback: SelectionFeedback) -> dict:
    return {
        "target": {k: v.detach().cpu() for k, v in module.target.state_dict().items()},
        "selector": {k: v.detach().cpu() for k, v in module.selector.state_dict().items()},
        "feedback": {k: v.cpu() if torch.is_tensor(v) else v for k, v in feedback.state_dict().items()},
    }


def _assert_bitwise(a, b, where="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_resume_is_exact_with_deterministic(tiny_world, cuda_device, tmp_path, restore_determinism, precision):
    """6 steps straight vs 3 steps, a checkpoint, and 3 more from it: the same bits (target, selector, feedback)."""

    def run(steps, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = _make(tiny_world, ["words", "sums"], strategy="adaptive", top_k=1)
        feedback = SelectionFeedback(beta=0.1)
        trainer = _trainer(cuda_device, steps, [feedback], deterministic=True, precision=precision,
                           default_root_dir=tmp_path)
        trainer.fit(module, _data(tiny_world, batch_size=4), ckpt_path=ckpt_path)
        return trainer, module, feedback

    _, full, full_feedback = run(6)
    part, _, _ = run(3)
    assert torch.are_deterministic_algorithms_enabled()
    part.save_checkpoint(tmp_path / "part.ckpt")
    _, resumed, resumed_feedback = run(6, str(tmp_path / "part.ckpt"))
    assert next(resumed.target.parameters()).device.type == cuda_device.type
    _assert_bitwise(_state(resumed, resumed_feedback), _state(full, full_feedback))
    assert resumed_feedback.steps == 6
