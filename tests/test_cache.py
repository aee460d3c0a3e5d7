import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_fuse.cache import (
    CacheCorruptError,
    CachedSourcesDataset,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheReader,
    CacheWriter,
    data_fingerprint,
)

L, K = 32, 10
MODEL = {"path": "tiny/src-a", "config_sha256": "abc"}


def make_data(n, vocab_size, seed=0, seq_len=L, k=K):
    """Random top-k data as a source would produce: log_softmax of random logits, torch.topk sorted."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, seq_len, min(vocab_size, 4096), generator=g) * 4
    logp = torch.log_softmax(logits, -1)
    lp, ids = logp.topk(k, dim=-1)
    if vocab_size > 4096:  # spread ids over the whole vocabulary (high bits included)
        ids = ids + torch.randint(0, vocab_size // 4096, (n, seq_len, 1), generator=g) * 4096
    ids = ids.clamp_max(vocab_size - 1)
    gold = logp[..., 0].clone()
    gold[:, -1] = 0
    ce = -gold[:, :-1].mean(-1)
    return ids, lp, gold, ce


def build(root, n=10, shard_size=4, vocab_size=1000, names=("a",), finalize=True, seed=0):
    writer = CacheWriter(root, seq_len=L, top_k=K, vocab_size=vocab_size, shard_size=shard_size)
    data = {}
    for j, name in enumerate(names):
        ids, lp, gold, ce = make_data(n, vocab_size, seed=seed + j)
        data[name] = (ids, lp, gold, ce)
        src = writer.source(name, MODEL, "tok-1", "data-1", num_sequences=n)
        for i in src.pending_shards():
            r = src.shard_range(i)
            src.write_shard(i, ids[r.start:r.stop], lp[r.start:r.stop], gold[r.start:r.stop], ce[r.start:r.stop])
        if finalize:
            src.finalize()
    return data


def expect(name="a", **over):
    return {name: {"model_id": MODEL, "tokenizer_id": "tok-1", "data_id": "data-1", **over}}


def shard_files(root, name="a"):
    return sorted((Path(root) / name).glob("shard-*.npy"))


@pytest.mark.parametrize("vocab_size", [1000, 65536, 128256, 256000])
def test_round_trip(tmp_path, vocab_size):
    data = build(tmp_path, n=10, shard_size=4, vocab_size=vocab_size)
    ids, lp, gold, ce = data["a"]
    reader = CacheReader(tmp_path, expect=expect(), seq_len=L, top_k=K, vocab_size=vocab_size)
    reader.verify()
    idx = [9, 0, 5, 5, 3]  # unsorted, repeated, across shards
    got = reader.get("a", idx)
    assert got["ids"].dtype == torch.int64 and got["logprobs"].dtype == torch.float32
    assert got["ids"].shape == (5, L, K) and got["gold_logprob"].shape == (5, L) and got["ce"].shape == (5,)
    assert torch.equal(got["ids"], ids[idx])
    if vocab_size > 65536:
        assert (got["ids"] >= 65536).any()  # the packed high bits are exercised
    # fp16: half an ulp, |err| <= |x| * 2**-11
    assert ((got["logprobs"] - lp[idx]).abs() <= lp[idx].abs() * 2**-11 + 1e-7).all()
    assert ((got["gold_logprob"] - gold[idx]).abs() <= gold[idx].abs() * 2**-11 + 1e-7).all()
    assert (got["gold_logprob"][:, -1] == 0).all()
    assert torch.equal(got["ce"], ce[idx])
    assert torch.equal(reader.ce("a"), ce)


def test_bytes_per_token_and_precision(tmp_path):
    n, seq_len = 16, 256
    for vocab_size in (32000, 128256, 256000):
        root = tmp_path / str(vocab_size)
        writer = CacheWriter(root, seq_len=seq_len, top_k=K, vocab_size=vocab_size, shard_size=8)
        ids, lp, gold, ce = make_data(n, vocab_size, seq_len=seq_len)
        src = writer.source("a", MODEL, "t", "d", num_sequences=n)
        for i in range(src.num_shards):
            r = src.shard_range(i)
            src.write_shard(i, ids[r.start:r.stop], lp[r.start:r.stop], gold[r.start:r.stop], ce[r.start:r.stop])
        src.finalize()
        nbytes = sum(p.stat().st_size for p in shard_files(root))
        per_token = nbytes / (n * seq_len)
        got = CacheReader(root).get("a", range(n))
        err = (got["logprobs"] - lp).abs().max().item()
        print(f"vocab {vocab_size}: {per_token:.2f} bytes/token/source at k={K}, max |logprob err| {err:.2e}")
        assert per_token <= 50
        assert err <= lp.abs().max().item() * 2**-11


def test_resume_after_crash(tmp_path):
    n, vocab_size = 14, 1000
    ids, lp, gold, ce = make_data(n, vocab_size)
    writer = CacheWriter(tmp_path, seq_len=L, top_k=K, vocab_size=vocab_size, shard_size=4)
    src = writer.source("a", MODEL, "tok-1", "data-1", num_sequences=n)
    assert src.num_shards == 4 and src.pending_shards() == [0, 1, 2, 3]
    for i in (0, 2):
        r = src.shard_range(i)
        src.write_shard(i, ids[r.start:r.stop], lp[r.start:r.stop], gold[r.start:r.stop], ce[r.start:r.stop])
    del writer, src  # "crash"
    with pytest.raises(CacheIncompleteError, match=r"incomplete \(2/4 shards\).*precompute"):
        CacheReader(tmp_path)

    src = CacheWriter(tmp_path, seq_len=L, top_k=K, vocab_size=vocab_size, shard_size=4).source(
        "a", MODEL, "tok-1", "data-1", num_sequences=n
    )
    assert src.pending_shards() == [1, 3]
    assert src.is_complete(0) and not src.is_complete(1)
    with pytest.raises(CacheIncompleteError, match="2 of 4 shards"):
        src.finalize()
    for i in src.pending_shards():
        r = src.shard_range(i)
        src.write_shard(i, ids[r.start:r.stop], lp[r.start:r.stop], gold[r.start:r.stop], ce[r.start:r.stop])
    assert src.shard_range(3) == range(12, 14)
    src.finalize()
    got = CacheReader(tmp_path, expect=expect()).get("a", torch.arange(n))
    assert torch.equal(got["ids"], ids)
    assert torch.equal(got["ce"], ce)


@pytest.mark.parametrize("fail_on", ["shard", "record"])
def test_interrupted_write_records_nothing(tmp_path, monkeypatch, fail_on):
    import lightning_fuse.cache.writer as writer_mod

    ids, lp, gold, ce = make_data(8, 1000)
    src = CacheWriter(tmp_path, seq_len=L, top_k=K, vocab_size=1000, shard_size=4).source(
        "a", MODEL, "tok-1", "data-1", num_sequences=8
    )
    real_replace, real_append = os.replace, writer_mod._append_journal

    def failing_replace(src_path, dst_path):
        raise OSError("disk full")

    def failing_append(path, generation, event):  # the shard's files are in place, its record is not
        if "files" in event:
            raise OSError("disk full")
        return real_append(path, generation, event)

    if fail_on == "shard":
        monkeypatch.setattr(os, "replace", failing_replace)
    else:
        monkeypatch.setattr(writer_mod, "_append_journal", failing_append)
    with pytest.raises(OSError, match="disk full"):
        src.write_shard(0, ids[:4], lp[:4], gold[:4], ce[:4])
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(writer_mod, "_append_journal", real_append)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sources"]["a"]["shards"] == []
    assert src.pending_shards() == [0, 1]
    assert not list(tmp_path.rglob(".*.tmp-*"))  # temporary files cleaned up
    src.write_shard(0, ids[:4], lp[:4], gold[:4], ce[:4])
    assert src.pending_shards() == [1]


def test_truncated_shard_caught_at_open(tmp_path):
    build(tmp_path)
    victim = tmp_path / "a" / "shard-00001.logprobs.npy"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 10)
    with pytest.raises(CacheCorruptError, match=r"shard-00001\.logprobs\.npy has \d+ bytes"):
        CacheReader(tmp_path)
    # the writer sees it too and schedules the shard again
    src = CacheWriter(tmp_path, seq_len=L, top_k=K, vocab_size=1000, shard_size=4).source(
        "a", MODEL, "tok-1", "data-1", num_sequences=10
    )
    assert src.pending_shards() == [1]


def test_missing_shard_file_caught_at_open(tmp_path):
    build(tmp_path)
    (tmp_path / "a" / "shard-00002.ids.npy").unlink()
    with pytest.raises(CacheCorruptError, match=r"shard-00002\.ids\.npy is missing"):
        CacheReader(tmp_path)


def test_flipped_byte_caught_by_verify(tmp_path):
    build(tmp_path)
    victim = tmp_path / "a" / "shard-00000.ids.npy"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x01
    victim.write_bytes(bytes(raw))
    reader = CacheReader(tmp_path)  # same size: only the checksum can tell
    with pytest.raises(CacheCorruptError, match=r"shard-00000\.ids\.npy fails its sha256 checksum"):
        reader.verify()


@pytest.mark.parametrize(
    ("key", "value"),
    [("model_id", {"path": "tiny/src-b"}), ("tokenizer_id", "tok-2"), ("data_id", "data-2")],
)
def test_identity_mismatch_refused(tmp_path, key, value):
    build(tmp_path)
    with pytest.raises(CacheMismatchError, match=rf"built for {key}[ .].*you declared .*lightning-fuse precompute"):
        CacheReader(tmp_path, expect=expect(**{key: value}))
    # the writer refuses to mix identities too, unless asked to rebuild
    writer = CacheWriter(tmp_path, seq_len=L, top_k=K, vocab_size=1000, shard_size=4)
    args = {"model_id": MODEL, "tokenizer_id": "tok-1", "data_id": "data-1", key: value}
    with pytest.raises(CacheMismatchError, match="overwrite=True"):
        writer.source("a", **args, num_sequences=10)
    src = writer.source("a", **args, num_sequences=10, overwrite=True)
    assert src.pending_shards() == [0, 1, 2] and not shard_files(tmp_path)


def test_shape_mismatch_refused(tmp_path):
    build(tmp_path)
    with pytest.raises(CacheMismatchError, match=r"top_k 10 \(you declared 5\)"):
        CacheReader(tmp_path, top_k=5)
    with pytest.raises(CacheMismatchError, match=r"seq_len 32 \(you asked 64\)"):
        CacheWriter(tmp_path, seq_len=64, top_k=K, vocab_size=1000, shard_size=4)


def test_incomplete_or_missing_source_refused(tmp_path):
    build(tmp_path, names=("a", "b"), finalize=False)
    with pytest.raises(CacheIncompleteError, match="'a', 'b' is incomplete"):
        CacheReader(tmp_path)
    with pytest.raises(CacheIncompleteError, match=r"no source 'c' \(it has: a, b\)"):
        CacheReader(tmp_path, expect={"c": {}})
    with pytest.raises(CacheIncompleteError, match="no cache"):
        CacheReader(tmp_path / "nowhere")


def test_bad_inputs_refused(tmp_path):
    ids, lp, gold, ce = make_data(4, 1000)
    src = CacheWriter(tmp_path, seq_len=L, top_k=K, vocab_size=1000, shard_size=4).source(
        "a", MODEL, "t", "d", num_sequences=4
    )
    with pytest.raises(CacheError, match=r"`ids` must have shape \[4, 32, 10\]"):
        src.write_shard(0, ids[:3], lp, gold, ce)
    with pytest.raises(CacheError, match="sorted descending"):
        src.write_shard(0, ids, lp.flip(-1), gold, ce)
    with pytest.raises(CacheError, match=r"`ids` must be in \[0, 1000\)"):
        src.write_shard(0, ids + 1000, lp, gold, ce)
    with pytest.raises(CacheError, match="NaN"):
        src.write_shard(0, ids, lp, gold, ce * float("nan"))
    with pytest.raises(CacheError, match="shard_idx"):
        src.write_shard(1, ids, lp, gold, ce)
    with pytest.raises(CacheError, match="source `name`"):
        CacheWriter(tmp_path, seq_len=L, top_k=K, vocab_size=1000, shard_size=4).source(
            "../x", MODEL, "t", "d", num_sequences=4
        )
    assert issubclass(CacheError, ValueError)


def test_no_pickle_anywhere(tmp_path):
    build(tmp_path, vocab_size=128256, names=("a", "b"))
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    npys = [p for p in files if p.suffix == ".npy"]
    assert {p.name for p in files} - {p.name for p in npys} == {"manifest.json"}
    json.loads((tmp_path / "manifest.json").read_text())
    for p in npys:
        arr = np.load(p, allow_pickle=False)
        assert arr.dtype != object


def test_dataset_and_dataloader(tmp_path):
    data = build(tmp_path, names=("a", "b"))
    reader = CacheReader(tmp_path)
    ds = CachedSourcesDataset(reader, ["a", "b"])
    assert len(ds) == 10
    item = ds[7]
    assert item["b"]["ids"].shape == (L, K) and item["b"]["ce"].shape == ()
    assert torch.equal(item["b"]["ids"], data["b"][0][7])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = 0
    for batch in loader:
        assert batch["a"]["logprobs"].shape[1:] == (L, K) and batch["a"]["logprobs"].dtype == torch.float32
        seen += len(batch["a"]["ce"])
    assert seen == 10
    # pickling (DataLoader workers under "spawn") never ships the memory maps
    clone = pickle.loads(pickle.dumps(reader))
    assert not clone._open and len(pickle.dumps(reader)) < 20_000
    assert torch.equal(clone.get("a", [3])["ids"], data["a"][0][[3]])


def test_data_fingerprint():
    x = torch.arange(12).reshape(3, 4)
    assert data_fingerprint(x) == data_fingerprint(x.numpy().astype(np.int32))
    assert data_fingerprint(x) != data_fingerprint(x.reshape(4, 3))
    assert data_fingerprint(x).startswith("sha256:")


def _write(src, data, shards):
    ids, lp, gold, ce = data
    for i in shards:
        r = src.shard_range(i)
        src.write_shard(i, ids[r.start:r.stop], lp[r.start:r.stop], gold[r.start:r.stop], ce[r.start:r.stop])


def _open(root, n=16):
    return CacheWriter(root, seq_len=L, top_k=K, vocab_size=1000, shard_size=4).source(
        "a", MODEL, "tok-1", "data-1", num_sequences=n)


def test_shard_writes_append_to_the_journal_and_finalize_folds_it(tmp_path, monkeypatch):
    """A shard write appends two lines to the source's journal and leaves manifest.json alone (was: the whole
    manifest rewritten under the lock at every shard, a cost growing with the number of shards); a writer opened
    later sees the journal's shards; finalize folds them into manifest.json and removes the journal."""
    import lightning_fuse.cache.writer as writer_mod

    data = make_data(16, 1000)
    src = _open(tmp_path)
    before = (tmp_path / "manifest.json").read_bytes()
    rewrites = []
    monkeypatch.setattr(writer_mod, "_write_manifest", lambda *a: rewrites.append(a))
    _write(src, data, [0, 2, 1])
    monkeypatch.undo()
    assert rewrites == [] and (tmp_path / "manifest.json").read_bytes() == before
    assert len((tmp_path / "a" / "journal.jsonl").read_text().splitlines()) == 1 + 2 * 3
    assert _open(tmp_path).pending_shards() == [3]
    _write(src, data, [3])
    src.finalize()
    assert not (tmp_path / "a" / "journal.jsonl").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["version"] == 2 and "journal" not in manifest["sources"]["a"]
    assert [r["index"] for r in manifest["sources"]["a"]["shards"]] == [0, 1, 2, 3]
    got = CacheReader(tmp_path, expect=expect()).get("a", torch.arange(16))
    assert torch.equal(got["ids"], data[0]) and torch.equal(got["ce"], data[3])
    CacheReader(tmp_path, expect=expect()).verify()


def test_journal_torn_line_and_stale_journal_after_crashes(tmp_path):
    """A crash while appending leaves a torn last line: that shard is pending, the next record starts on a new line.
    A crash between a manifest rewrite and the journal's reset leaves a journal of another generation: ignored."""
    data = make_data(16, 1000)
    src = _open(tmp_path)
    _write(src, data, [0, 1])
    journal = tmp_path / "a" / "journal.jsonl"
    text = journal.read_bytes()
    journal.write_bytes(text[: len(text) - 40])  # shard 1's record cut short
    assert _open(tmp_path).pending_shards() == [1, 2, 3]
    _write(src, data, [1])
    assert _open(tmp_path).pending_shards() == [2, 3]

    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([b'{"generation":"older"}', *lines[1:]]))
    assert _open(tmp_path).pending_shards() == [0, 1, 2, 3]  # the records since the last manifest write are lost
    assert json.loads(journal.read_text().splitlines()[0])["generation"] != "older"  # reopened: a new journal
    src = _open(tmp_path)
    _write(src, data, [0, 1, 2, 3])
    src.finalize()
    got = CacheReader(tmp_path, expect=expect()).get("a", torch.arange(16))
    assert torch.equal(got["logprobs"], data[1].half().float())


def test_version_1_cache_still_loads_and_resumes_and_unknown_version_is_one_line(tmp_path):
    """Version 1 (every shard record in manifest.json, no journal) is read as is and resumed (then written as
    version 2); a version this code does not know is refused in one line that says which it reads."""
    from lightning_fuse.cache.format import _read_manifest

    data = make_data(16, 1000)
    _write(_open(tmp_path), data, [0, 1])
    v1 = _read_manifest(tmp_path)  # the journal folded in: what version 1 kept in manifest.json
    v1["version"] = 1
    v1["sources"]["a"].pop("journal")
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(v1))
    (tmp_path / "a" / "journal.jsonl").unlink()
    src = _open(tmp_path)
    assert src.pending_shards() == [2, 3]
    _write(src, data, [2, 3])
    src.finalize()
    assert json.loads(manifest_path.read_text())["version"] == 2
    got = CacheReader(tmp_path, expect=expect()).get("a", torch.arange(16))
    assert torch.equal(got["ids"], data[0])

    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "version": 1}))
    CacheReader(tmp_path, expect=expect()).get("a", [0])  # a complete version-1 cache reads as is
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "version": 3}))
    with pytest.raises(CacheMismatchError, match=r"format version 3, this lightning-fuse reads versions 1, 2: ") as err:
        CacheReader(tmp_path, expect=expect())
    assert "\n" not in str(err.value)
