"""Writing Hugging Face model folders atomically (export and merge)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it replaces ``out`` (which must not exist or be empty) with
    ``os.replace``, on any error it is removed: an interrupted write leaves no half-written folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_folder(out: str | Path, model: Any, tokenizer: Any | None, meta: dict[str, dict]) -> Path:
    """``save_pretrained`` of ``model`` (safetensors) and ``tokenizer`` plus JSON files ``meta`` (name -> content)
    into ``out``, atomically (:func:`atomic_folder`). ``out`` must not exist or be empty."""
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in meta.items():
            (tmp / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    return Path(out)
