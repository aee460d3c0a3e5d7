"""Checksums: of the corpus' token ids (``data_id``) and of the cache's files (written and verified), and the record
of the files verified already (``verified.json``), so that a cache is hashed once, not at every start."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_fuse.cache.format import CacheError, _atomic_write, _to_numpy

_HASH_CHUNK = 1 << 22


_FINGERPRINT_ROWS = 4096


def data_fingerprint(token_ids: torch.Tensor | np.ndarray) -> str:
    """sha256 of a corpus' token ids ([S, L], any integer dtype): the ``data_id`` to pass to the cache.

    Hashed ``_FINGERPRINT_ROWS`` rows at a time (memory bounded, however large the corpus)."""
    arr = _to_numpy(token_ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise CacheError(f"`token_ids` must be integer, got {arr.dtype}")
    h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
    if arr.ndim == 0:
        h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    for start in range(0, len(arr) if arr.ndim else 0, _FINGERPRINT_ROWS):
        h.update(np.ascontiguousarray(arr[start : start + _FINGERPRINT_ROWS], dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


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


def _file_checksum(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


VERIFIED = "verified.json"


def _read_verified(root: Path) -> dict[str, list[Any]]:
    """``{"<source>/<file>": [checksum, size, mtime_ns]}`` of the files that passed their checksum, when they did."""
    try:
        seen = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return seen if isinstance(seen, dict) else {}


def _stamp(path: Path, checksum: str) -> list[Any]:
    st = path.stat()
    return [checksum, st.st_size, st.st_mtime_ns]


def _write_verified(root: Path, seen: dict[str, list[Any]], passed: dict[str, list[Any]]) -> None:
    """Add ``passed`` to the record (atomically; a read-only cache is verified again next time)."""
    if passed == {k: v for k, v in seen.items() if k in passed}:
        return
    data = json.dumps({**seen, **passed}, sort_keys=True).encode()
    with contextlib.suppress(OSError):
        _atomic_write(root / VERIFIED, lambda fh: fh.write(data))
