"""Writing a cache: :class:`CacheWriter` (one cache root) and :class:`SourceWriter` (the shards of one source)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_fuse.cache.format import (
    _DTYPES,
    _LOGPROB_TOL,
    _NAME_RE,
    FORMAT,
    JOURNAL,
    VERSION,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    _append_journal,
    _atomic_write,
    _canonical,
    _fields,
    _fsync_dir,
    _high_bits,
    _join,
    _journal_generation,
    _manifest_lock,
    _new_generation,
    _read_manifest,
    _shard_file,
    _shard_shapes,
    _short,
    _start_journal,
    _to_numpy,
    _write_manifest,
)
from lightning_fuse.cache.hashing import _file_checksum, _HashingFile, _read_verified, _stamp, _write_verified


def _save_npy(path: Path, arr: np.ndarray, algorithm: str) -> dict[str, Any]:
    """Atomically write ``arr`` as .npy; return the manifest record of the file (name, bytes, checksum)."""
    meta: dict[str, Any] = {}

    def write(f: Any) -> None:
        hf = _HashingFile(f, algorithm)
        np.lib.format.write_array(hf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
        meta.update(name=path.name, bytes=hf.nbytes, checksum=hf.hash.hexdigest())

    _atomic_write(path, write)
    return meta


class CacheWriter:
    """Creates (or reopens, to resume) a logprob cache at ``root``.

    Args:
        root: cache directory; created if missing.
        seq_len: L, tokens per sequence (all sequences have the same L).
        top_k: k, log-probs kept per token.
        vocab_size: size of the target vocabulary the ids index; picks the id encoding.
        shard_size: sequences per shard file (the unit of atomic writes and of resume).
        checksum: hashlib algorithm for file checksums (sha256: 1.8 GB/s with SHA-NI; blake2b: 0.9 GB/s).

    Raises:
        CacheMismatchError: ``root`` already holds a cache with other L, k, vocabulary or shard size.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        seq_len: int,
        top_k: int,
        vocab_size: int,
        shard_size: int = 1024,
        checksum: str = "sha256",
    ) -> None:
        problems = [
            f"`{name}` must be a positive int, got {value!r}"
            for name, value in (("seq_len", seq_len), ("top_k", top_k), ("vocab_size", vocab_size),
                                ("shard_size", shard_size))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1
        ]
        if not problems and top_k > vocab_size:
            problems.append(f"`top_k` must be <= `vocab_size` ({vocab_size}), got {top_k}")
        if checksum not in hashlib.algorithms_guaranteed:
            problems.append(f"`checksum` must be one of {sorted(hashlib.algorithms_guaranteed)}, got {checksum!r}")
        if problems:
            raise CacheError(_join(problems))
        self.root = Path(root)
        self.seq_len, self.top_k, self.vocab_size, self.shard_size = seq_len, top_k, vocab_size, shard_size
        self.root.mkdir(parents=True, exist_ok=True)
        with _manifest_lock(self.root):
            manifest = _read_manifest(self.root)
            if manifest is None:
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "seq_len": seq_len,
                    "top_k": top_k,
                    "vocab_size": vocab_size,
                    "shard_size": shard_size,
                    "id_high_bits": _high_bits(vocab_size),
                    "dtypes": {f: _DTYPES[f].str for f in _fields(vocab_size)},
                    "checksum": checksum,
                    "notes": "gold_logprob at position L-1 (no next token) is stored as 0; ids = ids | "
                    "unpackbits(ids_hi, bitorder='little') << 16 (ids_hi only when vocab_size > 65536)",
                    "sources": {},
                }
                _write_manifest(self.root, manifest)
            else:
                diffs = [
                    f"{key} {manifest.get(key)} (you asked {value})"
                    for key, value in (("seq_len", seq_len), ("top_k", top_k), ("vocab_size", vocab_size),
                                       ("shard_size", shard_size))
                    if manifest.get(key) != value
                ]
                if diffs:
                    raise CacheMismatchError(
                        f"cache at {self.root} was built with {', '.join(diffs)}: use another cache dir or delete "
                        f"this one"
                    )
        self.checksum: str = manifest["checksum"]

    def source(
        self,
        name: str,
        model_id: dict[str, Any],
        tokenizer_id: str,
        data_id: str,
        *,
        num_sequences: int,
        overwrite: bool = False,
    ) -> SourceWriter:
        """Open the writer of one source, resuming it if the cache already has it with the same identity.

        Args:
            name: source name, also its sub-directory (letters, digits, ``._-``).
            model_id: JSON-serialisable identity of the model (e.g. path + config hash).
            tokenizer_id: identity (hash) of the source's tokenizer.
            data_id: identity of the corpus, e.g. :func:`data_fingerprint` of its token ids.
            num_sequences: S, sequences in the corpus.
            overwrite: if the cache holds this source with another identity, drop it and start over
                (otherwise that is an error).

        Raises:
            CacheMismatchError: the source exists with another identity or sequence count and not ``overwrite``.
        """
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CacheError(f"source `name` must match {_NAME_RE.pattern} (it names a directory), got {name!r}")
        if not isinstance(num_sequences, int) or num_sequences < 1:
            raise CacheError(f"`num_sequences` must be a positive int, got {num_sequences!r}")
        if not isinstance(tokenizer_id, str) or not isinstance(data_id, str):
            raise CacheError(f"`tokenizer_id` and `data_id` must be str, got {tokenizer_id!r} and {data_id!r}")
        identity = {
            "model_id": _canonical(model_id, "model_id"),
            "tokenizer_id": tokenizer_id,
            "data_id": data_id,
            "num_sequences": num_sequences,
        }
        source_dir = self.root / name
        source_dir.mkdir(exist_ok=True)
        with _manifest_lock(self.root):
            manifest = _read_manifest(self.root)
            entry = manifest["sources"].get(name)
            stale = False
            if entry is not None:
                diffs = [k for k in identity if entry.get(k) != identity[k]]
                if diffs and not overwrite:
                    raise CacheMismatchError(
                        f"cache at {self.root} has source '{name}' built for "
                        + ", ".join(f"{k} {_short(entry.get(k))}" for k in diffs)
                        + "; you declared "
                        + ", ".join(f"{k} {_short(identity[k])}" for k in diffs)
                        + ": pass `overwrite=True` to rebuild it, or use another cache dir"
                    )
                stale = bool(diffs)
            journal = source_dir / JOURNAL
            if entry is None or stale:
                entry = manifest["sources"][name] = {**identity, "complete": False, "shards": []}
            if not entry["complete"] and (entry.get("journal") is None or _journal_generation(journal) != entry["journal"]):
                # a new source, a version-1 one, or a journal missing or older than the manifest (which holds its
                # records): a new journal
                entry["journal"] = _new_generation()
                _write_manifest(self.root, manifest)
                _start_journal(journal, entry["journal"])
        if stale:  # the old shards are unrecorded now; remove their files
            for path in source_dir.glob("shard-*.npy"):
                path.unlink(missing_ok=True)
        return SourceWriter(self, name, identity, entry.get("journal"))


class SourceWriter:
    """Writes the shards of one source; made by :meth:`CacheWriter.source`.

    Shard ``i`` holds sequences ``shard_range(i)``; all but the last have ``shard_size`` sequences.
    """

    def __init__(self, cache: CacheWriter, name: str, identity: dict[str, Any], generation: str | None = None) -> None:
        self._cache = cache
        self.name = name
        self.identity = identity
        self.dir = cache.root / name
        self._generation = generation  # of the journal this writer appends to (None: the source is complete)
        self.num_sequences: int = identity["num_sequences"]
        self.num_shards = math.ceil(self.num_sequences / cache.shard_size)

    def shard_range(self, shard_idx: int) -> range:
        """Sequence indices stored in shard ``shard_idx``."""
        self._check_idx(shard_idx)
        start = shard_idx * self._cache.shard_size
        return range(start, min(start + self._cache.shard_size, self.num_sequences))

    def _check_idx(self, shard_idx: int) -> None:
        if not isinstance(shard_idx, (int, np.integer)) or not 0 <= shard_idx < self.num_shards:
            raise CacheError(f"`shard_idx` must be in [0, {self.num_shards}), got {shard_idx!r}")

    def _entry(self, manifest: dict[str, Any]) -> dict[str, Any]:
        entry = manifest["sources"].get(self.name)
        if entry is None or any(entry.get(k) != v for k, v in self.identity.items()):
            raise CacheMismatchError(
                f"source '{self.name}' in cache {self._cache.root} was removed or rebuilt by another writer "
                f"while this one was open; reopen it with `CacheWriter.source`"
            )
        return entry

    def _done(self) -> set[int]:
        """Recorded shards whose files are all present with the recorded sizes (read fresh from disk)."""
        manifest = _read_manifest(self._cache.root)
        done = set()
        for rec in self._entry(manifest)["shards"]:
            files = rec["files"].values()
            if all(
                (p := self.dir / f["name"]).is_file() and p.stat().st_size == f["bytes"] for f in files
            ):
                done.add(rec["index"])
        return done

    def is_complete(self, shard_idx: int) -> bool:
        """Whether shard ``shard_idx`` is recorded in the manifest with all its files in place."""
        self._check_idx(shard_idx)
        return shard_idx in self._done()

    def drop_damaged(self) -> list[int]:
        """Re-verify every recorded shard (each file present, of the recorded size and checksum) and unrecord the
        damaged ones, so that :meth:`pending_shards` lists them for rewriting; the source is then incomplete until
        :meth:`finalize`. A file is hashed once: those that pass are recorded in ``verified.json`` (checksum, size,
        modification time, as :meth:`CacheReader.verify` records them) and not hashed again while their record
        matches. Returns the damaged shard indices.
        """
        c = self._cache
        seen = _read_verified(c.root)
        passed: dict[str, list[Any]] = {}
        with _manifest_lock(c.root):
            manifest = _read_manifest(c.root)
            entry = self._entry(manifest)
            damaged = []
            for rec in entry["shards"]:
                for f in rec["files"].values():
                    path, key = self.dir / f["name"], f"{self.name}/{f['name']}"
                    try:
                        stamp = _stamp(path, f["checksum"])
                        ok = stamp[1] == f["bytes"] and (
                            seen.get(key) == stamp or _file_checksum(path, c.checksum) == f["checksum"])
                    except OSError:
                        ok = False
                    if not ok:
                        damaged.append(rec["index"])
                        break
                    passed[key] = stamp
            if damaged:
                entry["shards"] = [r for r in entry["shards"] if r["index"] not in damaged]
                entry["complete"] = False
                # a new journal: the old one's records of the damaged shards must not come back
                entry["journal"] = self._generation = _new_generation()
                _write_manifest(c.root, manifest)
                _start_journal(self.dir / JOURNAL, entry["journal"])
        _write_verified(c.root, seen, passed)
        return damaged

    def pending_shards(self) -> list[int]:
        """Shards still to write (never written, interrupted, or with a missing/truncated file)."""
        done = self._done()
        return [i for i in range(self.num_shards) if i not in done]

    def write_shard(
        self,
        shard_idx: int,
        ids: torch.Tensor | np.ndarray,
        logprobs: torch.Tensor | np.ndarray,
        gold_logprob: torch.Tensor | np.ndarray,
        ce: torch.Tensor | np.ndarray,
    ) -> None:
        """Write shard ``shard_idx`` atomically (n = ``len(shard_range(shard_idx))``).

        Args:
            ids: [n, L, k] top-k token ids in the target vocabulary, any integer dtype; -1 = empty slot (its
                log-prob -inf; a cross-tokenizer source's one-hot fallback or unmapped ids), read back as -1.
            logprobs: [n, L, k] their log-probs (normalised over the full vocabulary), sorted descending.
            gold_logprob: [n, L] log P(gold next token); position L-1 has none and is stored as 0.
            ce: [n] mean cross-entropy on the gold tokens (valid positions only).
        """
        self._check_idx(shard_idx)
        c = self._cache
        n = len(self.shard_range(shard_idx))
        arrays = {"ids": _to_numpy(ids), "logprobs": _to_numpy(logprobs),
                  "gold_logprob": _to_numpy(gold_logprob), "ce": _to_numpy(ce)}
        expected = _shard_shapes(n, c.seq_len, c.top_k, c.vocab_size)
        problems = [
            f"`{f}` must have shape {list(expected[f])}, got {list(a.shape)}"
            for f, a in arrays.items()
            if a.shape != expected[f]
        ]
        if problems:
            raise CacheError(f"shard {shard_idx} of source '{self.name}': " + _join(problems))
        ids_np, lp, gold, ce_np = (arrays[f] for f in ("ids", "logprobs", "gold_logprob", "ce"))
        if not np.issubdtype(ids_np.dtype, np.integer):
            problems.append(f"`ids` must be integer, got {ids_np.dtype}")
        elif ids_np.size and (ids_np.min() < -1 or ids_np.max() >= c.vocab_size):
            problems.append(f"`ids` must be in [0, {c.vocab_size}) or -1 (empty slot), got [{ids_np.min()}, "
                            f"{ids_np.max()}]")
        elif ids_np.size and np.issubdtype(lp.dtype, np.floating) and not np.isneginf(lp[ids_np < 0]).all():
            problems.append("`ids` -1 marks an empty slot: its `logprobs` must be -inf")
        for f, a in (("logprobs", lp), ("gold_logprob", gold), ("ce", ce_np)):
            if not np.issubdtype(a.dtype, np.floating):
                problems.append(f"`{f}` must be floating point, got {a.dtype}")
            elif np.isnan(a).any():
                problems.append(f"`{f}` contains NaN")
        if not problems:
            for f, a in (("logprobs", lp), ("gold_logprob", gold[:, :-1])):
                if a.size and a.max() > _LOGPROB_TOL:
                    problems.append(f"`{f}` must be log-probabilities (<= 0), got max {float(a.max()):.4g}")
            if not np.all(lp[..., :-1] >= lp[..., 1:]):
                problems.append("`logprobs` must be sorted descending along the last dim (as `torch.topk` gives)")
        if problems:
            raise CacheError(f"shard {shard_idx} of source '{self.name}': " + _join(problems))

        ids_np = np.maximum(ids_np.astype(np.int64, copy=False), 0)  # empty slots: read back as -1 from -inf
        gold = np.minimum(gold, 0).astype(_DTYPES["gold_logprob"])
        gold[:, -1] = 0
        encoded = {
            "ids": (ids_np & 0xFFFF).astype(_DTYPES["ids"]),
            "logprobs": np.minimum(lp, 0).astype(_DTYPES["logprobs"]),
            "gold_logprob": gold,
            "ce": ce_np.astype(_DTYPES["ce"]),
        }
        b = _high_bits(c.vocab_size)
        if b:
            bits = ((ids_np[..., None] >> (16 + np.arange(b))) & 1).astype(np.uint8)  # [n, L, k, b]
            encoded["ids_hi"] = np.packbits(bits.reshape(n, c.seq_len, c.top_k * b), axis=-1, bitorder="little")

        self._record({"drop": int(shard_idx)})  # forget an older copy of this shard before its files are replaced
        files = {
            f: _save_npy(_shard_file(self.dir, shard_idx, f), encoded[f], c.checksum) for f in _fields(c.vocab_size)
        }
        _fsync_dir(self.dir)
        self._record({"index": int(shard_idx), "count": n, "files": files})

    def _record(self, event: dict[str, Any]) -> None:
        """Append ``event`` to the source's journal: O(1), manifest.json is not rewritten. When the journal was
        replaced since this writer opened it (another writer unrecorded damaged shards), the manifest says which
        journal is current, or that the source was finalized, removed or rebuilt (an error)."""
        c = self._cache
        with _manifest_lock(c.root):
            if self._generation is not None and _append_journal(self.dir / JOURNAL, self._generation, event):
                return
            entry = self._entry(_read_manifest(c.root))
            if entry["complete"]:
                raise CacheError(
                    f"source '{self.name}' in cache {c.root} is complete; reopen it with `overwrite=True` and "
                    f"another identity to rebuild it"
                )
            if entry.get("journal") is None or not _append_journal(self.dir / JOURNAL, entry["journal"], event):
                raise CacheMismatchError(
                    f"the journal of source '{self.name}' in cache {c.root} was replaced while this writer was open; "
                    f"reopen it with `CacheWriter.source`"
                )
            self._generation = entry["journal"]

    def finalize(self) -> None:
        """Mark the source complete; readers refuse it until then.

        Raises:
            CacheIncompleteError: some shards are still pending.
        """
        pending = self.pending_shards()
        if pending:
            raise CacheIncompleteError(
                f"source '{self.name}' in cache {self._cache.root} still has {len(pending)} of {self.num_shards} "
                f"shards to write (first: {pending[:5]}); write them before `finalize()`"
            )
        with _manifest_lock(self._cache.root):
            manifest = _read_manifest(self._cache.root)  # the journal folded in
            entry = self._entry(manifest)
            entry["complete"] = True
            entry.pop("journal", None)
            _write_manifest(self._cache.root, manifest)
            (self.dir / JOURNAL).unlink(missing_ok=True)
            self._generation = None


