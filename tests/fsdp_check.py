"""A callback for the 2-process FSDP fit (tests/test_distributed.py): how each rank loaded the target.

``setup`` runs before ``configure_model``: it counts every ``from_pretrained`` call per model path on this rank.
``on_fit_start`` runs after sharding, before the first step: it gathers the full target on rank 0 (a collective)
and compares it with a plain ``AutoModelForCausalLM.from_pretrained``; each rank writes ``fsdp_check_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import resource
from collections import Counter

import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM, PreTrainedModel


class FSDPLoadCheck(Callback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.calls: Counter = Counter()
        self.original = PreTrainedModel.__dict__["from_pretrained"]
        original, calls = self.original.__func__, self.calls

        def counted(cls, path, *args, **kwargs):
            calls[os.path.realpath(str(path))] += 1
            return original(cls, path, *args, **kwargs)

        PreTrainedModel.from_pretrained = classmethod(counted)

    def on_fit_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        PreTrainedModel.from_pretrained = self.original
        target = os.path.realpath(pl_module.hparams.target)
        params = list(pl_module.target.parameters())
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in params)
        result = {
            "rank": trainer.global_rank,
            "target_from_pretrained_calls": self.calls[target],
            "local_bytes": local,
            "full_bytes": sum(p.numel() * p.element_size() for p in params),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        full = get_model_state_dict(pl_module.target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.global_rank == 0:
            plain = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).state_dict()
            result["same_keys"] = sorted(plain) == sorted(full)
            result["max_abs_diff"] = max(float((plain[k] - full[k]).abs().max()) for k in plain if k in full)
        with open(f"fsdp_check_rank{trainer.global_rank}.json", "w") as f:
            json.dump(result, f)
