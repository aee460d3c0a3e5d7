"""Checkpoints that survive crashes: atomic writes, clear errors for damaged files, no non-finite states on disk.

``AtomicCheckpointIO`` is the Lightning ``CheckpointIO`` plugin that ``lightning-fuse fit`` uses by default
(``Trainer(plugins=[AtomicCheckpointIO()])`` with the Python API). It

- writes a checkpoint to a temporary file in the destination folder, flushes and fsyncs it, then renames it over the
  destination (``os.replace``: atomic on POSIX and Windows) and fsyncs the folder: a crash (SIGKILL, power loss,
  a full disk) leaves either the previous checkpoint or the new one, never a truncated file;
- refuses to write a checkpoint whose weights, optimizer state or callback statistics hold NaN/inf (``NonFiniteState``):
  the last checkpoint on disk is always a finite state to resume from;
- turns a truncated or corrupt checkpoint given to ``ckpt_path`` into a one-line ``CheckpointError`` that names a
  checkpoint to use instead, rather than a pickle/zip traceback.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

try:  # POSIX advisory locks: tell a killed writer's temporary file from one being written
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (truncated, corrupt, or not a checkpoint)."""


class NonFiniteState(FloatingPointError):
    """Refused to write a checkpoint holding NaN/inf values."""


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace`` onto ``path``.

    The temporary file (``.<name>.<random>.tmp``) is locked (``flock``) while it is written, so that
    :func:`remove_stale_temporaries` can tell the leftovers of a killed writer from a write in progress.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            except Exception as err:  # name the file, e.g. a full disk (torch wraps it in "enforce fail" errors)
                cause = next((e for e in _chain(err) if isinstance(e, OSError) and e.errno), None)
                if cause is None:
                    raise
                raise OSError(cause.errno, cause.strerror, path) from err
            if fcntl is not None:  # replace while still locked (POSIX allows renaming an open file)
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def remove_stale_temporaries(folders: list[str | os.PathLike]) -> list[str]:
    """Delete the ``.*.tmp`` files that a writer killed mid-write (SIGKILL, power loss) left in ``folders``.

    A temporary file is stale when no process holds its lock (every ``atomic_torch_save`` holds it until the
    rename), so a checkpoint being written right now by another process is left alone. Without ``fcntl``
    (Windows) nothing is removed. Returns the removed paths.
    """
    if fcntl is None:
        return []
    removed = []
    for folder in {Path(f) for f in folders}:
        try:
            candidates = [p for p in folder.glob(".*.tmp") if p.is_file()]
        except OSError:
            continue
        for tmp in candidates:
            try:
                with open(tmp, "rb") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer is alive
                    tmp.unlink()
            except OSError:
                continue
            removed.append(str(tmp))
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted checkpoint write: %s", len(removed),
                 ", ".join(removed))
    return removed


# Callback states whose scores are legitimately +-inf (ModelCheckpoint's kth_value, EarlyStopping's best_score).
_SCORE_CALLBACKS = ("ModelCheckpoint", "EarlyStopping")


def first_nonfinite(checkpoint: dict[str, Any]) -> str | None:
    """Where the first NaN/inf of a checkpoint's weights, optimizer states or callback states is, or None."""
    parts = {k: checkpoint[k] for k in ("state_dict", "optimizer_states") if k in checkpoint}
    callbacks = checkpoint.get("callbacks") or {}
    parts["callbacks"] = {k: v for k, v in callbacks.items() if not str(k).startswith(_SCORE_CALLBACKS)}
    return _find_nonfinite(parts, "")


def _find_nonfinite(obj: Any, where: str) -> str | None:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            if obj.is_meta or not bool(torch.isfinite(obj).all()):
                return where or "<tensor>"
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _find_nonfinite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def previous_checkpoint(path: str | os.PathLike) -> str | None:
    """The newest other ``.ckpt`` beside ``path`` that looks complete (a readable zip), or None."""
    path = Path(path)
    try:
        others = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve() and p.is_file()]
    except OSError:
        return None
    for candidate in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        if zipfile.is_zipfile(candidate):
            try:
                with zipfile.ZipFile(candidate) as z:
                    if z.testzip() is None:
                        return str(candidate)
            except (OSError, zipfile.BadZipFile):
                continue
    return None


def corrupt_checkpoint_error(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint that could not be read."""
    cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no details'}"
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    other = previous_checkpoint(path)
    hint = f": {other}" if other else f" (none found in {folder}: start again without `ckpt_path`)"
    return CheckpointError(
        f"checkpoint {os.fspath(path)} is truncated or corrupt ({cause}); use another checkpoint, "
        f"e.g. the previous one in {folder}{hint}"
    )


def checkpoint_error(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """The one-line error for ``torch.load(path)`` failing with ``err`` (raise it ``from None``)."""
    if "Weights only load failed" in str(err):
        first = next((line for line in str(err).splitlines() if "Unsupported global" in line), "")
        return CheckpointError(
            f"checkpoint {os.fspath(path)} holds Python objects that safe loading (weights_only=True) refuses"
            f"{f' ({first.strip()})' if first else ''}; load it with weights_only=False only if you trust "
            "where it comes from."
        )
    return corrupt_checkpoint_error(path, err)


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = False
) -> dict[str, Any]:
    """``torch.load`` of a Lightning checkpoint with a one-line ``CheckpointError`` if it is damaged.

    A missing file gives ``FileNotFoundError``; a file that loads but is not a dict gives ``CheckpointError``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)} does not exist. Pass a checkpoint written by a fit.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # truncated zip, pickle garbage, foreign file: one line, no pickle traceback
        raise checkpoint_error(path, err) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {os.fspath(path)} holds a {type(checkpoint).__name__}, not a checkpoint.")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, fsynced writes, a non-finite guard and clear errors for damaged files.

    Args:
        check_finite: refuse (``NonFiniteState``) to write a checkpoint whose weights, optimizer states or callback
            statistics hold NaN/inf, so that the last checkpoint on disk is always one to resume from.
    """

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__()
        self.check_finite = check_finite

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`{type(self).__name__}` does not take `storage_options`.")
        if self.check_finite:
            where = first_nonfinite(checkpoint)
            if where is not None:
                error = NonFiniteState(
                    f"refusing to write checkpoint {path}: {where} holds NaN/inf (step "
                    f"{checkpoint.get('global_step', '?')}). The previous checkpoint in {os.path.dirname(str(path))} "
                    "is the last finite state; resume from it with a lower learning rate or "
                    "`--model.on_nonfinite skip_batch`."
                )
                if sys.exc_info()[1] is not None:  # a checkpoint on exception: keep the original error in front
                    log.error("%s", error)
                    return
                raise error
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(str(path).removeprefix("file://"), map_location, weights_only)


def checkpoint_folders(trainer: Any) -> list[Path]:
    """The local folders a fit's checkpoints are in, this run's and earlier runs' (other logger versions).

    The ``ModelCheckpoint`` folders given explicitly, ``<logger root_dir>/version_*/checkpoints`` of each logger,
    ``<default_root_dir>/checkpoints`` and ``<default_root_dir>/*/version_*/checkpoints``; existing ones only.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and _is_local(callback.dirpath):
            folders.append(Path(str(callback.dirpath).removeprefix("file://")))
    for logger in trainer.loggers:
        root = getattr(logger, "root_dir", None)
        if root and _is_local(root):
            folders += Path(root).glob("version_*/checkpoints")
    if trainer.default_root_dir and _is_local(trainer.default_root_dir):
        root = Path(trainer.default_root_dir)
        folders += [root / "checkpoints", *root.glob("*/version_*/checkpoints")]
    unique: dict[Path, Path] = {}
    for folder in folders:
        if folder.is_dir():
            unique.setdefault(folder.resolve(), folder)
    return list(unique.values())


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole ``torch.save`` zip: its central directory (at the very end) reads and lists the
    pickle. Cheap (reads the directory, not the tensors); a file cut short anywhere fails it. A folder is complete
    when it is a distributed checkpoint (FSDP, ``save_distributed_checkpoint``) whose index and ``meta.pt`` exist."""
    if os.path.isdir(path):
        from lightning_fuse.dcp import is_dcp_folder

        return is_dcp_folder(path)
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def newest_checkpoint(folders: list[str | os.PathLike]) -> str | None:
    """The newest complete ``.ckpt`` (file or distributed folder) in ``folders`` (by modification time; ``last*`` first on a tie), or None.

    This is what ``--ckpt_path last`` resumes from: usually ``last.ckpt``, but a complete ``step31.ckpt`` written
    after it (the disk filled up before ``last.ckpt`` was replaced, or the process was killed while writing the
    first ``last.ckpt``) is newer, and a damaged file is skipped.
    """
    found = set()
    for folder in folders:
        try:
            found |= set(Path(folder).glob("*.ckpt"))  # files, and folders of distributed checkpoints
        except OSError:
            continue
    ranked = sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("last")), reverse=True)
    for path in ranked:
        if is_complete_checkpoint(path):
            return str(path)
        log.warning("skipping %s: it is not a complete checkpoint", path)
    return None


def find_last_checkpoint(trainer: Any) -> str | None:
    """The newest complete checkpoint of a fit, also across logger versions (``ckpt_path="last"`` looks in one only).

    A fresh process gets a new logger version (``version_<n+1>``), so Lightning's ``ckpt_path="last"`` does not see
    the checkpoints that ``ModelCheckpoint`` without ``dirpath`` wrote under the previous version; and it takes
    ``last.ckpt`` even when a newer complete ``stepN.ckpt`` exists. This looks in every :func:`checkpoint_folders`
    folder and returns :func:`newest_checkpoint`.
    """
    return newest_checkpoint(checkpoint_folders(trainer))


class UntrainedGuard(Callback):
    """Refuses to checkpoint a fit in which ``on_nonfinite: skip_batch`` skipped every training batch so far (the
    target has not trained: the checkpoint would look like progress), and warns at the end of a fit that skipped
    more than half of its batches. Counts ``FusionModule.skipped_batches`` against the batches trained."""

    def __init__(self) -> None:
        self.batches = 0
        self.skipped = 0
        self._before = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.batches = self.skipped = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = getattr(pl_module, "skipped_batches", 0)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        self.skipped += getattr(pl_module, "skipped_batches", 0) > self._before

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        skipped = self.skipped
        if self.batches and skipped >= self.batches:
            raise NonFiniteState(
                f"refusing to write a checkpoint: on_nonfinite=skip_batch skipped every training batch so far "
                f"({skipped} of {self.batches}), so the target has not trained (first: "
                f"{getattr(pl_module, 'first_skip_reason', None) or 'NaN/inf'}). Fix that cause (a broken source, "
                "a too high learning rate), or run with `--model.on_nonfinite stop` to stop at the first one."
            )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        skipped = self.skipped
        if self.batches and 2 * skipped > self.batches:
            log.warning("on_nonfinite=skip_batch skipped %d of %d training batches: the target trained on few of "
                        "them; check the first cause: %s", skipped, self.batches,
                        getattr(pl_module, "first_skip_reason", None))


class RNGState(Callback):
    """Saves the random number generators' states (torch CPU and CUDA, numpy, Python) in every checkpoint and restores
    them on resume, so that a resumed fit draws the same random numbers (dropout, ``explore``) as an uninterrupted one.

    Under DDP the checkpoint holds rank 0's states, and every rank gets them back: exact when the ranks were seeded
    alike (``seed_everything``, as LightningCLI does) and draw alike. States are plain tensors and lists (no pickle).
    """

    def state_dict(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        version, mt, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(mt), "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        n = state_dict["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = state_dict["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            states = state_dict["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
