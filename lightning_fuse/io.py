"""Writing Hugging Face model folders atomically (export and merge)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_model_folder(out: str | Path, model: Any, tokenizer: Any | None, meta: dict[str, dict]) -> Path:
    """``save_pretrained`` of ``model`` (safetensors) and ``tokenizer`` plus JSON files ``meta`` (name -> content)
    into ``out``, built in a temp folder beside it and moved into place with ``os.replace``: an interrupted write
    leaves no half-written model. ``out`` must not exist or be empty."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in meta.items():
            (tmp / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
