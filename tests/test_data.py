"""The data layer: blocks tokenised once to disk (Hugging Face datasets, memory-mapped), Hugging Face datasets as
input, chat data with the loss on the assistant replies, integrity checks that run once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tiny import conversations
from transformers import AutoTokenizer

from lightning_fuse.cache import data_fingerprint
from lightning_fuse.data import ChatDataModule, TextDataModule, pack, read_texts, store
from lightning_fuse.data import texts as texts_mod
from lightning_fuse.fusion import next_token_mask

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def _tokenizer(world):
    return AutoTokenizer.from_pretrained(world["target"])


def _dm(world, data_dir=None, **kwargs):
    kwargs.setdefault("block_size", 32)
    kwargs.setdefault("batch_size", 4)
    dm = TextDataModule(data_dir, **kwargs) if "dataset" in kwargs else TextDataModule(data_dir or world["corpus"], **kwargs)
    dm.connect(_tokenizer(world))
    dm.setup("fit")
    return dm


def _split(dm, split, domain):
    ds = dm.train_set if split == "train" else dm.val_set
    d = dm.domains.index(domain)
    return ds.blocks[ds.domains == d]


# ----------------------------------------------------------------------------------------------- tokenise once


def test_stored_blocks_equal_in_memory_packing_and_are_readable_with_datasets(tiny_world, tmp_path):
    """The stored blocks are exactly ``pack``'s (train.*/val.* split and held-out tail), and the store is plain
    Hugging Face datasets: ``datasets.load_from_disk`` reads it."""
    corpus = tmp_path / "corpus"
    (corpus / "words").mkdir(parents=True)
    words = Path(tiny_world["corpus"], "words")
    for f in ("train.txt", "val.txt"):
        (corpus / "words" / f).write_text((words / f).read_text())
    (corpus / "mixed").mkdir()
    docs = [{"text": line} for line in Path(tiny_world["corpus"], "sums", "train.txt").read_text().splitlines()[:300]]
    (corpus / "mixed" / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok = _tokenizer(tiny_world)
    dm = _dm(tiny_world, str(corpus), val_fraction=0.2)
    assert dm.domains == ["mixed", "words"]
    assert torch.equal(_split(dm, "train", "words"), pack(read_texts(words / "train.txt"), tok, 32))
    assert torch.equal(_split(dm, "val", "words"), pack(read_texts(words / "val.txt"), tok, 32))
    mixed = pack(read_texts(corpus / "mixed" / "a.jsonl"), tok, 32)
    n_val = round(len(mixed) * 0.2)
    assert torch.equal(_split(dm, "train", "mixed"), mixed[:-n_val])
    assert torch.equal(_split(dm, "val", "mixed"), mixed[-n_val:])
    # a sample is what the in-memory dataset gives
    item = dm.train_set[3]
    assert torch.equal(item["input_ids"], dm.train_set.blocks[3]) and torch.equal(item["labels"], item["input_ids"])
    # the user's own tools read it
    on_disk = datasets.load_from_disk(str(dm.store.root / "words"))
    assert set(on_disk) == {"train", "val"}
    assert np.array_equal(np.asarray(on_disk["train"]["input_ids"]), _split(dm, "train", "words").numpy())


def test_tokenised_once_rebuilt_when_a_file_changes(tiny_world, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus" / "words"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text(Path(tiny_world["corpus"], "words", "train.txt").read_text())
    first = _dm(tiny_world, str(tmp_path / "corpus"))
    builds = []
    real = store._build
    monkeypatch.setattr(store, "_build", lambda *a, **k: builds.append(1) or real(*a, **k))
    again = _dm(tiny_world, str(tmp_path / "corpus"))
    assert builds == [] and again.store.root == first.store.root
    (corpus / "a.txt").write_text((corpus / "a.txt").read_text()[: 20000])
    changed = _dm(tiny_world, str(tmp_path / "corpus"))
    assert builds == [1] and changed.store.root != first.store.root and len(changed.train_set) < len(first.train_set)


def test_two_processes_tokenise_to_the_same_blocks(tiny_world, tmp_path):
    one = _dm(tiny_world, tokenized_dir=str(tmp_path / "one"), num_proc=1)
    two = _dm(tiny_world, tokenized_dir=str(tmp_path / "two"), num_proc=2)
    assert two.store.meta["num_proc"] == 2
    assert torch.equal(one.train_set.blocks[:], two.train_set.blocks[:])
    assert one.train_set.fingerprint == two.train_set.fingerprint


def test_a_big_text_file_streams_in_pieces(tiny_world, tmp_path, monkeypatch):
    """A .txt document is read in pieces (memory bounded by the piece, not the file): EOS only after its last piece,
    and the blocks hold the same text."""
    monkeypatch.setattr(texts_mod, "PIECE_CHARS", 512)
    monkeypatch.setattr(store, "PIECE_CHARS", 512)
    text = Path(tiny_world["corpus"], "words", "train.txt").read_text()[:30000]
    (tmp_path / "c" / "w").mkdir(parents=True)
    (tmp_path / "c" / "w" / "a.txt").write_text(text)
    pieces = list(texts_mod.iter_records(tmp_path / "c" / "w" / "a.txt"))
    assert len(pieces) > 40 and "".join(p for p, _ in pieces) == text
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(len(p) <= 512 + 200 for p, _ in pieces)
    dm = _dm(tiny_world, str(tmp_path / "c"), val_fraction=0.1)
    tok = _tokenizer(tiny_world)
    ids = torch.cat([dm.train_set.blocks[:].reshape(-1), dm.val_set.blocks[:].reshape(-1)])
    assert (ids == tok.eos_token_id).sum() == 0  # the only EOS is after the last piece, in the dropped tail
    assert tok.decode(ids.tolist()) == text[: len(tok.decode(ids.tolist()))]


def test_fingerprint_in_chunks_equals_the_whole_hash():
    import hashlib

    blocks = torch.randint(0, 60000, (10_000, 7))
    h = hashlib.sha256(json.dumps([10_000, 7]).encode())
    h.update(blocks.numpy().astype("<i8").tobytes())
    assert data_fingerprint(blocks) == "sha256:" + h.hexdigest()


def test_stored_fingerprint_needs_no_pass_over_the_data(tiny_world, monkeypatch):
    dm = _dm(tiny_world)
    monkeypatch.setattr(type(dm.train_set), "gather", lambda *a, **k: pytest.fail("read the blocks"))
    fp = dm.train_set.fingerprint
    assert fp.startswith("sha256:") and fp != dm.val_set.fingerprint


def test_sampler_order_is_unchanged(tiny_world):
    """The chunked iteration gives the order of the former list-based sampler (``randperm(seed + epoch)``)."""
    from lightning_fuse.data import ResumableSampler

    dm = _dm(tiny_world)
    s = ResumableSampler(dm.train_set, 4, seed=3, num_replicas=2, rank=1)
    s.set_epoch(2)
    full = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(5)).tolist()
    assert list(s) == full[: s.total_size][1::2]


# ----------------------------------------------------------------------------------------------- HF datasets


def _table(world):
    rows = []
    for domain in ("words", "sums"):
        for split in ("train", "val"):
            for line in Path(world["corpus"], domain, f"{split}.txt").read_text().splitlines()[:200]:
                rows.append({"body": line, "topic": domain, "split": split})
    return rows


def test_parquet_with_text_and_domain_fields_and_splits(tiny_world, tmp_path):
    import pandas as pd

    rows = _table(tiny_world)
    folder = tmp_path / "ds"
    folder.mkdir()
    for split, name in (("train", "train"), ("val", "validation")):
        pd.DataFrame([r for r in rows if r["split"] == split]).to_parquet(folder / f"{name}.parquet")
    dm = _dm(tiny_world, dataset=str(folder), text_field="body", domain_field="topic",
             tokenized_dir=str(tmp_path / "blocks"))
    tok = _tokenizer(tiny_world)
    assert dm.domains == ["sums", "words"]
    for split in ("train", "val"):
        docs = [r["body"] for r in rows if r["split"] == split and r["topic"] == "sums"]
        assert torch.equal(_split(dm, split, "sums"), pack(docs, tok, 32))


def test_one_dataset_per_domain_jsonl_and_save_to_disk(tiny_world, tmp_path):
    rows = _table(tiny_world)
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"text": r["body"]}) + "\n" for r in rows if r["topic"] == "words"))
    sums = tmp_path / "sums_saved"
    datasets.Dataset.from_list([{"text": r["body"]} for r in rows if r["topic"] == "sums"]).save_to_disk(str(sums))
    dm = _dm(tiny_world, dataset={"words": str(words), "sums": str(sums)}, tokenized_dir=str(tmp_path / "b"))
    tok = _tokenizer(tiny_world)
    assert dm.domains == ["sums", "words"]
    all_words = pack([r["body"] for r in rows if r["topic"] == "words"], tok, 32)
    n_val = max(1, round(len(all_words) * 0.1))
    assert torch.equal(_split(dm, "train", "words"), all_words[:-n_val])


def test_dataset_errors_name_the_fix(tiny_world, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"has no column 'text' \(it has body\): set `--data.text_field`"):
        _dm(tiny_world, dataset=str(path), tokenized_dir=str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match=r"`--data.dataset` '\./nowhere.parquet' does not exist"):
        _dm(tiny_world, dataset="./nowhere.parquet")
    with pytest.raises(ValueError, match=r"Give exactly one of `--data.data_dir`"):
        TextDataModule(tiny_world["corpus"], dataset=str(path))


# ----------------------------------------------------------------------------------------------- chat


def _chat_tokenizer(world, tmp_path):
    tok = _tokenizer(world)
    tok.chat_template = CHAT_TEMPLATE
    out = tmp_path / "chat_tok"
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out), str(out)


def test_chat_labels_only_the_assistant_replies(tiny_world, tmp_path):
    tok, _ = _chat_tokenizer(tiny_world, tmp_path)
    convs = conversations(tiny_world)
    (tmp_path / "chat" / "qa").mkdir(parents=True)
    (tmp_path / "chat" / "qa" / "a.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    dm = ChatDataModule(str(tmp_path / "chat"), block_size=32, batch_size=4)
    dm.connect(tok)
    dm.setup("fit")
    ids = torch.cat([dm.train_set.blocks[:].reshape(-1), dm.val_set.blocks[:].reshape(-1)])
    labels = torch.cat([dm.train_set.label_blocks[:].reshape(-1), dm.val_set.label_blocks[:].reshape(-1)])
    text = "".join(tok.apply_chat_template(c, tokenize=False) for c in convs)
    assert tok.decode(ids.tolist()) == text[: len(tok.decode(ids.tolist()))]
    # the labelled tokens spell exactly the replies, each with its end-of-turn EOS
    kept = labels != -100
    assert torch.equal(labels[kept], ids[kept])
    replies = "".join(m["content"] + tok.eos_token for c in convs for m in c if m["role"] == "assistant")
    spelled = tok.decode(ids[kept].tolist())
    assert len(spelled) > 1000 and replies.startswith(spelled)
    # the prompts are never labelled
    prompt_text = tok.decode(ids[~kept].tolist())
    assert "<user>" in prompt_text and "<assistant>" in prompt_text
    item = dm.train_set[0]
    assert torch.equal(item["labels"], dm.train_set.label_blocks[0])


def test_chat_loss_is_on_assistant_tokens(tiny_world, tmp_path):
    """``_step``'s CLM equals a dense reference over the assistant tokens only, and its mask (shared by the
    distillation and the sources' CE) is exactly the positions that predict an assistant token."""
    from lightning_fuse import FusionModule, SourceSpec

    tok, tok_dir = _chat_tokenizer(tiny_world, tmp_path)
    (tmp_path / "chat" / "qa").mkdir(parents=True)
    (tmp_path / "chat" / "qa" / "a.jsonl").write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in conversations(tiny_world)))
    module = FusionModule(target=tiny_world["target"], tokenizer=tok_dir, strategy="uniform",
                          sources=[SourceSpec("words", tiny_world["words"])])
    module.configure_model()
    dm = ChatDataModule(str(tmp_path / "chat"), block_size=32, batch_size=4)
    dm.connect(module.tokenizer)
    dm.setup("fit")
    batch = torch.utils.data.default_collate(dm.train_set.__getitems__([0, 1, 2, 3]))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    with torch.no_grad():
        out = module._step(batch, "val")
        logits = module.target(input_ids=batch["input_ids"]).logits.double()
    assert torch.equal(out["mask"], next_token_mask(batch["labels"]))
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert out["clm"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.isfinite(out["kd"])


def test_chat_needs_a_template(tiny_world, tmp_path):
    (tmp_path / "chat" / "qa").mkdir(parents=True)
    (tmp_path / "chat" / "qa" / "a.jsonl").write_text(json.dumps({"messages": conversations(tiny_world, 1)[0]}) + "\n")
    dm = ChatDataModule(str(tmp_path / "chat"))
    dm.connect(_tokenizer(tiny_world))
    with pytest.raises(ValueError, match="the target tokenizer has no chat template"):
        dm.setup("fit")


def test_chat_hf_dataset_through_the_cli_offline(tiny_world, tmp_path):
    """Chat data from a local parquet file through ``lightning-fuse fit``, with the hub switched off."""
    import pandas as pd

    _, tok_dir = _chat_tokenizer(tiny_world, tmp_path)
    convs = conversations(tiny_world, 100)
    pd.DataFrame({"conversation": [json.dumps(c) for c in convs]}).to_parquet(tmp_path / "chat.parquet")
    args = [
        sys.executable, "-m", "lightning_fuse", "fit",
        "--model.class_path", "lightning_fuse.FusionModule", "--model.init_args.target", tiny_world["target"],
        "--model.init_args.tokenizer", tok_dir, "--model.init_args.strategy", "uniform",
        "--model.init_args.sources", json.dumps([{"name": "words", "path": tiny_world["words"]}]),
        "--data.class_path", "lightning_fuse.data.ChatDataModule",
        "--data.init_args.dataset", str(tmp_path / "chat.parquet"),
        "--data.init_args.messages_field", "conversation", "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "4", "--data.init_args.tokenized_dir", str(tmp_path / "blocks"),
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "last validation (step 2)" in proc.stdout
    assert list((tmp_path / "blocks").glob("*/default/dataset_dict.json"))


def test_a_file_without_documents_is_too_little_text(tiny_world, tmp_path):
    (tmp_path / "c" / "empty").mkdir(parents=True)
    (tmp_path / "c" / "empty" / "a.jsonl").write_text("\n\n")
    dm = TextDataModule(str(tmp_path / "c"), block_size=32)
    dm.connect(_tokenizer(tiny_world))
    with pytest.raises(ValueError, match=r"^Domain 'empty' has too little text"):
        dm.setup("fit")
