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
VERSION = 1
MANIFEST = "manifest.json"
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
