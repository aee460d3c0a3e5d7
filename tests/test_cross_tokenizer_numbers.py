"""The numbers around a cross-tokenizer source (issue 11): what the source reads (its BOS, data text literally),
its CE on the same scale as any other source's, the vocabulary map's cutoff and mass shares, the chunked
reduction of its logits, the offline cache, and GGUF tokenizers.

References are computed here independently: the source model run by hand on its own tokenisation of the text.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_alignment import _handmade, _ids
from tiny import tiny_llama
from tokenizers import processors

from lightning_fuse.alignment import EXACT, TokenAligner, default_prefix
from lightning_fuse.alignment.carry import carry_over, reduce_logits
from lightning_fuse.data import pack
from lightning_fuse.fusion import source_output_from_logits
from lightning_fuse.sources import FrozenSource, SourceSpec

WORDS = ["Ġhello", "Ġworld", "hello", "world"]


@pytest.fixture(scope="module")
def tokenizers():
    """GPT-2 style (byte-level, no BOS added), and Llama style (metaspace, byte fallback) with and without BOS."""
    gpt2 = _handmade("byte_level", WORDS)
    gpt2.bos_token = "<|endoftext|>"  # as GPT-2: a bos_token that encoding never adds
    llama = _handmade("metaspace", ["▁hello", "▁wor", "world", "ld"])
    llama_bos = copy.deepcopy(llama)
    bos = llama_bos.convert_tokens_to_ids("<s>")
    llama_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    llama_bos.bos_token = "<s>"
    return gpt2, llama, llama_bos


def _source(tokenizer, target_tokenizer, seed: int = 0) -> FrozenSource:
    model = tiny_llama(len(tokenizer), seed=seed)
    source = FrozenSource(SourceSpec("src", "unused"), model, tokenizer, quantized=False)
    source.attach_aligner(target_tokenizer)
    return source


def _nll(model, ids: list[int]) -> list[float]:
    """-log p(ids[j] | ids[:j]) for j >= 1, in float64, from the model run on ``ids``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return [-float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]


# ------------------------------------------------------------------------------------------------ 1. BOS
def test_source_reads_its_own_bos_and_a_bos_less_source_none(tokenizers):
    gpt2, llama, llama_bos = tokenizers
    bos = llama_bos.bos_token_id
    assert default_prefix(llama_bos) == [bos] and default_prefix(llama) == [] and default_prefix(gpt2) == []
    ids = _ids(gpt2, "hello world hello")  # hello Ġworld Ġhello
    block = TokenAligner(llama_bos, gpt2).align(ids)
    assert block.src_ids == [bos, *_ids(llama, "hello world hello")]  # <s> ▁hello ▁wor ld ▁hello
    assert block.src_pos == [-1, 3, -1]  # target 'Ġhello' = source '▁hello' (token 4, predicted at 3)
    # GPT-2 style: a bos_token that its tokenizer never adds: the source reads the text alone
    back = TokenAligner(gpt2, llama).align(_ids(llama, "hello world hello"))
    assert back.src_ids == ids and back.src_pos == [-1, -1, 1, -1]


# ------------------------------------------------------------------------------------------------ 2. literal text
def test_literal_special_token_text_is_never_a_control_token(tokenizers):
    gpt2, llama, llama_bos = tokenizers
    docs = ["hello </s> world <s>", "hello <|endoftext|> world"]
    for tok in (gpt2, llama):  # target side: only the EOS placed between documents is a control token
        ids = pack(docs, tok, 1).flatten().tolist()
        assert ids.count(tok.eos_token_id) == 2, tok.convert_ids_to_tokens(ids)
    src_special = set(llama_bos.all_special_ids)
    ids = pack(docs, gpt2, 1).flatten().tolist()  # gpt2 target: '</s>' and '<s>' are characters, then a real EOS
    block = TokenAligner(llama_bos, gpt2).align(ids)
    assert block.src_ids[0] == llama_bos.bos_token_id
    specials = [i for i in block.src_ids[1:] if i in src_special]
    assert specials == [llama_bos.eos_token_id] * 2, llama_bos.convert_ids_to_tokens(block.src_ids)
    eos_at = ids.index(gpt2.eos_token_id)
    j = block.src_pos[eos_at - 1]  # the real EOS is still the source's own EOS, aligned 1:1
    assert j >= 0 and block.src_ids[j + 1] == llama_bos.eos_token_id
    # llama target, gpt2 source: the characters '<|endoftext|>' stay characters for the source too
    ids = pack(docs, llama, 1).flatten().tolist()
    block = TokenAligner(gpt2, llama).align(ids)
    assert block.src_ids.count(gpt2.eos_token_id) == 2


# ------------------------------------------------------------------------------------------------ 3. CE
def test_cross_tokenizer_ce_is_the_sources_likelihood_of_the_whole_block(tokenizers):
    """CE = the source's NLL of the block's text under its own tokenisation (with its BOS) / target positions;
    today's code averaged over the 1:1 positions only."""
    gpt2, llama, llama_bos = tokenizers
    source = _source(llama_bos, gpt2)
    ids = torch.tensor([_ids(gpt2, "hello world hello world")])  # hello Ġworld Ġhello Ġworld: 3 gold positions
    out = source.forward(ids, torch.ones_like(ids), ids, top_k=4, vocab_size=len(gpt2))
    src = [llama_bos.bos_token_id, *_ids(llama, "hello world hello world")]  # <s> ▁hello ▁wor ld ▁hello ▁wor ld
    nll = _nll(source.model, src)  # nll[j - 1] = -log p(src[j])
    # '▁hello' (src[1]) is the text of target token 0, which no target position predicts: not counted
    expected_gold = [-(nll[1] + nll[2]), -nll[3], -(nll[4] + nll[5]), 0.0]
    torch.testing.assert_close(out.gold_logprob[0].double(), torch.tensor(expected_gold, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(float(out.ce[0]), sum(nll[1:]) / 3, rtol=0, atol=1e-5)
    assert source.alignment_rate == pytest.approx(1 / 3)  # only 'Ġhello' is 1:1


def test_same_tokenizer_through_the_aligner_equals_the_direct_path(tokenizers):
    """A source whose tokenisation agrees with the target's gives, through the aligner, today's per-token CE,
    gold log-probs and top-k: the comparable CE is the usual CE when there is nothing to compare."""
    gpt2, _, _ = tokenizers
    source = _source(gpt2, copy.deepcopy(gpt2))
    ids = torch.tensor([_ids(gpt2, "hello world hello world hello"), _ids(gpt2, "world hello world hello world")])
    labels = ids.clone()
    labels[1, 3:] = -100  # a row with fewer gold tokens
    mask = (labels != -100).long()
    out = source.forward(ids, mask, labels.masked_fill(mask == 0, -100), top_k=5, vocab_size=len(gpt2))
    with torch.no_grad():
        direct = source_output_from_logits(source.model(input_ids=ids, attention_mask=mask).logits, labels, 5)
    torch.testing.assert_close(out.ce, direct.ce, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.gold_logprob[0], direct.gold_logprob[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.dist.logprobs[0, :-1], direct.dist.logprobs[0, :-1], rtol=0, atol=1e-5)
    assert torch.equal(out.dist.ids[0, :-1], direct.dist.ids[0, :-1])
    shares = source.mass.shares()
    assert shares["exact"] == pytest.approx(1.0) and shares["dropped"] == 0.0


# ------------------------------------------------------------------------------------------------ 4. mass shares
def test_mass_shares_add_up_to_the_carried_top_k_mass(tokenizers):
    gpt2, llama, llama_bos = tokenizers
    source = _source(gpt2, llama_bos, seed=3)  # gpt2's single bytes have no metaspace counterpart: dropped mass
    ids = torch.tensor([_ids(llama_bos, "hello\nworld hello world")])
    out = source.forward(ids, torch.ones_like(ids), ids, top_k=8, vocab_size=len(llama_bos))
    aligned = source.aligner.align_batch(ids)
    with torch.no_grad():
        logits = source.model(input_ids=aligned.src_ids).logits
    top = torch.log_softmax(logits.double(), -1).topk(8, -1)
    pos = aligned.src_pos[0]
    ok = pos[pos >= 0]
    expected = float(top.values[0, ok].exp().sum())
    m = source.mass
    assert m.exact + m.min_ed + m.dropped == pytest.approx(expected, rel=1e-5)
    kinds = source.aligner.vocab_kind[top.indices[0, ok]]
    assert m.exact == pytest.approx(float(top.values[0, ok].exp()[kinds == EXACT].sum()), rel=1e-5)
    carried = out.dist.probs[0, pos >= 0].sum()  # what is kept: everything but the dropped mass
    assert float(carried) == pytest.approx(m.exact + m.min_ed, rel=1e-4)


# ------------------------------------------------------------------------------------------------ 6. memory
def test_chunked_reduction_equals_dense_float64():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 4
    src_ids = torch.randint(0, 50, (3, 7))
    ref = torch.log_softmax(logits.double(), -1)
    for chunk in (50, 3 * 50 * 2, 1 << 26):  # one position per chunk, two, all
        top_lp, top_ids, next_lp = reduce_logits(logits, src_ids, 4, chunk_elements=chunk)
        values, indices = ref.topk(4, -1)
        torch.testing.assert_close(top_lp.double(), values, rtol=0, atol=1e-5)
        assert torch.equal(top_ids, indices)
        expected = ref[:, :-1].gather(-1, src_ids[:, 1:, None]).squeeze(-1)
        torch.testing.assert_close(next_lp[:, :-1].double(), expected, rtol=0, atol=1e-5)
        assert (next_lp[:, -1] == 0).all()


def test_carry_over_chunked_equals_unchunked(tokenizers):
    gpt2, llama, llama_bos = tokenizers
    source = _source(llama_bos, gpt2, seed=1)
    ids = torch.tensor([_ids(gpt2, "hello world hello world"), _ids(gpt2, "hello\nworld hello")])
    aligned = source.aligner.align_batch(ids)
    with torch.no_grad():
        logits = source.model(input_ids=aligned.src_ids, attention_mask=aligned.src_mask.long()).logits
    args = (aligned, source.aligner.vocab_map, source.aligner.vocab_kind, ids, 5, len(gpt2))
    small, _, _ = carry_over(logits, *args, chunk_elements=logits.shape[-1])
    big, _, _ = carry_over(logits, *args)
    for a, b in ((small.dist.logprobs, big.dist.logprobs), (small.gold_logprob, big.gold_logprob), (small.ce, big.ce)):
        torch.testing.assert_close(a, b)
    assert torch.equal(small.dist.ids, big.dist.ids)


def test_rows_of_different_source_lengths_equal_one_row_at_a_time(tokenizers):
    """Source ids are right-padded to the longest row; the padding changes nothing at the real tokens."""
    gpt2, llama, llama_bos = tokenizers
    source = _source(llama_bos, gpt2, seed=2)
    a, b = _ids(gpt2, "hello world hello world"), _ids(gpt2, "hello\nworld hello")  # 7 and 5 source tokens
    both = source.forward(torch.tensor([a, b]), torch.ones(2, 4, dtype=torch.long), torch.tensor([a, b]), 5, len(gpt2))
    for r, ids in enumerate((a, b)):
        t = torch.tensor([ids])
        one = source.forward(t, torch.ones_like(t), t, 5, len(gpt2))
        torch.testing.assert_close(both.ce[r : r + 1], one.ce, rtol=0, atol=1e-5)
        torch.testing.assert_close(both.gold_logprob[r : r + 1], one.gold_logprob, rtol=0, atol=1e-5)
        torch.testing.assert_close(both.dist.logprobs[r : r + 1], one.dist.logprobs, rtol=0, atol=1e-5)


def test_head_per_chunk_equals_reduction_of_the_logits():
    from lightning_fuse.alignment.carry import reduce_hidden

    torch.manual_seed(0)
    hidden, head = torch.randn(2, 9, 16), torch.nn.Linear(16, 40, bias=False)
    src_ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        a = reduce_logits(head(hidden), src_ids, 5)
        b = reduce_hidden(hidden, head, src_ids, 5, chunk_elements=80)  # two positions per chunk
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
