"""The cache's on-disk format: constants, dtypes, shard layout, the manifest (read, write, lock) and its errors.

See :mod:`lightning_fuse.cache` for the layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # POSIX advisory lock around manifest updates; without it (Windows) use one writer process per cache.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = "lightning-fuse-logprob-cache"
VERSION = 2
"""Version 2: a source being written keeps its new shard records in ``<source>/journal.jsonl`` (appended, O(1) per
shard), folded into ``manifest.json`` when it is finalized. Version 1 (every shard record in ``manifest.json``, which
every shard write rewrote whole) is read as is and written as version 2."""
_READABLE = (1, 2)
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
_LOCK = ".manifest.lock"
_FIX = "rerun `lightning-fuse precompute` or point to another cache dir"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_IDENTITY_KEYS = ("model_id", "tokenizer_id", "data_id")
_LOGPROB_TOL = 1e-3  # log-probs above this are refused; (0, tol] is rounding noise and is clamped to 0
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
    if manifest.get("version") not in _READABLE:
        raise CacheMismatchError(
            f"cache at {root} has format version {manifest.get('version')}, this lightning-fuse reads versions "
            f"{', '.join(map(str, _READABLE))}: {_FIX}"
        )
    for name, entry in manifest.get("sources", {}).items():
        if isinstance(entry, dict) and entry.get("journal") is not None:
            _apply_journal(entry, _read_journal(root / name / JOURNAL, entry["journal"]) or [])
    return manifest


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Replace ``manifest.json`` (atomically), with every source's journal folded in (as ``_read_manifest`` gives
    it): replaying a journal over its own records again changes nothing, so the journals stay valid."""
    manifest["version"] = VERSION
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _atomic_write(root / MANIFEST, lambda f: f.write(data))
    _fsync_dir(root)


# ----------------------------------------------------------------------------------------------- journal
# ``<root>/<source>/journal.jsonl``: a first line ``{"generation": G}`` (G: the source entry's ``journal`` in
# manifest.json), then one JSON line per event, appended and fsynced under the manifest lock: ``{"drop": i}`` before
# shard i's files are replaced, ``{"index": i, "count": n, "files": {...}}`` (the manifest's shard record) once they
# are all in place. A journal whose generation is not the entry's (left by a crash between a manifest rewrite and
# the journal's reset) is ignored; so is a torn line (a crash while appending: that shard is simply pending).


def _journal_line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _parse_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _journal_generation(path: Path) -> str | None:
    """The generation in the journal's first line, None when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            head = _parse_line(f.readline())
    except OSError:
        return None
    return head.get("generation") if isinstance(head, dict) else None


def _read_journal(path: Path, generation: str) -> list[dict[str, Any]] | None:
    """The events of the journal of ``generation``; None when the file is missing or of another generation."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return None
    head = _parse_line(lines[0])
    if not isinstance(head, dict) or head.get("generation") != generation:
        return None
    events = [_parse_line(line) for line in lines[1:] if line]
    return [e for e in events if isinstance(e, dict) and (isinstance(e.get("drop"), int) or (
        isinstance(e.get("index"), int) and isinstance(e.get("count"), int) and isinstance(e.get("files"), dict)))]


def _apply_journal(entry: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """``entry["shards"]`` after the journal's events (in order: a record replaces its shard's, a drop removes it)."""
    shards = {r["index"]: r for r in entry["shards"]}
    for event in events:
        if "drop" in event:
            shards.pop(event["drop"], None)
        else:
            shards[event["index"]] = {"count": event["count"], "files": event["files"], "index": event["index"]}
    entry["shards"] = [shards[i] for i in sorted(shards)]


def _new_generation() -> str:
    return uuid.uuid4().hex


def _start_journal(path: Path, generation: str) -> None:
    """A new, empty journal of ``generation`` at ``path`` (atomically replacing any older one). Write the manifest
    that names it first: a crash in between leaves an older journal, which readers then ignore."""
    _atomic_write(path, lambda f: f.write(_journal_line({"generation": generation})))


def _append_journal(path: Path, generation: str, record: dict[str, Any]) -> bool:
    """Append ``record`` (durably) to the journal at ``path`` if it is of ``generation``; False if it is not. Reads
    the first line and writes at the end: O(1) in the number of shards. Call under the manifest lock."""
    try:
        f = open(path, "r+b")  # noqa: SIM115
    except FileNotFoundError:
        return False
    with f:
        head = _parse_line(f.readline())
        if not isinstance(head, dict) or head.get("generation") != generation:
            return False
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        torn = f.read(1) != b"\n"  # a crash while appending: start on a new line
        f.write((b"\n" if torn else b"") + _journal_line(record))
        f.flush()
        os.fsync(f.fileno())
    return True


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
