"""Export the fused target of a checkpoint as a plain Hugging Face model folder."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from lightning_fuse.io import write_model_folder

log = logging.getLogger(__name__)


def resolve_checkpoint(ckpt: str, runs_dir: str = "runs") -> str:
    """``ckpt`` itself, or for ``last`` the newest complete checkpoint anywhere under ``runs_dir``."""
    if ckpt != "last":
        return ckpt
    from lightning_fuse.checkpoint import newest_checkpoint

    root = Path(runs_dir).expanduser()
    folders = {p.parent for p in root.rglob("*.ckpt")} if root.is_dir() else set()
    found = newest_checkpoint(sorted(folders))
    if found is None:
        raise FileNotFoundError(
            f"`--ckpt last`: no complete checkpoint under {str(root)!r}. Pass `--runs_dir` (the fit's "
            "--trainer.default_root_dir or logger save_dir) or the checkpoint's path."
        )
    log.info("--ckpt last: %s", found)
    return found


@contextlib.contextmanager
def _quiet_loading():
    """The target folder may hold only a config ("initialising from its config"): its weights come from the
    checkpoint here, so that loading notice would only alarm."""
    logger = logging.getLogger("lightning_fuse.sources")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_module(ckpt: str, load_sources: bool = False):
    """A FusionModule restored from ``ckpt`` (target + selector; sources only if ``load_sources``): a checkpoint
    file, or the folder of a distributed checkpoint (``ModelParallelStrategy(save_distributed_checkpoint=True)``)."""
    from lightning_fuse.checkpoint import load_checkpoint_file
    from lightning_fuse.module import FusionModule

    if os.path.isdir(ckpt):
        from lightning_fuse.dcp import check_dcp_folder, load_dcp_weights

        check_dcp_folder(ckpt)
        checkpoint = load_checkpoint_file(os.path.join(ckpt, "meta.pt"), map_location="cpu", weights_only=True)
    elif os.path.isfile(ckpt):
        checkpoint = load_checkpoint_file(ckpt, map_location="cpu", weights_only=True)  # one-line error if damaged
    else:
        raise FileNotFoundError(f"`--ckpt` {ckpt!r} is not a file or a distributed checkpoint folder. Pass a "
                                "checkpoint written by `lightning-fuse fit`.")
    if "hyper_parameters" not in checkpoint or ("state_dict" not in checkpoint and not os.path.isdir(ckpt)):
        raise ValueError(f"`--ckpt` {ckpt!r} is not a lightning-fuse checkpoint (no hyper_parameters/state_dict).")
    hparams = dict(checkpoint["hyper_parameters"])
    cls = _module_class(hparams.pop("_class_path", None)) or FusionModule
    module = cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    module.load_sources = load_sources
    with _quiet_loading() if not load_sources else contextlib.nullcontext():
        module.configure_model()
    if os.path.isdir(ckpt):
        load_dcp_weights(module, ckpt)
    else:
        module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def _module_class(class_path: str | None):
    """The (sub)class of FusionModule that LightningCLI recorded in the checkpoint, if any."""
    if not class_path:
        return None
    import importlib

    from lightning_fuse.module import FusionModule

    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    if not (isinstance(cls, type) and issubclass(cls, FusionModule)):
        raise TypeError(f"The checkpoint's model class {class_path!r} is not a FusionModule.")
    return cls


def export(ckpt: str, out: str, dtype: str | None = None, runs_dir: str = "runs") -> Path:
    """Write the fused target of ``ckpt`` (weights in safetensors, config, tokenizer) to the folder ``out``.

    Args:
        ckpt: checkpoint written by ``lightning-fuse fit`` (a file, or the folder of a distributed checkpoint
            under FSDP with ``save_distributed_checkpoint: true``), or ``last``: the newest complete checkpoint under
            ``runs_dir`` (each fit gets a new logger version, so the path changes from run to run).
        out: output folder; loads with ``AutoModelForCausalLM.from_pretrained(out)``. Must not exist or be empty.
        dtype: cast the weights (``float32``, ``bfloat16``, ``float16``) before saving; default keeps them.
        runs_dir: where ``--ckpt last`` looks (every checkpoint below it); the fit's ``default_root_dir``.
    """
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise FileExistsError(f"`--out` {out!r} exists and is not empty. Choose a new folder.")
    ckpt = resolve_checkpoint(ckpt, runs_dir)
    module = load_module(ckpt)
    target = module.target
    if dtype is not None:
        target = target.to(getattr(torch, dtype))
    meta = {"checkpoint": os.path.abspath(ckpt), "hparams": dict(module.hparams)}
    write_model_folder(out_path, target, module.tokenizer, {"lightning_fuse.json": meta})
    log.info("exported the fused target to %s", out_path)
    return out_path
