"""On-disk cache of the source LLMs' sparse next-token distributions (offline mode).

Each source is run once over the training corpus (S blocks of L tokens, all the same L); per token we keep its
top-k next-token log-probs (full-vocabulary normalised, sorted descending) and their ids in the *target*
vocabulary, plus the log-prob of the gold next token; per sequence its mean cross-entropy on the gold tokens.

Layout (json + .npy only, no pickle anywhere)::

    <root>/manifest.json                       format, L, k, vocab size, dtypes, per source: identity + shards
    <root>/<source>/shard-00000.ids.npy        uint16 [n, L, k]    low 16 bits of the token ids
    <root>/<source>/shard-00000.ids_hi.npy     uint8  [n, L, m]    high bits, packed (only when vocab > 65536)
    <root>/<source>/shard-00000.logprobs.npy   float16 [n, L, k]   top-k log-probs, sorted descending
    <root>/<source>/shard-00000.gold.npy       float16 [n, L]      log P(gold next token); 0 at position L-1
    <root>/<source>/shard-00000.ce.npy         float32 [n]         mean CE on the gold tokens

Ids take 16 bits plus ``b = bit_length(vocab_size - 1) - 16`` packed bits each (b = 0 below 65537 tokens,
1 for Llama-3's 128k, 2 for Gemma's 256k), so at k = 10 a token costs 42 / 44 / 45 bytes per source instead of
FuseLLM's ~100 (fp16 values + int64 ids). fp16 log-probs are exact to half an ulp: |error| <= |x| * 2**-11
(0.002 at x = -4, 0.008 at x = -16); values below -65504 become -inf (probability 0).

Writes are atomic: each file goes to a temporary name, is fsynced and ``os.replace``-d; the shard is recorded in
the manifest (itself replaced atomically, under a file lock so several processes or ranks can write shards of
the same cache) only after all its files are in place. An interruption leaves either the whole shard recorded or
nothing, and ``SourceWriter.pending_shards()`` tells a restarted job what is left.

Example::

    writer = CacheWriter("cache/", seq_len=2048, top_k=10, vocab_size=32000, shard_size=512)
    src = writer.source("llama", {"path": "meta-llama/Llama-2-7b-hf"}, tok_hash, data_fingerprint(tokens),
                        num_sequences=len(tokens))
    for i in src.pending_shards():
        rows = src.shard_range(i)                       # sequence indices of shard i
        src.write_shard(i, ids, logprobs, gold_logprob, ce)
    src.finalize()

    reader = CacheReader("cache/", expect={"llama": {"model_id": {...}, "data_id": ...}})
    batch = reader.get("llama", [3, 17, 5])             # ids [3, L, k] int64, logprobs float32, ...
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

try:  # POSIX advisory lock around manifest updates; without it (Windows) use one writer process per cache.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheReader",
    "CacheWriter",
    "CachedSourcesDataset",
    "SourceWriter",
    "data_fingerprint",
]

FORMAT = "lightning-fuse-logprob-cache"
VERSION = 1
MANIFEST = "manifest.json"
_LOCK = ".manifest.lock"
_FIX = "rerun `lightning-fuse precompute` or point to another cache dir"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_IDENTITY_KEYS = ("model_id", "tokenizer_id", "data_id")
_LOGPROB_TOL = 1e-3  # log-probs above this are refused; (0, tol] is rounding noise and is clamped to 0
_HASH_CHUNK = 1 << 22
# field -> (file suffix, numpy dtype as stored, little-endian)
_DTYPES = {
    "ids": np.dtype("<u2"),
    "ids_hi": np.dtype("u1"),
    "logprobs": np.dtype("<f2"),
    "gold_logprob": np.dtype("<f2"),
    "ce": np.dtype("<f4"),
}
_SUFFIX = {"ids": "ids", "ids_hi": "ids_hi", "logprobs": "logprobs", "gold_logprob": "gold", "ce": "ce"}


class CacheError(ValueError):
    """Base class of every error about a logprob cache."""


class CacheMismatchError(CacheError):
    """The cache was built for another model, tokenizer, corpus, L, k or vocabulary."""


class CacheIncompleteError(CacheError):
    """A source is missing from the cache or was not finalized."""


class CacheCorruptError(CacheError):
    """A cache file is missing, truncated, or fails its checksum or header check."""


def data_fingerprint(token_ids: torch.Tensor | np.ndarray) -> str:
    """sha256 of a corpus' token ids ([S, L], any integer dtype): the ``data_id`` to pass to the cache."""
    arr = _to_numpy(token_ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise CacheError(f"`token_ids` must be integer, got {arr.dtype}")
    h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
    h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _canonical(obj: Any, what: str) -> Any:
    """JSON round trip, so tuples/lists and key order compare equal to what the manifest holds."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise CacheError(f"`{what}` must be JSON-serialisable (str, numbers, lists, dicts), got {obj!r}") from err


def _short(obj: Any, limit: int = 160) -> str:
    s = json.dumps(obj, sort_keys=True) if not isinstance(obj, str) else repr(obj)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _high_bits(vocab_size: int) -> int:
    """Bits of a token id above the low 16 that are stored packed in ``ids_hi`` (0 when vocab <= 65536)."""
    return max(0, (vocab_size - 1).bit_length() - 16)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class _HashingFile(io.RawIOBase):
    """Write-through file wrapper that counts and hashes the bytes as ``np.lib.format`` writes them."""

    def __init__(self, f: Any, algorithm: str) -> None:
        self._f = f
        self.hash = hashlib.new(algorithm)
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.hash.update(b)
        self.nbytes += len(memoryview(b).cast("B"))
        return self._f.write(b)


def _atomic_write(path: Path, write_fn: Any) -> None:
    """``write_fn(f)`` into a temporary file next to ``path``, fsync, then ``os.replace`` onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_npy(path: Path, arr: np.ndarray, algorithm: str) -> dict[str, Any]:
    """Atomically write ``arr`` as .npy; return the manifest record of the file (name, bytes, checksum)."""
    meta: dict[str, Any] = {}

    def write(f: Any) -> None:
        hf = _HashingFile(f, algorithm)
        np.lib.format.write_array(hf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
        meta.update(name=path.name, bytes=hf.nbytes, checksum=hf.hash.hexdigest())

    _atomic_write(path, write)
    return meta


def _file_checksum(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheCorruptError(f"cannot read {path}: {err}; {_FIX}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheCorruptError(f"{path} is not a lightning-fuse logprob cache manifest; {_FIX}")
    if manifest.get("version") != VERSION:
        raise CacheMismatchError(
            f"cache at {root} has format version {manifest.get('version')}, this lightning-fuse reads version "
            f"{VERSION}: {_FIX}"
        )
    return manifest


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _atomic_write(root / MANIFEST, lambda f: f.write(data))
    _fsync_dir(root)


@contextlib.contextmanager
def _manifest_lock(root: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / _LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fields(vocab_size: int) -> tuple[str, ...]:
    hi = ("ids_hi",) if _high_bits(vocab_size) else ()
    return ("ids", *hi, "logprobs", "gold_logprob", "ce")


def _shard_file(source_dir: Path, shard_idx: int, field: str) -> Path:
    return source_dir / f"shard-{shard_idx:05d}.{_SUFFIX[field]}.npy"


def _shard_shapes(n: int, seq_len: int, top_k: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
    b = _high_bits(vocab_size)
    return {
        "ids": (n, seq_len, top_k),
        "ids_hi": (n, seq_len, math.ceil(top_k * b / 8)),
        "logprobs": (n, seq_len, top_k),
        "gold_logprob": (n, seq_len),
        "ce": (n,),
    }


def _join(problems: list[str], limit: int = 6) -> str:
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


# ------------------------------------------------------------------------------------------------ writer


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
            if entry is None or stale:
                manifest["sources"][name] = {**identity, "complete": False, "shards": []}
                _write_manifest(self.root, manifest)
        if stale:  # the old shards are unrecorded now; remove their files
            for path in source_dir.glob("shard-*.npy"):
                path.unlink(missing_ok=True)
        return SourceWriter(self, name, identity)


class SourceWriter:
    """Writes the shards of one source; made by :meth:`CacheWriter.source`.

    Shard ``i`` holds sequences ``shard_range(i)``; all but the last have ``shard_size`` sequences.
    """

    def __init__(self, cache: CacheWriter, name: str, identity: dict[str, Any]) -> None:
        self._cache = cache
        self.name = name
        self.identity = identity
        self.dir = cache.root / name
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

        with _manifest_lock(c.root):  # forget an older copy of this shard before its files are replaced
            manifest = _read_manifest(c.root)
            entry = self._entry(manifest)
            if entry["complete"]:
                raise CacheError(
                    f"source '{self.name}' in cache {c.root} is complete; reopen it with `overwrite=True` and "
                    f"another identity to rebuild it"
                )
            if any(r["index"] == shard_idx for r in entry["shards"]):
                entry["shards"] = [r for r in entry["shards"] if r["index"] != shard_idx]
                _write_manifest(c.root, manifest)
        files = {
            f: _save_npy(_shard_file(self.dir, shard_idx, f), encoded[f], c.checksum) for f in _fields(c.vocab_size)
        }
        _fsync_dir(self.dir)
        with _manifest_lock(c.root):
            manifest = _read_manifest(c.root)
            entry = self._entry(manifest)
            entry["shards"] = sorted(
                [r for r in entry["shards"] if r["index"] != shard_idx]
                + [{"index": shard_idx, "count": n, "files": files}],
                key=lambda r: r["index"],
            )
            _write_manifest(c.root, manifest)

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
            manifest = _read_manifest(self._cache.root)
            self._entry(manifest)["complete"] = True
            _write_manifest(self._cache.root, manifest)


# ------------------------------------------------------------------------------------------------ reader


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
                    problems.append(f"source '{name}' was built for {key} {_short(entry.get(key))}, you declared "
                                    f"{_short(value)}")
        if problems:
            raise CacheMismatchError(f"cache at {self.root}: {_join(problems)}: {_FIX}")
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

    def verify(self, sources: Sequence[str] | None = None) -> None:
        """Recompute every shard file's checksum (reads the whole cache: ~1.8 GB/s for sha256 with SHA-NI).

        Raises:
            CacheCorruptError: naming every file that fails.
        """
        algorithm = self.manifest["checksum"]
        problems = []
        for name in sources if sources is not None else self.sources:
            self._check_source(name)
            for rec in self._records(name):
                for f in rec["files"].values():
                    path = self.root / name / f["name"]
                    try:
                        ok = _file_checksum(path, algorithm) == f["checksum"]
                    except OSError as err:
                        problems.append(f"{path}: {err}")
                        continue
                    if not ok:
                        problems.append(f"{path} fails its {algorithm} checksum")
        if problems:
            raise CacheCorruptError(f"cache at {self.root}: {_join(problems)}: {_FIX}")

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
