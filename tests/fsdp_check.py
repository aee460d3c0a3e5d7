"""A callback for the 2-process FSDP fit (tests/test_distributed.py): how each rank loaded the target.

``setup`` runs before ``configure_model``: it counts every ``from_pretrained`` call per model path on this rank.
``on_fit_start`` runs after sharding, before the first step: it gathers the full target on rank 0 (a collective)
and compares it with a plain ``AutoModelForCausalLM.from_pretrained``. Then, in the same processes and process
group, it loads each of ``fallback_targets`` (folders that cannot be streamed: a ``pytorch_model.bin``, safetensors
under other names) the way ``configure_model`` loads the target (``load_target_sharded`` with the module's own
``build_target``), counts the ``from_pretrained`` calls on each, and compares the gathered weights the same way.
Last it loads ``cut_target`` (a streamable copy of the target) one tensor per chunk and, on rank 0, cuts its
safetensors file short after the second chunk was sent, that is after rank 0 planned the load from the file's
header (as when the file is overwritten meanwhile): every rank must raise, with rank 0's error line, and reach the
barrier after it; a watchdog (``faulthandler``) ends a rank still inside after ``CUT_TIMEOUT_S`` seconds, so that
a rank left waiting in a collective fails the run instead of hanging it.
Each rank writes ``fsdp_check_rank<r>.json``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import sys
from collections import Counter

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

CUT_TIMEOUT_S = 180  # the failed load takes about a second; a rank still in it after this waits for nothing


def _bytes(model: nn.Module) -> tuple[int, int]:
    """(this rank's shards, the whole model) in bytes."""
    params = list(model.parameters())
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in params)
    return local, sum(p.numel() * p.element_size() for p in params)


def _compare(model: nn.Module, path: str, rank: int) -> dict:
    """Gather ``model`` on rank 0 (every rank takes part) and compare it with a plain ``from_pretrained`` of ``path``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    return {"same_keys": sorted(plain) == sorted(full),
            "max_abs_diff": max(float((plain[k] - full[k]).abs().max()) for k in plain if k in full)}


class FSDPLoadCheck(Callback):
    def __init__(self, fallback_targets: list[str] | None = None, cut_target: str | None = None) -> None:
        self.fallback_targets = [os.path.realpath(p) for p in fallback_targets or []]
        self.cut_target = cut_target and os.path.realpath(cut_target)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.calls: Counter = Counter()
        self.original = PreTrainedModel.__dict__["from_pretrained"]
        original, calls = self.original.__func__, self.calls

        def counted(cls, path, *args, **kwargs):
            calls[os.path.realpath(str(path))] += 1
            return original(cls, path, *args, **kwargs)

        PreTrainedModel.from_pretrained = classmethod(counted)

    def on_fit_start(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        target = os.path.realpath(pl_module.hparams.target)
        local, full = _bytes(pl_module.target)
        result = {
            "rank": rank,
            "target_from_pretrained_calls": self.calls[target],
            "source": pl_module.target_load_report.source,
            "local_bytes": local,
            "full_bytes": full,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        fallbacks = [self._load_fallback(pl_module, path) for path in self.fallback_targets]  # still counting
        if self.cut_target:
            result["cut"] = self._load_cut(pl_module, self.cut_target)
        PreTrainedModel.from_pretrained = self.original
        result.update(_compare(pl_module.target, target, rank))
        result["fallbacks"] = [
            {**info, **_compare(model, path, rank)} for path, (model, info) in zip(self.fallback_targets, fallbacks)
        ]
        with open(f"fsdp_check_rank{rank}.json", "w") as f:
            json.dump(result, f)

    def _load_fallback(self, pl_module, path: str) -> tuple[nn.Module, dict]:
        """``path`` loaded as the module's target under the fit's mesh (the module's own target is kept)."""
        from lightning_fuse.fsdp_load import fsdp_mesh, load_target_sharded

        kept = pl_module.hparams.target, pl_module.target_load_report
        pl_module.hparams.target = path
        try:
            model = load_target_sharded(pl_module, fsdp_mesh(pl_module))
            report = pl_module.target_load_report
        finally:
            pl_module.hparams.target, pl_module.target_load_report = kept
        local, full = _bytes(model)
        return model, {
            "path": path, "source": report.source, "from_pretrained_calls": self.calls[path],
            "held_full_copy": report.held_full_copy, "largest_chunk_bytes": report.largest_chunk_bytes,
            "local_bytes": local, "full_bytes": full,
        }

    def _load_cut(self, pl_module, path: str) -> dict:
        """Load ``path`` one tensor per chunk; rank 0 cuts its file short before reading the third chunk."""
        import torch.distributed as dist

        from lightning_fuse import fsdp_load
        from lightning_fuse.errors import error_line

        file = os.path.join(path, "model.safetensors")
        read, sent = fsdp_load._file_tensors, []

        def read_then_cut(files, names, dtype):
            if len(sent) == 2:
                with open(file, "r+b") as f:
                    f.truncate(os.path.getsize(file) // 2)
            sent.append(names)
            return read(files, names, dtype)

        patched = {"default_chunk_bytes": lambda full_bytes: 1, "_file_tensors": read_then_cut}
        kept = {name: getattr(fsdp_load, name) for name in patched}
        kept_target = pl_module.hparams.target, pl_module.target_load_report
        for name, value in patched.items():
            setattr(fsdp_load, name, value)
        pl_module.hparams.target = path
        faulthandler.dump_traceback_later(CUT_TIMEOUT_S, exit=True, file=sys.stderr)
        error = None
        try:
            fsdp_load.load_target_sharded(pl_module, fsdp_load.fsdp_mesh(pl_module))
        except Exception as err:
            error = error_line(err)
        finally:
            for name, value in kept.items():
                setattr(fsdp_load, name, value)
            pl_module.hparams.target, pl_module.target_load_report = kept_target
        dist.barrier()  # every rank left the load at the same chunk
        faulthandler.cancel_dump_traceback_later()
        return {"error": error, "chunks_read": len(sent)}
