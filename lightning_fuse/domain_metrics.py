"""Validation / test metrics per domain: CE and next-token accuracy of the target and of every source, and each
source's selection share and routed share, as token-weighted running means (torchmetrics, synced across ranks).

``FusionModule`` makes one :class:`DomainMetrics` at the start of each validation / test epoch, updates it with the
result of every step and reads :meth:`DomainMetrics.results`: flat keys ``<stage>/<domain>/<model>_<metric>``
(``ce``, ``ppl``, ``acc``, ``share``, ``routed``), what ``lightning_fuse.evaluation`` parses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric


class DomainMetrics(nn.Module):
    def __init__(self, domains: Sequence[str], source_names: Sequence[str]) -> None:
        super().__init__()
        self.domains, self.source_names = list(domains), list(source_names)
        names = ["target", *self.source_names]
        keys = [f"{d}|{n}|{m}" for d in self.domains for n in names for m in ("ce", "acc")]
        keys += [f"{d}|{n}|{m}" for d in self.domains for n in self.source_names for m in ("share", "routed")]
        self.metrics = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.loss = MeanMetric()

    @torch.no_grad()
    def update(self, r: dict[str, Any], batch: dict[str, Tensor]) -> None:
        """One evaluation step's result (``FusionModule._step``) on ``batch``."""
        tokens = r["mask"].sum(-1).float()
        self.loss.update(r["clm"], weight=tokens.sum())
        for b in range(batch["input_ids"].shape[0]):
            d = self.domains[int(batch["domain"][b])]
            self.metrics[f"{d}|target|ce"].update(r["target_ce"][b], weight=tokens[b])
            acc = r["target_correct"][b].sum() / tokens[b].clamp_min(1)
            self.metrics[f"{d}|target|acc"].update(acc, weight=tokens[b])
            for i, name in enumerate(self.source_names if "source_ce" in r else []):
                self.metrics[f"{d}|{name}|share"].update(r["selection"].weights[b, i])
                self.metrics[f"{d}|{name}|routed"].update((r["selection"].weights[b].argmax() == i).float())
                if torch.isnan(r["source_ce"][b, i]):  # routed mode: this source did not run on this row
                    continue
                self.metrics[f"{d}|{name}|ce"].update(r["source_ce"][b, i], weight=tokens[b])
                dist = r["outputs"][i].dist  # its most likely id (dense mode keeps the ids in vocabulary order)
                top1 = dist.ids[b].gather(-1, dist.logprobs[b].argmax(-1, keepdim=True)).squeeze(-1)
                top1 = top1 == batch["labels"][b].roll(-1)
                acc = (top1 & r["mask"][b]).sum() / tokens[b].clamp_min(1)
                self.metrics[f"{d}|{name}|acc"].update(acc, weight=tokens[b])

    def results(self, stage: str, distributed: bool) -> dict[str, float]:
        """``{<stage>/<domain>/<model>_<metric>: value}`` (and ``_ppl`` beside each ``_ce``); metrics never updated
        are left out (under several processes every one is computed, as each rank must join the sync)."""
        results = {}
        for key, metric in self.metrics.items():
            if metric.update_count == 0 and not distributed:
                continue
            domain, name, kind = key.split("|")
            value = float(metric.compute())
            if math.isnan(value):
                continue
            results[f"{stage}/{domain}/{name}_{kind}"] = value
            if kind == "ce":
                results[f"{stage}/{domain}/{name}_ppl"] = math.exp(min(value, 50.0))
        return results
