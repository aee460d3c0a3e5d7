"""Distributed checkpoints (DCP): the folder ``ModelParallelStrategy(save_distributed_checkpoint=True)`` writes.

Such a folder holds the shards of every rank (``*.distcp``, read with ``torch.distributed.checkpoint``), their index
``.metadata``, and ``meta.pt``: Lightning's ``torch.save`` of the rest of the checkpoint (hyper-parameters, loops,
callbacks). The weights are read in place into a module built from the hyper-parameters, in one process.
"""

from __future__ import annotations

import os
import warnings

from torch import nn

from lightning_fuse.checkpoint import CheckpointError


def is_dcp_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a distributed checkpoint written by Lightning."""
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, "meta.pt"))


def check_dcp_folder(path: str | os.PathLike) -> None:
    """One-line ``CheckpointError`` unless ``path`` is a distributed checkpoint folder (what is missing, what to pass)."""
    missing = [name for name in (".metadata", "meta.pt") if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise CheckpointError(
            f"`--ckpt` {os.fspath(path)!r} is a folder but not a distributed checkpoint (no {' or '.join(missing)}). "
            "Pass a .ckpt file, or the checkpoint folder a ModelParallelStrategy fit with "
            "save_distributed_checkpoint: true wrote."
        )


def load_dcp_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Read the model weights of the distributed checkpoint ``path`` into ``module`` (in place, one process).

    Every tensor of ``module.state_dict()`` must be in the checkpoint (the optimizer states in it are not read).
    """
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": module.state_dict()}
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=os.fspath(path), no_dist=True)
    except Exception as err:  # missing keys, shape mismatch, damaged shards: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"distributed checkpoint {os.fspath(path)!r} does not hold this model's weights ({first[:300]}). "
            "Pass the folder a fit of this model wrote."
        ) from None
    module.load_state_dict(state["state_dict"])
