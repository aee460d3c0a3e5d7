"""Export the fused target of a checkpoint as a plain Hugging Face model folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from lightning_fuse.io import write_model_folder

log = logging.getLogger(__name__)


def load_module(ckpt: str, load_sources: bool = False):
    """A FusionModule restored from ``ckpt`` (target + selector; sources only if ``load_sources``)."""
    from lightning_fuse.module import FusionModule

    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"`--ckpt` {ckpt!r} is not a file. Pass a checkpoint written by `lightning-fuse fit`.")
    from lightning_fuse.checkpoint import load_checkpoint_file

    checkpoint = load_checkpoint_file(ckpt, map_location="cpu", weights_only=True)  # one-line error if damaged
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"`--ckpt` {ckpt!r} is not a lightning-fuse checkpoint (no hyper_parameters/state_dict).")
    hparams = dict(checkpoint["hyper_parameters"])
    cls = _module_class(hparams.pop("_class_path", None)) or FusionModule
    module = cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    module.load_sources = load_sources
    module.configure_model()
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


def export(ckpt: str, out: str, dtype: str | None = None) -> Path:
    """Write the fused target of ``ckpt`` (weights in safetensors, config, tokenizer) to the folder ``out``.

    Args:
        ckpt: checkpoint written by ``lightning-fuse fit``.
        out: output folder; loads with ``AutoModelForCausalLM.from_pretrained(out)``. Must not exist or be empty.
        dtype: cast the weights (``float32``, ``bfloat16``, ``float16``) before saving; default keeps them.
    """
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise FileExistsError(f"`--out` {out!r} exists and is not empty. Choose a new folder.")
    module = load_module(ckpt)
    target = module.target
    if dtype is not None:
        target = target.to(getattr(torch, dtype))
    meta = {"checkpoint": os.path.abspath(ckpt), "hparams": dict(module.hparams)}
    write_model_folder(out_path, target, module.tokenizer, {"lightning_fuse.json": meta})
    log.info("exported the fused target to %s", out_path)
    return out_path
