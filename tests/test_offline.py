"""Offline mode: `lightning-fuse precompute` writes the sources' outputs once; CachedTextDataModule serves them."""

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from lightning_fuse import FusionModule, SourceSpec, TextDataModule
from lightning_fuse.cache import CacheCorruptError, CacheMismatchError, SourceWriter
from lightning_fuse.cli import main
from lightning_fuse.offline import CachedTextDataModule
from lightning_fuse.precompute import precompute

NAMES = ("words", "sums")
BLOCK, BATCH, SHARD = 32, 16, 64  # tiny world: 750 train blocks -> 12 shards per source, 150 val blocks -> 3


def write_config(world, path: Path, cache_dir: Path) -> str:
    """A `lightning-fuse fit` config (trainer and seed included: precompute ignores them)."""
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "accelerator": "cpu"},
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": world["target"], "sources": [{"name": n, "path": world[n]} for n in NAMES],
            "selector_features": "rewards", "offline": True}},
        "data": {"class_path": "lightning_fuse.offline.CachedTextDataModule", "init_args": {
            "data_dir": world["corpus"], "cache_dir": str(cache_dir), "block_size": BLOCK, "batch_size": BATCH}},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_precompute(config: str) -> Path:
    return precompute(config, shard_size=SHARD, max_tokens_per_batch=BATCH * BLOCK, device="cpu")


@pytest.fixture(scope="module")
def cache(tiny_world, tmp_path_factory):
    """A complete cache (train + val) of the `words` and `sums` sources, built once for this module."""
    root = tmp_path_factory.mktemp("offline")
    return run_precompute(write_config(tiny_world, root / "fit.yaml", root / "cache"))


def make_module(world, offline, specs=None, seed=0):
    pl.seed_everything(seed, verbose=False)  # same seed: same target and selector initialisation
    specs = specs or [SourceSpec(n, world[n]) for n in NAMES]
    module = FusionModule(target=world["target"], sources=specs, selector_features="rewards", offline=offline)
    module.configure_model()
    return module


def make_dm(world, cache_dir, module, **kwargs):
    dm = CachedTextDataModule(world["corpus"], cache_dir=str(cache_dir), block_size=BLOCK, batch_size=BATCH, **kwargs)
    dm.bind(module)
    return dm


def test_offline_step_equals_online_and_offline_fit_trains(tiny_world, cache):
    online, offline = make_module(tiny_world, False), make_module(tiny_world, True)
    assert offline.sources == [] and len(online.sources) == 2
    dm = make_dm(tiny_world, cache, offline)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["cached"]["words"]["ids"].shape == (BATCH, BLOCK, 10)
    assert batch["cached"]["sums"]["ce"].shape == (BATCH,)
    plain_dm = TextDataModule(tiny_world["corpus"], block_size=BLOCK, batch_size=BATCH)
    plain_dm.connect(online.tokenizer)
    plain_dm.setup("fit")
    plain = next(iter(plain_dm.train_dataloader()))  # what an online fit's first step sees
    assert torch.equal(plain["input_ids"], batch["input_ids"]) and torch.equal(plain["domain"], batch["domain"])
    r_on, r_off = online._step(plain, "train"), offline._step(batch, "train")
    torch.testing.assert_close(r_off["source_ce"], r_on["source_ce"], rtol=0, atol=1e-5)  # CE is stored as fp32
    for key in ("loss", "kd", "selector_loss"):  # log-probs are stored as fp16: |error| <= |x| * 2**-11
        torch.testing.assert_close(r_off[key], r_on[key], rtol=2e-3, atol=1e-3, msg=key)

    before = {k: v.clone() for k, v in offline.target.state_dict().items()}
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2)
    dm = make_dm(tiny_world, cache, offline)
    trainer.fit(offline, dm)
    assert offline.sources == [], "offline fit must not load the sources"
    assert trainer.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in offline.target.state_dict().items())
    trainer.limit_val_batches = 1.0
    trainer.validate(offline, dm, verbose=False)  # offline: validation reads the cached val split
    results = offline.eval_results
    for domain, other in (("words", "sums"), ("sums", "words")):  # the specialist wins on its own domain
        assert np.isfinite(results[f"val/{domain}/target_ce"])
        assert results[f"val/{domain}/{domain}_ce"] < results[f"val/{domain}/{other}_ce"], results


def _shard_stats(root: Path, shard: int) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.glob(f"shard-{shard:05d}.*.npy"))}


def _files(root: Path) -> dict:
    """Per split and source: identity and every shard file's checksum, from the manifests."""
    out = {}
    for split in ("train", "val"):
        manifest = json.loads((root / split / "manifest.json").read_text())
        for name, entry in manifest["sources"].items():
            out[split, name] = (entry["data_id"], entry["model_id"], entry["complete"],
                                [(r["index"], {f: v["checksum"] for f, v in r["files"].items()}) for r in entry["shards"]])
    return out


def test_precompute_resumes_after_interruption(tiny_world, cache, tmp_path, monkeypatch):
    config = write_config(tiny_world, tmp_path / "fit.yaml", tmp_path / "cache")
    real_write = SourceWriter.write_shard
    written = []

    def interrupted(self, shard, *args, **kwargs):
        if written:
            raise KeyboardInterrupt("power cut")
        written.append((self.name, shard))
        return real_write(self, shard, *args, **kwargs)

    monkeypatch.setattr(SourceWriter, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(config)
    monkeypatch.undo()
    assert written == [("words", 0)]
    first = tmp_path / "cache" / "train" / "words"
    stats = _shard_stats(first, 0)
    assert len(stats) == 4 and not list(first.glob("shard-00001.*"))

    run_precompute(config)
    assert _shard_stats(first, 0) == stats, "the finished shard was rewritten"
    assert _files(tmp_path / "cache") == _files(cache), "resumed cache differs from a clean run"

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete cache must not load any source")

    monkeypatch.setattr("lightning_fuse.precompute._load_source", no_loading)
    run_precompute(config)  # complete: nothing to do


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_is_refused_at_setup(tiny_world, cache, tmp_path, damage):
    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    shard = root / "train" / "sums" / "shard-00003.logprobs.npy"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-7] ^= 0x01  # one bit of one log-prob: same size, only the checksum sees it
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    dm = make_dm(tiny_world, root, make_module(tiny_world, True))
    with pytest.raises(CacheCorruptError, match=r"shard-00003\.logprobs\.npy") as err:
        dm.setup("fit")
    assert ("checksum" if damage == "flip" else "truncated") in str(err.value)
    assert "precompute" in str(err.value)


def _other_tokenizer(tmp_path, world):
    from tiny import train_tokenizer

    text = (Path(world["corpus"]) / "words" / "train.txt").read_text()
    tok = train_tokenizer([text], vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


@pytest.mark.parametrize("change", ["model", "tokenizer", "data"])
def test_cache_for_other_model_tokenizer_or_data_is_refused(tiny_world, cache, tmp_path, change):
    specs = [SourceSpec(n, tiny_world[n]) for n in NAMES]
    kwargs = {}
    if change == "model":
        specs[0] = SourceSpec("words", tiny_world["general"])  # same name and config, other weights and path
    elif change == "tokenizer":
        specs[1] = SourceSpec("sums", tiny_world["sums"], tokenizer=_other_tokenizer(tmp_path, tiny_world))
    else:
        kwargs["max_blocks_per_domain"] = 100  # other blocks
    dm = make_dm(tiny_world, cache, make_module(tiny_world, True, specs), **kwargs)
    with pytest.raises(CacheMismatchError) as err:
        dm.setup("fit")
    message = str(err.value)
    key = {"model": "source 'words' was built for model_id", "tokenizer": "source 'sums' was built for tokenizer_id",
           "data": "data_id"}[change]
    assert key in message and "rerun `lightning-fuse precompute`" in message, message


def test_precompute_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["precompute", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--shard_size" in out and "sequences per shard file" in out


def test_precompute_through_the_cli(tiny_world, cache, tmp_path, capsys):
    config = write_config(tiny_world, tmp_path / "fit.yaml", cache)  # the complete cache: nothing to run
    main(["precompute", "--config", config, "--shard_size", str(SHARD), "--device", "cpu"])
    assert f"cache in {cache}" in capsys.readouterr().out


def test_cache_identity_of_an_aligned_source_records_alignment_and_target_tokenizer(tiny_world, tmp_path):
    """A cross-tokenizer source's cached outputs depend on how they were mapped onto the target's vocabulary: a
    cache built with another alignment mode or for another target tokenizer must not be reused. A same-tokenizer
    source is not aligned, so its identity ignores the alignment mode."""
    from transformers import AutoTokenizer

    from lightning_fuse.offline import source_identity

    target_tok = AutoTokenizer.from_pretrained(tiny_world["target"])
    other = _other_tokenizer(tmp_path, tiny_world)
    aligned = {mode: source_identity(SourceSpec("sums", tiny_world["sums"], tokenizer=other, alignment=mode), target_tok)
               for mode in ("exact", "min_ed")}
    assert aligned["exact"]["model_id"]["alignment"]["mode"] == "exact"
    assert aligned["exact"] != aligned["min_ed"]
    other_target = AutoTokenizer.from_pretrained(other)  # the same source, fused into a target with its tokenizer
    assert "alignment" not in source_identity(SourceSpec("sums", tiny_world["sums"], tokenizer=other), other_target)["model_id"]
    same = [source_identity(SourceSpec("words", tiny_world["words"], alignment=m), target_tok) for m in ("exact", "min_ed")]
    assert same[0] == same[1] and "alignment" not in same[0]["model_id"]


def test_precompute_and_offline_fit_with_a_cross_tokenizer_source(tiny_world, tmp_path, tmp_path_factory):
    """`lightning-fuse precompute` with a source of another tokenizer (its one-hot fallback and unmapped ids leave
    empty slots, id -1), then the offline step equals the online one on the same batch, and an offline fit runs."""
    from tiny import other_tokenizer_source

    other = other_tokenizer_source(tiny_world, tmp_path_factory.getbasetemp())
    config = {
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": tiny_world["target"], "sources": [{"name": "words", "path": tiny_world["words"]},
                                                        {"name": "other", "path": other}],
            "selector_features": "rewards", "offline": True, "alignment_cache_dir": None}},
        "data": {"class_path": "lightning_fuse.offline.CachedTextDataModule", "init_args": {
            "data_dir": tiny_world["corpus"], "cache_dir": str(tmp_path / "cache"), "block_size": BLOCK,
            "batch_size": BATCH, "max_blocks_per_domain": 32, "max_val_blocks_per_domain": 8}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    root = run_precompute(str(tmp_path / "fit.yaml"))
    specs = [SourceSpec("words", tiny_world["words"]), SourceSpec("other", other)]
    pl.seed_everything(0, verbose=False)
    online = FusionModule(target=tiny_world["target"], sources=specs, selector_features="rewards",
                          alignment_cache_dir=None)
    online.configure_model()
    pl.seed_everything(0, verbose=False)
    offline = FusionModule(target=tiny_world["target"], sources=specs, selector_features="rewards", offline=True)
    offline.configure_model()
    dm = make_dm(tiny_world, root, offline, max_blocks_per_domain=32, max_val_blocks_per_domain=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert (batch["cached"]["other"]["ids"] == -1).any()  # empty slots survive the round trip
    plain = {k: v for k, v in batch.items() if k != "cached"}
    r_on, r_off = online._step(plain, "train"), offline._step(batch, "train")
    torch.testing.assert_close(r_off["source_ce"], r_on["source_ce"], rtol=0, atol=1e-5)
    for key in ("loss", "kd", "selector_loss"):
        torch.testing.assert_close(r_off[key], r_on[key], rtol=2e-3, atol=1e-3, msg=key)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(offline, make_dm(tiny_world, root, offline, max_blocks_per_domain=32, max_val_blocks_per_domain=8))
    assert trainer.global_step == 2



def test_cache_is_hashed_once_not_at_every_start(tiny_world, cache, tmp_path, monkeypatch):
    """Setup verifies every checksum the first time only (recorded in verified.json); a shard rewritten since is
    hashed again, and refused when damaged. Was: the whole cache re-hashed at every start, on every rank."""
    import lightning_fuse.cache.reader as reader_mod

    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    for split in ("train", "val"):
        (root / split / "verified.json").unlink(missing_ok=True)
    calls = []
    real = reader_mod._file_checksum
    monkeypatch.setattr(reader_mod, "_file_checksum", lambda path, algo: calls.append(path) or real(path, algo))
    module = make_module(tiny_world, True)
    make_dm(tiny_world, root, module).setup("fit")
    first = len(calls)
    assert first == sum(1 for split in ("train", "val") for _ in (root / split).rglob("shard-*.npy"))
    make_dm(tiny_world, root, module).setup("fit")
    assert len(calls) == first
    shard = root / "train" / "sums" / "shard-00003.logprobs.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"shard-00003\.logprobs\.npy"):
        make_dm(tiny_world, root, module).setup("fit")
    assert len(calls) == first + 1


# ----------------------------------------------------------------------------------------------- sharded precompute
SMALL = {"max_blocks_per_domain": 24, "max_val_blocks_per_domain": 8}  # 48 train blocks -> 6 shards of 8, val -> 2


def write_small_config(world, path: Path, cache_dir: Path) -> str:
    """A fit config over a small cut of the tiny world (for the precompute layout tests: seconds, not minutes)."""
    config = yaml.safe_load(Path(write_config(world, path, cache_dir)).read_text())
    config["data"]["init_args"].update(SMALL)
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def small_ref(tiny_world, tmp_path_factory):
    """The small cut, precomputed in this process: 8 sequences per shard, batches of 16 sequences (one per shard)."""
    root = tmp_path_factory.mktemp("small_ref")
    config = write_small_config(tiny_world, root / "fit.yaml", root / "cache")
    return precompute(config, shard_size=8, max_tokens_per_batch=16 * BLOCK, device="cpu")


def test_precompute_result_does_not_depend_on_the_batch_size(tiny_world, small_ref, tmp_path):
    """Batches of 3 sequences (sized by tokens: 3 x 32 + 5 tokens; shards of 8 end with a batch of 2) give the same
    bytes, file for file, as batches of a whole shard."""
    config = write_small_config(tiny_world, tmp_path / "fit.yaml", tmp_path / "cache")
    root = precompute(config, shard_size=8, max_tokens_per_batch=3 * BLOCK + 5, device="cpu")
    assert _files(root) == _files(small_ref)
    assert len(_files(root)["train", "words"][3]) == 6


def test_precompute_redoes_only_damaged_shards_and_hashes_each_file_once(tiny_world, small_ref, tmp_path, monkeypatch):
    """A complete cache is checked without hashing files it verified before (verified.json); a removed and a
    truncated shard file are found by their size alone, and only those two shards are recomputed. Was: every file
    of every source hashed again at every precompute start."""
    import lightning_fuse.cache.writer as writer_mod

    root = tmp_path / "cache"
    shutil.copytree(small_ref, root)
    config = write_small_config(tiny_world, tmp_path / "fit.yaml", root)
    calls = []
    real = writer_mod._file_checksum
    monkeypatch.setattr(writer_mod, "_file_checksum", lambda path, algo: calls.append(path) or real(path, algo))
    n_files = sum(1 for _ in root.rglob("shard-*.npy"))
    precompute(config, shard_size=8, device="cpu")
    assert len(calls) == n_files  # the first check hashes every file once
    precompute(config, shard_size=8, device="cpu")
    assert len(calls) == n_files  # then never again

    (root / "train" / "words" / "shard-00002.ce.npy").unlink()
    truncated = root / "train" / "sums" / "shard-00004.ids.npy"
    truncated.write_bytes(truncated.read_bytes()[:100])
    before = {p: p.stat().st_mtime_ns for p in root.rglob("shard-*.npy")}
    precompute(config, shard_size=8, device="cpu")
    assert len(calls) == n_files  # found by size, not by hashing
    rewritten = sorted(f"{p.parent.parent.name}/{p.parent.name}/{p.name.split('.')[0]}" for p, t in before.items()
                       if p.stat().st_mtime_ns != t)
    assert sorted(set(rewritten)) == ["train/sums/shard-00004", "train/words/shard-00002"], rewritten
    assert _files(root) == _files(small_ref)


def test_two_processes_write_the_same_cache_as_one(tiny_world, small_ref, tmp_path):
    """`lightning-fuse precompute --devices 2` on CPU (gloo, launched by Lightning as `fit` under DDP): both
    processes write shards, and every shard file has the checksum of the 1-process run (same manifest)."""
    import os
    import subprocess
    import sys

    config = write_small_config(tiny_world, tmp_path / "fit.yaml", tmp_path / "cache")
    cmd = [sys.executable, "-m", "lightning_fuse", "precompute", "--config", config, "--shard_size", "8",
           "--max_tokens_per_batch", str(5 * BLOCK), "--device", "cpu", "--devices", "2", "--num_threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):  # 6 train + 2 val shards per source, shared 3 + 1 each
        assert f"process {rank} of 2 wrote 8 shard(s)" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert _files(tmp_path / "cache") == _files(small_ref)
    assert json.loads((tmp_path / "cache" / "train" / "manifest.json").read_text()) == \
        json.loads((small_ref / "train" / "manifest.json").read_text())


def test_two_nodes_write_the_same_cache_as_one(tiny_world, small_ref, tmp_path):
    """`--num_nodes 2 --devices 1`, each node's process started by hand as a cluster scheduler would (NODE_RANK,
    MASTER_ADDR, MASTER_PORT), both on this machine over a shared folder: the cache of the 1-process run."""
    import os
    import socket
    import subprocess
    import sys

    config = write_small_config(tiny_world, tmp_path / "fit.yaml", tmp_path / "cache")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "lightning_fuse", "precompute", "--config", config, "--shard_size", "8",
           "--max_tokens_per_batch", str(5 * BLOCK), "--device", "cpu", "--devices", "1", "--num_nodes", "2",
           "--num_threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env={**env, "NODE_RANK": str(node)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-4000:]
    for node, (out, _) in enumerate(outs):
        assert f"process {node} of 2 wrote" in out, out
    assert _files(tmp_path / "cache") == _files(small_ref)
    assert json.loads((tmp_path / "cache" / "train" / "manifest.json").read_text()) == \
        json.loads((small_ref / "train" / "manifest.json").read_text())


def test_shards_are_balanced_over_the_ranks_across_splits_and_sources():
    """Two sources with 3 train shards and 1 val shard each, on 2 ranks: 4 shards each (was: contiguous shares per
    source and split, whose remainders all went to the last rank: 2 vs 6); a short last shard counts for its size."""
    from types import SimpleNamespace

    from lightning_fuse.precompute import _my_shards
    from lightning_fuse.ranks import Ranks, balance

    def writer(n, size=8):
        return SimpleNamespace(shard_range=lambda i: range(i * size, min((i + 1) * size, n)))

    writers = {"train": writer(24), "val": writer(8)}
    pending = {"train": [0, 1, 2], "val": [0]}
    got = {}
    for rank in (0, 1):
        loads = [0, 0]
        got[rank] = [_my_shards(Ranks(rank, 2, torch.device("cpu")), pending, writers, loads) for _ in ("a", "b")]
        assert loads == [32, 32]
    assert [sum(len(s) for per_source in got[r] for s in per_source.values()) for r in (0, 1)] == [4, 4]
    for a, b in zip(*got.values()):  # every shard exactly once
        assert {(k, i) for k, v in a.items() for i in v} | {(k, i) for k, v in b.items() for i in v} == \
            {("train", 0), ("train", 1), ("train", 2), ("val", 0)}
    assert balance([8, 2, 8, 8], 2) == [0, 1, 1, 0]  # the rank holding the short shard takes the next one
    with pytest.raises(ValueError, match="one total per rank"):
        balance([1], 2, [0])
