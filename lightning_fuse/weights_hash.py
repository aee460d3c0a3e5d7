"""Content hash of a model folder's weight files, remembered by (path, size, mtime) so that it is computed once.

An offline cache records the hash of every byte of its source's weights (``model_id["weights"]``): a source
retrained or edited in place, even one layer in the middle of a file, no longer matches its cache. Hashing reads
each file once (sha256, about 1-2 GB/s); the result is kept in ``$LIGHTNING_FUSE_CACHE/weight_hashes.json``
(default ``~/.cache/lightning_fuse``) under the file's absolute path, size and modification time, so a second
``precompute`` or ``fit`` on an unchanged source costs a ``stat`` per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "LIGHTNING_FUSE_CACHE"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_CHUNK = 1 << 22
_LOG_ABOVE = 256 << 20  # say so when hashing files this large (seconds)


def hash_store() -> Path:
    """``$LIGHTNING_FUSE_CACHE/weight_hashes.json`` (default ``~/.cache/lightning_fuse/weight_hashes.json``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lightning_fuse")
    return Path(root) / "weight_hashes.json"


def _load(store: Path) -> dict[str, dict]:
    try:
        data = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(store: Path, data: dict[str, dict]) -> None:
    """Best effort (a read-only home only costs hashing again next time), atomic."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{store.name}.", suffix=".tmp", dir=store.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, store)
    except OSError as err:
        log.debug("could not save weight hashes to %s: %s", store, err)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def file_sha256(path: str | os.PathLike, store: Path | None = None) -> str:
    """sha256 of every byte of ``path``, remembered by (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    store = store or hash_store()
    data = _load(store)
    key = str(path)
    entry = data.get(key)
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    start = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if st.st_size > _LOG_ABOVE:
        log.info("hashed %s (%.1f GB) in %.1f s; remembered in %s", path, st.st_size / 1e9,
                 time.perf_counter() - start, store)
    data = _load(store)  # another process may have added entries meanwhile
    data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    _save(store, data)
    return digest


def folder_weights_hash(folder: str | os.PathLike, store: Path | None = None) -> str:
    """Hash over the names and full-content hashes of a model folder's weight files."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    for f in files:
        h.update(f"{f.name}:{file_sha256(f, store)}\n".encode())
    return "sha256:" + h.hexdigest()[:32]
