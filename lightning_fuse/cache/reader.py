"""Reading a finished cache: :class:`CacheReader` (memory-mapped, checked) and :class:`CachedSourcesDataset`."""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_fuse.cache.format import (
    _DTYPES,
    _FIX,
    _IDENTITY_KEYS,
    MANIFEST,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    _canonical,
    _fields,
    _high_bits,
    _join,
    _read_manifest,
    _shard_shapes,
    _short,
    _to_numpy,
)
from lightning_fuse.cache.hashing import VERIFIED as VERIFIED
from lightning_fuse.cache.hashing import _file_checksum, _read_verified, _stamp, _write_verified


def _difference(name: str, key: str, cached: Any, declared: Any) -> str:
    """What differs between a cached and a declared identity, naming the sub-keys of a ``model_id``."""
    if isinstance(cached, dict) and isinstance(declared, dict):
        keys = sorted(k for k in {*cached, *declared} if cached.get(k) != declared.get(k))
        note = " (the source changed since the cache was built)" if "weights" in keys else ""
        return f"source '{name}' was built for " + ", ".join(
            f"{key}.{k} {_short(cached.get(k), 60)}, you declared {_short(declared.get(k), 60)}" for k in keys
        ) + note
    return f"source '{name}' was built for {key} {_short(cached)}, you declared {_short(declared)}"


class CacheReader:
    """Reads a finished logprob cache, memory-mapped.

    Opening checks the manifest against ``expect`` and the expected L/k/vocabulary, that every source read is
    complete, and that every shard file exists with its recorded size (so a truncated file is caught at once);
    :meth:`verify` also checks the checksums.

    Args:
        root: cache directory.
        expect: per source to read, the identity it must have: any of ``model_id`` (dict), ``tokenizer_id``,
            ``data_id`` (str), ``num_sequences``. ``None`` reads every source in the cache without identity checks.
        seq_len, top_k, vocab_size: if given, the cache must have these.
        max_open_shards: memory-mapped shards kept open per reader (each holds a few file descriptors).

    Raises:
        CacheMismatchError, CacheIncompleteError, CacheCorruptError: with what differs and what to do.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        expect: dict[str, dict[str, Any]] | None = None,
        seq_len: int | None = None,
        top_k: int | None = None,
        vocab_size: int | None = None,
        max_open_shards: int = 64,
    ) -> None:
        self.root = Path(root)
        manifest = _read_manifest(self.root)
        if manifest is None:
            raise CacheIncompleteError(f"no cache at {self.root} ({MANIFEST} missing): {_FIX}")
        self.manifest = manifest
        self.seq_len: int = manifest["seq_len"]
        self.top_k: int = manifest["top_k"]
        self.vocab_size: int = manifest["vocab_size"]
        self.shard_size: int = manifest["shard_size"]
        self.max_open_shards = max_open_shards
        self._fields = _fields(self.vocab_size)
        self._high_bits = _high_bits(self.vocab_size)
        stored = {f: np.dtype(s) for f, s in manifest["dtypes"].items()}
        if stored != {f: _DTYPES[f] for f in self._fields} or manifest.get("id_high_bits") != self._high_bits:
            raise CacheCorruptError(f"cache at {self.root} declares dtypes {manifest['dtypes']} that this version "
                                    f"does not read: {_FIX}")

        diffs = [
            f"{key} {manifest[key]} (you declared {value})"
            for key, value in (("seq_len", seq_len), ("top_k", top_k), ("vocab_size", vocab_size))
            if value is not None and manifest[key] != value
        ]
        if diffs:
            raise CacheMismatchError(f"cache at {self.root} was built with {', '.join(diffs)}: {_FIX}")

        available = manifest["sources"]
        names = list(expect) if expect is not None else sorted(available)
        missing = [n for n in names if n not in available]
        if missing:
            raise CacheIncompleteError(
                f"cache at {self.root} has no source {', '.join(map(repr, missing))} (it has: "
                f"{', '.join(sorted(available)) or 'none'}): {_FIX}"
            )
        problems = []
        for name, want in (expect or {}).items():
            unknown = set(want) - {*_IDENTITY_KEYS, "num_sequences"}
            if unknown:
                raise CacheError(f"`expect['{name}']` keys must be among {[*_IDENTITY_KEYS, 'num_sequences']}, "
                                 f"got {sorted(unknown)}")
            entry = available[name]
            for key, value in want.items():
                value = _canonical(value, f"expect['{name}']['{key}']")
                if entry.get(key) != value:
                    problems.append(_difference(name, key, entry.get(key), value))
        if problems:
            raise CacheMismatchError(
                f"cache at {self.root}: {_join(problems)}: rerun `lightning-fuse precompute` with `--overwrite "
                "true` to rebuild it, or point to another cache dir"
            )
        incomplete = [n for n in names if not available[n].get("complete")]
        if incomplete:
            raise CacheIncompleteError(
                f"cache at {self.root}: source {', '.join(map(repr, incomplete))} is incomplete ("
                + ", ".join(f"{len(available[n]['shards'])}/{self._num_shards(n)} shards" for n in incomplete)
                + "): rerun `lightning-fuse precompute` to finish it"
            )
        self.sources: list[str] = names
        self._check_files()
        self._open: OrderedDict[tuple[str, int], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def _num_shards(self, name: str) -> int:
        return math.ceil(self.manifest["sources"][name]["num_sequences"] / self.shard_size)

    def _records(self, name: str) -> list[dict[str, Any]]:
        return self.manifest["sources"][name]["shards"]

    def _check_files(self) -> None:
        """Every shard of every source read is recorded with the right count, and its files exist and have
        the recorded size."""
        problems = []
        for name in self.sources:
            n_seq = self.num_sequences(name)
            records = self._records(name)
            if [r["index"] for r in records] != list(range(self._num_shards(name))):
                problems.append(f"source '{name}' records shards {[r['index'] for r in records]}, expected "
                                f"0..{self._num_shards(name) - 1}")
                continue
            for rec in records:
                count = min(self.shard_size, n_seq - rec["index"] * self.shard_size)
                if rec["count"] != count or set(rec["files"]) != set(self._fields):
                    problems.append(f"source '{name}' shard {rec['index']} record is inconsistent")
                    continue
                for f in rec["files"].values():
                    path = self.root / name / f["name"]
                    if not path.is_file():
                        problems.append(f"{path} is missing")
                    elif (size := path.stat().st_size) != f["bytes"]:
                        problems.append(f"{path} has {size} bytes, expected {f['bytes']} (truncated or overwritten)")
        if problems:
            raise CacheCorruptError(f"cache at {self.root}: {_join(problems)}: {_FIX}")

    def num_sequences(self, name: str) -> int:
        """S, sequences cached for source ``name``."""
        self._check_source(name)
        return self.manifest["sources"][name]["num_sequences"]

    def identity(self, name: str) -> dict[str, Any]:
        """model_id, tokenizer_id, data_id and num_sequences the source was built with."""
        self._check_source(name)
        entry = self.manifest["sources"][name]
        return {k: entry[k] for k in (*_IDENTITY_KEYS, "num_sequences")}

    def _check_source(self, name: str) -> None:
        if name not in self.sources:
            raise CacheError(f"source must be one of {self.sources} (opened from {self.root}), got {name!r}")

    def verify(self, sources: Sequence[str] | None = None, remember: bool = False) -> None:
        """Recompute every shard file's checksum (reads the whole cache: ~1.8 GB/s for sha256 with SHA-NI).

        With ``remember``, files that passed are recorded in ``<root>/verified.json`` (checksum, size, modification
        time) and later calls skip a file whose record still matches: the cache is hashed once, not at every start
        (a rewritten or replaced file has another size or time and is hashed again).

        Raises:
            CacheCorruptError: naming every file that fails.
        """
        algorithm = self.manifest["checksum"]
        seen = _read_verified(self.root) if remember else {}
        passed: dict[str, list[Any]] = {}
        problems = []
        for name in sources if sources is not None else self.sources:
            self._check_source(name)
            for rec in self._records(name):
                for f in rec["files"].values():
                    path = self.root / name / f["name"]
                    try:
                        stamp = _stamp(path, f["checksum"])
                        key = f"{name}/{f['name']}"
                        ok = seen.get(key) == stamp or _file_checksum(path, algorithm) == f["checksum"]
                    except OSError as err:
                        problems.append(f"{path}: {err}")
                        continue
                    if not ok:
                        problems.append(f"{path} fails its {algorithm} checksum")
                    else:
                        passed[key] = stamp
        if problems:
            raise CacheCorruptError(f"cache at {self.root}: {_join(problems)}: {_FIX}")
        if remember:
            _write_verified(self.root, seen, passed)

    def _shard(self, name: str, shard_idx: int) -> dict[str, np.ndarray]:
        """Memory maps of one shard's files (LRU-cached), header-checked against the manifest."""
        key = (name, shard_idx)
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        rec = self._records(name)[shard_idx]
        shapes = _shard_shapes(rec["count"], self.seq_len, self.top_k, self.vocab_size)
        arrays = {}
        for field in self._fields:
            path = self.root / name / rec["files"][field]["name"]
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise CacheCorruptError(f"cannot read {path}: {err}: {_FIX}") from err
            if arr.dtype != _DTYPES[field] or arr.shape != shapes[field] or not arr.flags.c_contiguous:
                raise CacheCorruptError(
                    f"{path} holds {arr.dtype} {list(arr.shape)}, expected {_DTYPES[field]} {list(shapes[field])}: "
                    f"{_FIX}"
                )
            arrays[field] = arr
        with self._lock:
            self._open[key] = arrays
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        return arrays

    def get(self, source: str, seq_indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Fields of sequences ``seq_indices`` (B of them, any order, repeats allowed) of one source.

        Returns:
            ``ids`` [B, L, k] int64, ``logprobs`` [B, L, k] float32, ``gold_logprob`` [B, L] float32 (0 at
            position L-1), ``ce`` [B] float32.
        """
        self._check_source(source)
        idx = _to_numpy(seq_indices).astype(np.int64, copy=False).reshape(-1)
        n_seq = self.num_sequences(source)
        if idx.size and (idx.min() < 0 or idx.max() >= n_seq):
            raise IndexError(f"sequence indices must be in [0, {n_seq}) for source '{source}', "
                             f"got [{idx.min()}, {idx.max()}]")
        B, L, k = idx.size, self.seq_len, self.top_k
        out = {
            "ids": np.empty((B, L, k), np.int64),
            "logprobs": np.empty((B, L, k), np.float32),
            "gold_logprob": np.empty((B, L), np.float32),
            "ce": np.empty((B,), np.float32),
        }
        shard_of, row_of = np.divmod(idx, self.shard_size)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            rows = row_of[where]
            order = np.argsort(rows, kind="stable")  # read rows in file order
            where, rows = where[order], rows[order]
            arrays = self._shard(source, int(s))
            ids = arrays["ids"][rows].astype(np.int64)
            if self._high_bits:
                b = self._high_bits
                bits = np.unpackbits(arrays["ids_hi"][rows], axis=-1, count=k * b, bitorder="little")
                hi = bits.reshape(len(rows), L, k, b).astype(np.int64) << (16 + np.arange(b))
                ids |= hi.sum(-1)
            lp = arrays["logprobs"][rows]
            out["ids"][where] = np.where(np.isneginf(lp), -1, ids)  # -inf: an empty slot (probability 0)
            out["logprobs"][where] = lp
            out["gold_logprob"][where] = arrays["gold_logprob"][rows]
            out["ce"][where] = arrays["ce"][rows]
        return {f: torch.from_numpy(a) for f, a in out.items()}

    def ce(self, source: str) -> torch.Tensor:
        """[S] float32 cross-entropy of every sequence for one source."""
        self._check_source(source)
        return torch.from_numpy(np.concatenate(
            [np.asarray(self._shard(source, r["index"])["ce"], np.float32) for r in self._records(source)]
        ))

    def close(self) -> None:
        """Drop the open memory maps (they also close when the reader is garbage-collected)."""
        with self._lock:
            self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers under "spawn": never ship the memory maps (numpy would copy their data).
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CachedSourcesDataset(Dataset):
    """Per sequence index, the cached fields of several sources: ``{source: {ids, logprobs, gold_logprob, ce}}``.

    Shapes per item: ids [L, k] int64, logprobs [L, k] float32, gold_logprob [L] float32, ce [] float32; the
    default collate stacks a batch dimension in front. ``__getitems__`` reads a whole batch per shard at once.
    """

    def __init__(self, reader: CacheReader, sources: Sequence[str]) -> None:
        if not sources:
            raise CacheError(f"`sources` must name at least one of {reader.sources}, got {list(sources)}")
        for name in sources:
            reader._check_source(name)
        lengths = {name: reader.num_sequences(name) for name in sources}
        if len(set(lengths.values())) != 1:
            raise CacheMismatchError(f"sources of {reader.root} cache different numbers of sequences {lengths}: "
                                     f"{_FIX}")
        self.reader = reader
        self.sources = list(sources)
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, dict[str, torch.Tensor]]]:
        batch = {name: self.reader.get(name, indices) for name in self.sources}
        return [
            {name: {f: t[i] for f, t in fields.items()} for name, fields in batch.items()} for i in range(len(indices))
        ]
