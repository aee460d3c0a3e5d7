"""Tests for lightning_fuse.alignment: normalisation, DTW, fast span alignment, vocabulary maps and their cache.

Real-text tests train two small tokenizers on Python stdlib sources (~1 s) and align held-out text.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_fuse.alignment import (
    AlignedBatch,
    AlignedBlock,
    TokenAligner,
    alignment_rate,
    build_vocab_map,
    dtw_align,
    normalize_token,
    tokenizer_kind,
)
from lightning_fuse.alignment import aligner as aligner_module
from lightning_fuse.alignment import normalize as normalize_module
from lightning_fuse.alignment import vocab_map as vocab_map_module
from lightning_fuse.alignment.dtw import exact_pairs
from lightning_fuse.tokenizers import BYTE_FALLBACK_TOKENS, stdlib_texts, train_bpe_tokenizer

BLOCK = 256

# Exact-alignment floors on held-out prose (stdlib `pydoc_data/topics.py`: the Python docs as string literals,
# never in the training text), tokenizers trained on the first 400k characters of stdlib code.
# Measured on CPython 3.11 (fast aligner, all held-out blocks of 256 tokens):
#   target byte-level <- source metaspace: 0.653 (full DTW on 8 blocks: 0.601)
#   target metaspace  <- source byte-level: 0.357 (full DTW on 8 blocks: 0.390 vs fast 0.409 on the same blocks)
# The metaspace target splits indentation into one '▁' token per space while byte-level BPE merges a run of
# spaces into one token, so most indentation tokens are one-to-many: hence the lower rate in that direction.
# Floors sit ~0.1 under the measurement (other Python versions ship slightly different sources). Without marker
# normalisation (normalize_token = identity, FuseLLM's bug) the same run gives 0.34 and 0.18: below the floors.
FLOORS = {"byte_level<-metaspace": 0.55, "metaspace<-byte_level": 0.27}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    texts = stdlib_texts(400_000)
    return {
        "byte_level": train_bpe_tokenizer(texts, 2000, "byte_level"),
        "metaspace": train_bpe_tokenizer(texts, 3000, "metaspace"),
    }


@pytest.fixture(scope="module")
def heldout() -> str:
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not topics.is_file():
        pytest.skip(f"{topics} is missing (a stripped-down Python install)")
    return topics.read_text(encoding="utf-8")[:150_000]


def _blocks(tokenizer, text: str, length: int = BLOCK) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def _handmade(kind: str, words: list[str]) -> PreTrainedTokenizerFast:
    """BPE whose merges build each word left to right, so the tokenisation is known by construction (list words
    with a space marker first: their merges then outrank the bare words')."""
    if kind == "byte_level":
        specials, alphabet = ["<|endoftext|>"], sorted(pre_tokenizers.ByteLevel.alphabet())
    else:
        specials, alphabet = ["<unk>", "<s>", "</s>"], sorted({c for w in words for c in w} | {"▁"})
    vocab = {
        t: i
        for i, t in enumerate(specials + (BYTE_FALLBACK_TOKENS if kind == "metaspace" else []) + alphabet)
    }
    merges = []
    for w in words:
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                vocab[w[:k]] = len(vocab)
                merges.append((w[: k - 1], w[k - 1]))
    if kind == "byte_level":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[-1], unk_token=specials[0])


@pytest.fixture(scope="module")
def handmade():
    gpt2 = _handmade("byte_level", ["Ġhello", "Ġworld", "hello", "world"])
    llama = _handmade("metaspace", ["▁hello", "▁wor", "world", "ld"])
    return gpt2, llama


def _tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


def _assert_never_misaligned(src_tok, tgt_tok, tgt_ids: list[int], block: AlignedBlock) -> int:
    """Each aligned pair is the same text and, on the usual span path, after the same text (up to a dummy-prefix
    space, or a character cut at the block start). Returns the number of aligned positions."""
    tb, sb = _bytes(tgt_tok, tgt_ids), _bytes(src_tok, block.src_ids)
    assert len(block.src_pos) == len(tgt_ids)
    n = 0
    for t, j in enumerate(block.src_pos):
        if j < 0:
            continue
        assert t < len(tgt_ids) - 1 and j < len(sb) - 1
        assert tb[t + 1] == sb[j + 1], (t, j)
        if block.method != "spans":
            continue
        t_ctx = b"".join(tb[: t + 1]).lstrip(_CONTINUATION_BYTES)  # the source never reads a cut character
        s_ctx = b"".join(sb[: j + 1])
        assert t_ctx == s_ctx or b" " + t_ctx == s_ctx or t_ctx == b" " + s_ctx, (t, j)  # SentencePiece dummy
        n += 1
    return n


def _bytes(tokenizer, ids: list[int]) -> list[bytes]:
    kind = tokenizer_kind(tokenizer)
    return [
        normalize_token(t, kind=kind).encode("utf-8", "surrogateescape")
        for t in tokenizer.convert_ids_to_tokens(ids)
    ]


# ---------------------------------------------------------------------------------------------------------------
# normalize_token / tokenizer_kind
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "kind", "expected"),
    [
        ("Ġthe", "byte_level", " the"),
        ("▁the", "metaspace", " the"),
        ("Ġthe", None, " the"),
        ("▁the", None, " the"),
        ("Ċ", "byte_level", "\n"),
        ("ĊĠĠĠ", "byte_level", "\n   "),
        ("ĉ", "byte_level", "\t"),
        ("Ã©", "byte_level", "é"),
        ("Ã©", None, "é"),
        ("<0x0A>", "metaspace", "\n"),
        ("<0x0A>", None, "\n"),
        ("<0x41>", "metaspace", "A"),
        ("##ing", "wordpiece", "ing"),
        ("##ing", None, "ing"),
        ("####", "metaspace", "####"),  # a SentencePiece token of four '#', not a continuation
        ("##", "wordpiece", "##"),
        ("the", "byte_level", "the"),
        ("<|endoftext|>", "byte_level", "<|endoftext|>"),
        ("Ġthe", "metaspace", "Ġthe"),  # a literal 'Ġ' in a SentencePiece vocabulary stays
        ("", None, ""),
    ],
)
def test_normalize_token(token, kind, expected):
    assert normalize_token(token, kind=kind) == expected


def test_partial_bytes_spelled_the_same_by_byte_level_and_byte_fallback():
    encoder = normalize_module._BYTE_ENCODER
    for b in range(256):
        fallback = normalize_token(f"<0x{b:02X}>", kind="metaspace")
        assert fallback == normalize_token(encoder[b], kind="byte_level")
        assert fallback.encode("utf-8", "surrogateescape") == bytes([b])
    # a whole character split over two tokens spells its UTF-8 bytes
    assert (normalize_token("Ã", kind="byte_level") + normalize_token("©", kind="byte_level")).encode(
        "utf-8", "surrogateescape"
    ) == "é".encode()


def test_tokenizer_kind(trained, handmade):
    assert tokenizer_kind(trained["byte_level"]) == "byte_level"
    assert tokenizer_kind(trained["metaspace"]) == "metaspace"
    assert [tokenizer_kind(t) for t in handmade] == ["byte_level", "metaspace"]


# ---------------------------------------------------------------------------------------------------------------
# Reference DTW
# ---------------------------------------------------------------------------------------------------------------
def test_dtw_identical_sequences_are_one_to_one():
    toks = ["def", "Ġfoo", "(", "x", "):", "Ċ"]
    assert dtw_align(toks, toks) == [([i], [i]) for i in range(len(toks))]


def test_dtw_spaces_markers_normalised():
    groups = dtw_align(["hello", "Ġworld"], ["▁hello", "▁world"])
    assert groups == [([0], [0]), ([1], [1])]
    tgt = [normalize_token(t, kind="byte_level") for t in ["hello", "Ġworld"]]
    src = [normalize_token(t, kind="metaspace") for t in ["▁hello", "▁world"]]
    assert exact_pairs(groups, tgt, src) == [(1, 1)]  # ' world' == ' world'; 'hello' != ' hello'


def test_dtw_one_to_many_and_many_to_one():
    assert dtw_align(["Ġhello", "Ġworld"], ["▁hel", "lo", "▁world"]) == [([0], [0, 1]), ([1], [2])]
    assert dtw_align(["▁hel", "lo", "▁world"], ["Ġhello", "Ġworld"]) == [([0, 1], [0]), ([2], [1])]


def test_dtw_empty_and_single():
    assert dtw_align([], []) == []
    assert dtw_align(["a", "b"], []) == [([0, 1], [])]
    assert dtw_align([], ["a"]) == [([], [0])]
    assert dtw_align(["Ġa"], ["▁a"]) == [([0], [0])]


# ---------------------------------------------------------------------------------------------------------------
# TokenAligner on hand-made tokenizers
# ---------------------------------------------------------------------------------------------------------------
def test_handmade_tokenisations(handmade):
    gpt2, llama = handmade
    assert _tokens(gpt2, "hello world hello") == ["hello", "Ġworld", "Ġhello"]
    assert _tokens(llama, "hello world hello") == ["▁hello", "▁wor", "ld", "▁hello"]
    assert _tokens(gpt2, "hello\nworld") == ["hello", "Ċ", "world"]
    assert _tokens(llama, "hello\nworld") == ["▁hello", "<0x0A>", "world"]
    assert _tokens(gpt2, "hello é") == ["hello", "Ġ", "Ã", "©"]
    assert _tokens(llama, "hello é") == ["▁hello", "▁", "<0xC3>", "<0xA9>"]


def test_align_identical_tokenizers(handmade):
    gpt2, _ = handmade
    aligner = TokenAligner(gpt2, gpt2, mode="exact")
    assert torch.equal(aligner.vocab_map, torch.arange(len(gpt2)))
    block = aligner.align(_ids(gpt2, "hello world hello"))
    assert block.src_pos == [0, 1, -1] and block.method == "spans"
    assert alignment_rate(block.src_pos) == 1.0


def test_align_one_to_many_and_many_to_one(handmade):
    gpt2, llama = handmade
    ids = _ids(gpt2, "hello world hello")
    # target 'Ġworld' = source '▁wor' + 'ld': -1; target 'Ġhello' = source '▁hello' (token 3, predicted at 2)
    block = TokenAligner(llama, gpt2).align(ids)
    assert block.src_ids == _ids(llama, "hello world hello")
    assert block.src_pos == [-1, 2, -1]
    # reversed: target '▁wor', 'ld' = source 'Ġworld': -1, -1
    assert TokenAligner(gpt2, llama).align(_ids(llama, "hello world hello")).src_pos == [-1, -1, 1, -1]


def test_special_tokens_are_read_in_the_sources_spelling(handmade):
    """The EOS that joins packed documents: the source reads its own EOS there (not the characters of the target's
    '<|endoftext|>' or '</s>'), the two EOS positions align 1:1, and the vocabulary map sends one to the other."""
    gpt2, llama = handmade
    for tgt, src in ((gpt2, llama), (llama, gpt2)):
        ids = _ids(tgt, "hello world") + [tgt.eos_token_id] + _ids(tgt, "hello world")
        aligner = TokenAligner(src, tgt)
        block = aligner.align(ids)
        assert src.eos_token_id in block.src_ids
        assert tgt.eos_token not in src.decode(block.src_ids)  # not spelled out in characters
        eos_at = ids.index(tgt.eos_token_id)
        j = block.src_pos[eos_at - 1]  # the position that predicts the EOS
        assert j >= 0 and block.src_ids[j + 1] == src.eos_token_id, block
        assert int(aligner.vocab_map[src.eos_token_id]) == tgt.eos_token_id


def test_align_space_markers_and_byte_fallback(handmade):
    gpt2, llama = handmade
    aligner = TokenAligner(llama, gpt2, mode="exact")
    # 'Ċ' <-> '<0x0A>', 'world' <-> 'world'
    assert aligner.align(_ids(gpt2, "hello\nworld")).src_pos == [0, 1, -1]
    # 'Ġ' <-> '▁', and each half of 'é': 'Ã' <-> '<0xC3>', '©' <-> '<0xA9>'
    assert aligner.align(_ids(gpt2, "hello é")).src_pos == [0, 1, 2, -1]
    vmap = aligner.vocab_map
    g2l = {
        llama.convert_ids_to_tokens(s): gpt2.convert_ids_to_tokens(int(t))
        for s, t in enumerate(vmap)
        if t >= 0
    }
    assert (
        g2l["▁hello"] == "Ġhello"
        and g2l["<0x0A>"] == "Ċ"
        and g2l["<0xC3>"] == "Ã"
        and g2l["world"] == "world"
    )
    assert g2l["</s>"] == "<|endoftext|>"  # same special role


def test_align_block_cut_inside_a_character(handmade):
    gpt2, llama = handmade
    aligner = TokenAligner(llama, gpt2)
    ids = _ids(gpt2, "é hello hello")
    assert gpt2.convert_ids_to_tokens(ids) == ["Ã", "©", "Ġhello", "Ġhello"]
    block = aligner.align(ids[1:])  # starts with the second byte of 'é'
    assert block.src_ids == _ids(llama, " hello hello") and block.src_pos == [-1, 0, -1]
    _assert_never_misaligned(llama, gpt2, ids[1:], block)
    ids = _ids(gpt2, "hello é")
    block = aligner.align(ids[:3])  # ends with the first byte of 'é'
    assert block.src_pos == [0, -1, -1]
    _assert_never_misaligned(llama, gpt2, ids[:3], block)


def test_align_fallbacks(handmade, monkeypatch):
    gpt2, llama = handmade
    aligner = TokenAligner(llama, gpt2)
    # a literal '▁' in the text is a space to SentencePiece: the source's tokens no longer spell the text, so its
    # offsets anchor the alignment (and the '▁' itself is never aligned)
    ids = _ids(gpt2, "hello world hello▁")
    block = aligner.align(ids)
    assert block.method == "offsets" and block.src_pos == [-1, 2, -1, -1, -1, -1]
    _assert_never_misaligned(llama, gpt2, ids, block)
    # ids that are not a tokenisation of any text (a lone byte inside): full DTW on the token strings
    ids = _ids(gpt2, "hello world hello")
    broken = ids[:1] + _ids(gpt2, "é")[:1] + ids[1:]
    block = aligner.align(broken)
    assert block.method == "dtw" and len(block.src_pos) == 4
    _assert_never_misaligned(llama, gpt2, broken, block)
    monkeypatch.setattr(aligner_module, "MAX_DTW_CELLS", 1)  # too long for the DTW fallback: unaligned, no error
    unaligned = aligner.align(broken)
    assert unaligned.method == "none" and unaligned.src_pos == [-1] * 4 and unaligned.src_ids == block.src_ids


def test_align_empty_and_single_token(handmade):
    gpt2, llama = handmade
    aligner = TokenAligner(llama, gpt2)
    assert aligner.align([]) == AlignedBlock([], [], "spans", [], [])
    block = aligner.align(_ids(gpt2, "hello"))
    assert block.src_ids == _ids(llama, "hello") and block.src_pos == [-1]
    assert alignment_rate(block.src_pos) == 0.0
    batch = aligner.align_batch(torch.zeros(2, 0, dtype=torch.long))
    assert batch.src_ids.shape == (2, 0) and batch.src_pos.shape == (2, 0)


def test_align_batch_matches_align_and_pads(handmade):
    gpt2, llama = handmade
    aligner = TokenAligner(llama, gpt2)
    a, b = _ids(gpt2, "hello world hello"), _ids(gpt2, "hello\nworld")
    assert len(a) == len(b) == 3
    batch = aligner.align_batch(torch.tensor([a, b]))
    assert isinstance(batch, AlignedBatch)
    rows = [aligner.align(a), aligner.align(b)]
    assert batch.src_ids.shape == (2, max(len(r.src_ids) for r in rows))
    for i, r in enumerate(rows):
        n = len(r.src_ids)
        assert batch.src_ids[i, :n].tolist() == r.src_ids and batch.src_mask[i].sum() == n
        assert (batch.src_ids[i, n:] == aligner.src_pad_id).all()
        assert batch.src_pos[i].tolist() == r.src_pos
    # padded target tokens (right or left) are not part of the text and get -1
    pad = gpt2.convert_tokens_to_ids("<|endoftext|>")
    masked = aligner.align_batch(
        torch.tensor([a + [pad, pad]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0]])
    )
    assert masked.src_pos[0].tolist() == rows[0].src_pos + [-1, -1]
    assert masked.src_ids[0, masked.src_mask[0]].tolist() == rows[0].src_ids
    left = aligner.align_batch(torch.tensor([[pad] + a]), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    assert left.src_pos[0].tolist() == [-1, *rows[0].src_pos]


def test_alignment_rate():
    assert alignment_rate([0, -1, 1, -1]) == pytest.approx(2 / 3)  # position L-1 never counts
    assert alignment_rate(torch.tensor([[0, 1, -1], [-1, -1, -1]])) == 0.5
    assert alignment_rate(torch.tensor([[0, 1, -1]]), mask=torch.tensor([[1, 1, 0]])) == 1.0
    assert alignment_rate([]) == 0.0 and alignment_rate([5]) == 0.0


def test_errors(handmade):
    gpt2, llama = handmade
    with pytest.raises(ValueError, match="`mode` can be 'exact' or 'min_ed', got 'nearest'"):
        build_vocab_map(llama, gpt2, mode="nearest")
    aligner = TokenAligner(llama, gpt2, mode="exact")
    with pytest.raises(ValueError, match=r"`tgt_ids` must be in \[0, "):
        aligner.align([len(gpt2) + 5])
    with pytest.raises(ValueError, match="`method` can be 'fast' or 'dtw'"):
        aligner.align([0], method="slow")
    with pytest.raises(ValueError, match=r"`tgt_ids` must be \[B, L\]"):
        aligner.align_batch(torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# Real text: two tokenizers trained on the same text, held-out text
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("tgt", "src"), [("byte_level", "metaspace"), ("metaspace", "byte_level")])
def test_real_text_alignment_rate(trained, heldout, tgt, src):
    tgt_tok, src_tok = trained[tgt], trained[src]
    aligner = TokenAligner(src_tok, tgt_tok, mode="exact")
    blocks = _blocks(tgt_tok, heldout)
    batch = aligner.align_batch(blocks)
    fast = alignment_rate(batch.src_pos)
    n_dtw = 8
    dtw = alignment_rate([aligner.align(b.tolist(), method="dtw").src_pos for b in blocks[:n_dtw]])
    fast_same = alignment_rate(batch.src_pos[:n_dtw])
    print(
        f"\n{tgt}<-{src}: fast {fast:.3f} on {blocks.numel()} tokens; same {n_dtw} blocks: fast {fast_same:.3f}, "
        f"full DTW {dtw:.3f}"
    )
    assert fast >= FLOORS[f"{tgt}<-{src}"]
    assert fast_same >= dtw
    for b, row in enumerate(blocks):
        block = AlignedBlock(batch.src_ids[b, batch.src_mask[b]].tolist(), batch.src_pos[b].tolist())
        _assert_never_misaligned(src_tok, tgt_tok, row.tolist(), block)


@pytest.mark.parametrize(("tgt", "src"), [("byte_level", "metaspace"), ("metaspace", "byte_level")])
def test_marker_bug_collapses_rate(trained, heldout, tgt, src, monkeypatch):
    """FuseLLM's bug (markers such as 'Ġ' not normalised) must push the exact-alignment rate under the floor."""
    for module in (aligner_module, vocab_map_module):
        monkeypatch.setattr(module, "normalize_token", lambda token, kind=None: token)
    aligner = TokenAligner(trained[src], trained[tgt], mode="exact")
    blocks = _blocks(trained[tgt], heldout)[:64]
    rate = alignment_rate(aligner.align_batch(blocks).src_pos)
    dtw = alignment_rate([aligner.align(b.tolist(), method="dtw").src_pos for b in blocks[:4]])
    print(f"\n{tgt}<-{src} without normalisation: fast {rate:.3f}, full DTW {dtw:.3f}")
    assert rate < FLOORS[f"{tgt}<-{src}"]


def test_identical_trained_tokenizers_identity(trained, heldout):
    # whole texts (not blocks cut from a longer tokenisation), so re-tokenising reproduces the ids
    lines = [line.strip() for line in heldout.splitlines() if line.strip()]
    texts = ["\n".join(lines[i : i + 20]) for i in range(0, 400, 20)]
    for tok in trained.values():
        for mode in ("exact", "min_ed"):
            assert torch.equal(build_vocab_map(tok, tok, mode=mode), torch.arange(len(tok)))
        aligner = TokenAligner(tok, tok, mode="exact")
        for text in texts:
            ids = _ids(tok, text)
            block = aligner.align(ids)
            assert block.src_ids == ids and block.src_pos == [*range(len(ids) - 1), -1]


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary maps
# ---------------------------------------------------------------------------------------------------------------
def test_vocab_map_exact_vs_min_ed(trained):
    src_tok, tgt_tok = trained["byte_level"], trained["metaspace"]
    exact = build_vocab_map(src_tok, tgt_tok, mode="exact")
    min_ed = build_vocab_map(src_tok, tgt_tok, mode="min_ed", max_distance=1.0)  # no cutoff: a true minimum
    assert exact.shape == min_ed.shape == (len(src_tok),) and exact.dtype == min_ed.dtype == torch.long
    src_norm = [
        normalize_token(t, kind="byte_level") for t in src_tok.convert_ids_to_tokens(range(len(src_tok)))
    ]
    tgt_norm = [
        normalize_token(t, kind="metaspace") for t in tgt_tok.convert_ids_to_tokens(range(len(tgt_tok)))
    ]
    special = set(src_tok.all_special_ids)
    matched = (exact >= 0).nonzero().flatten().tolist()
    print(f"\nexact matches {len(matched)}/{len(src_tok)} source ids")
    assert len(matched) > 0.5 * len(src_tok)
    assert all(src_norm[s] == tgt_norm[exact[s]] for s in matched if s not in special)
    # without cutoff min_ed maps every regular token, agrees with exact where exact has a match, and is a true
    # minimum elsewhere
    regular = torch.tensor([i not in special for i in range(len(src_tok))])
    assert (min_ed[regular] >= 0).all() and (min_ed < len(tgt_tok)).all()
    assert torch.equal(min_ed[exact >= 0], exact[exact >= 0])
    candidates = [t for i, t in enumerate(tgt_norm) if i not in set(tgt_tok.all_special_ids)]
    unmatched = (exact < 0).nonzero().flatten().tolist()
    for s in random.Random(0).sample(unmatched, min(25, len(unmatched))):
        best = min(Levenshtein.distance(src_norm[s], c) for c in candidates)
        got = tgt_norm[min_ed[s]]
        assert Levenshtein.distance(src_norm[s], got) == best, (src_norm[s], got)
        tie_len = min(
            abs(len(c) - len(src_norm[s]))
            for c in candidates
            if Levenshtein.distance(src_norm[s], c) == best
        )
        assert abs(len(got) - len(src_norm[s])) == tie_len
        assert _bytes(tgt_tok, [int(min_ed[s])]) == [got.encode("utf-8", "surrogateescape")]


def test_min_ed_prefers_regular_token_over_byte_fallback(handmade):
    gpt2, llama = handmade
    vmap = build_vocab_map(gpt2, llama, mode="min_ed")
    # 'w' exists in the target as 'w' and as '<0x77>': the regular token wins
    assert llama.convert_ids_to_tokens(int(vmap[gpt2.convert_tokens_to_ids("w")])) == "w"


def test_min_ed_cutoff_and_special_tokens(handmade):
    """min_ed never maps a token to an unrelated string (normalised edit distance over the cutoff), nor a special
    token to a regular one: such ids map to -1 (their mass goes to the "other" bucket) and are counted dropped."""
    gpt2, llama = handmade
    tokyo = "".join(normalize_module._BYTE_ENCODER[b] for b in "東京都".encode())  # as byte-level BPE spells it
    src = _handmade("byte_level", ["Ġhellx", tokyo, "Ġwor"])
    src.add_special_tokens({"additional_special_tokens": ["<start_of_image>"]})
    vmap, kind = build_vocab_map(src, llama, mode="min_ed", with_kind=True)
    assert vmap.shape == kind.shape == (len(src),)
    tgt = llama.convert_ids_to_tokens

    def mapped(token):
        i = src.convert_tokens_to_ids(token)
        return (tgt(int(vmap[i])) if vmap[i] >= 0 else None), int(kind[i])

    assert mapped("Ġhellx") == ("▁hello", vocab_map_module.MIN_ED)  # distance 1 of 6
    assert mapped("Ġwor") == ("▁wor", vocab_map_module.EXACT)
    assert mapped(tokyo) == (None, vocab_map_module.DROPPED)  # no shared character: was mapped to some token
    assert mapped("<start_of_image>") == (None, vocab_map_module.DROPPED)  # special: never onto a regular token
    assert mapped("<|endoftext|>") == ("</s>", vocab_map_module.EXACT)  # same role
    # no cutoff: the nearest string whatever it is (FuseLLM's MinED); special tokens stay unmapped
    loose = build_vocab_map(src, llama, mode="min_ed", max_distance=1.0)
    assert loose[src.convert_tokens_to_ids(tokyo)] >= 0
    assert loose[src.convert_tokens_to_ids("<start_of_image>")] == -1
    with pytest.raises(ValueError, match="`max_distance` must be in"):
        build_vocab_map(src, llama, max_distance=2.0)


def test_vocab_map_cache_file_is_readable_by_others(trained, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        build_vocab_map(trained["byte_level"], trained["metaspace"], mode="exact", cache_dir=tmp_path)
    finally:
        os.umask(old)
    (path,) = tmp_path.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as open() gives under umask 022, not mkstemp's 0600


def test_vocab_map_cache_reused(trained, tmp_path, monkeypatch):
    src_tok, tgt_tok = trained["byte_level"], trained["metaspace"]
    first = build_vocab_map(src_tok, tgt_tok, mode="min_ed", cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("vocab_map-min_ed-") and files[0].endswith(".pt")

    def no_search(*args, **kwargs):
        raise AssertionError("the cached map should have been loaded")

    loaded = []
    real_load = torch.load
    monkeypatch.setattr(vocab_map_module, "nearest_strings", no_search)
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loaded.append(Path(f)) or real_load(f, *a, **k))
    second = build_vocab_map(src_tok, tgt_tok, mode="min_ed", cache_dir=tmp_path)
    assert torch.equal(first, second) and loaded == [tmp_path / files[0]]
    # another mode, another file; a broken file is rebuilt, not trusted
    build_vocab_map(src_tok, tgt_tok, mode="exact", cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    monkeypatch.undo()
    (tmp_path / files[0]).write_bytes(b"not a tensor")
    assert torch.equal(build_vocab_map(src_tok, tgt_tok, mode="min_ed", cache_dir=tmp_path), first)
    assert torch.equal(torch.load(tmp_path / files[0], weights_only=True)["map"], first)
    assert not list(tmp_path.glob("*.tmp"))
