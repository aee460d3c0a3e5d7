"""Loading sources: 8-bit through bitsandbytes (also on CPU), the configured dtype otherwise, frozen either way."""

import logging

import pytest
import torch

from lightning_fuse.sources import FrozenSource, SourceSpec


def test_source_loads_in_8bit_on_cpu_and_matches_float32(tiny_world, caplog):
    bnb = pytest.importorskip("bitsandbytes")
    spec8 = SourceSpec("words8", tiny_world["words"], load_in_8bit=True)
    with caplog.at_level(logging.INFO, logger="lightning_fuse.sources"):
        source8 = FrozenSource.load(spec8, torch.device("cpu"))
    assert "8-bit (bitsandbytes)" in caplog.text
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in source8.model.modules())
    assert not any(p.requires_grad for p in source8.model.parameters())
    source32 = FrozenSource.load(SourceSpec("words", tiny_world["words"], load_in_8bit=False), torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 24))
    mask = torch.ones_like(ids)
    out8 = source8.forward(ids, mask, ids, top_k=5, vocab_size=320)
    out32 = source32.forward(ids, mask, ids, top_k=5, vocab_size=320)
    # int8 weights: close to fp32, not equal
    assert torch.allclose(out8.ce, out32.ce, atol=0.15), (out8.ce, out32.ce)
    assert (out8.dist.ids[..., 0] == out32.dist.ids[..., 0]).float().mean() > 0.8
    bytes8 = sum(p.numel() * p.element_size() for p in source8.model.parameters())
    bytes32 = sum(p.numel() * p.element_size() for p in source32.model.parameters())
    assert bytes8 < bytes32


def test_auto_8bit_means_configured_dtype_on_cpu(tiny_world, caplog):
    spec = SourceSpec("words", tiny_world["words"], load_in_8bit="auto", dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger="lightning_fuse.sources"):
        source = FrozenSource.load(spec, torch.device("cpu"))
    assert not source.quantized
    assert next(source.model.parameters()).dtype == torch.bfloat16
    assert "bfloat16 on cpu (8-bit is used on CUDA only with load_in_8bit=auto)" in caplog.text
    assert not source.model.training


def test_bitsandbytes_cpu_cast_notice_is_shown_once(tiny_world, caplog):
    pytest.importorskip("bitsandbytes")
    source = FrozenSource.load(SourceSpec("w", tiny_world["words"], load_in_8bit=True), torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 8))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            source.forward(ids, torch.ones_like(ids), ids, top_k=5, vocab_size=320)
        logging.getLogger("bitsandbytes.autograd._functions").warning("another bitsandbytes warning")
    notices = [r for r in caplog.records if "inputs will be cast from" in r.getMessage()]
    assert len(notices) <= 1  # 0 if an earlier test in this process already showed it
    assert any("another bitsandbytes warning" in r.getMessage() for r in caplog.records)  # others still shown


def test_auto_8bit_keeps_a_declared_dtype_on_cuda(tiny_world):
    """``load_in_8bit: auto`` quantises on CUDA only when no dtype is declared (was: bf16 sources became int8)."""
    from lightning_fuse.sources import _use_8bit, load_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    declared = SourceSpec("words", tiny_world["words"], dtype="bfloat16")
    default = SourceSpec("words", tiny_world["words"])
    assert not _use_8bit(declared, cuda) and _use_8bit(default, cuda)
    assert not _use_8bit(default, cpu)
    assert load_mode(declared, cuda) == {"dtype": "bfloat16"}
    assert load_mode(default, cuda) == {"dtype": "float32", "quantization": "int8"}
    assert load_mode(SourceSpec("w", tiny_world["words"], load_in_8bit=True), cpu)["quantization"] == "int8"


def test_8bit_load_passes_the_dtype_with_the_quantization_config(tiny_world, monkeypatch):
    """The non-quantised parts load in the declared dtype (was: ``dtype`` dropped on the 8-bit path -> float32)."""
    import transformers

    from lightning_fuse.sources import load_causal_lm

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(OSError):
        load_causal_lm(tiny_world["words"], "source", dtype="bfloat16", load_in_8bit=True, device="cpu")
    assert seen["dtype"] == torch.bfloat16 and seen["quantization_config"].load_in_8bit


def test_cache_identity_records_quantization(tiny_world):
    """An int8 cache and a float32 one have different identities (was: treated as the same)."""
    from lightning_fuse.offline import source_identity

    spec = SourceSpec("words", tiny_world["words"])
    on_cuda = source_identity(spec, device="cuda")["model_id"]
    on_cpu = source_identity(spec, device="cpu")["model_id"]
    assert on_cuda["quantization"] == "int8" and "quantization" not in on_cpu and on_cuda != on_cpu
    assert on_cpu["dtype"] == "float32"
