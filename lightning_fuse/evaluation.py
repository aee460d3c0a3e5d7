"""Per-domain evaluation tables, the selection matrix and the knowledge-interference metric (METHOD.md §7).

``FusionModule`` leaves its validation/test results in ``module.eval_results`` as flat keys
``<stage>/<domain>/<model>_<ce|ppl|acc>`` (model = ``target`` or a source name) and
``<stage>/<domain>/<source>_<share|routed>``; the functions here turn them into tables and numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def parse_results(results: Mapping[str, float], stage: str = "val") -> dict[str, dict[str, dict[str, float]]]:
    """``{domain: {model: {metric: value}}}`` from flat ``<stage>/<domain>/<model>_<metric>`` keys."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != stage:
            continue
        _, domain, name = parts
        model, _, metric = name.rpartition("_")
        table.setdefault(domain, {}).setdefault(model, {})[metric] = float(value)
    return table


def domain_losses(results: Mapping[str, float], model: str = "target", stage: str = "val") -> dict[str, float]:
    """``{domain: mean CE (nats/token)}`` of one model."""
    table = parse_results(results, stage)
    return {d: rows[model]["ce"] for d, rows in sorted(table.items()) if model in rows and "ce" in rows[model]}


def selection_matrix(results: Mapping[str, float], stage: str = "val", metric: str = "share") -> dict[str, dict[str, float]]:
    """``{domain: {source: mean fusion weight}}`` (``metric="routed"``: share of sequences whose top source it is)."""
    table = parse_results(results, stage)
    return {
        d: {m: v[metric] for m, v in rows.items() if metric in v} for d, rows in sorted(table.items())
    }


def interference(method: Mapping[str, float], oracle: Mapping[str, float]) -> float:
    """Mean over domains of ``loss_method(d) - loss_oracle(d)`` (nats/token). 0 = as good as the oracle."""
    _check_domains(method, oracle)
    return sum(method[d] - oracle[d] for d in oracle) / len(oracle)


def normalised_interference(method: Mapping[str, float], oracle: Mapping[str, float], clm: Mapping[str, float]) -> float:
    """``(L_method - L_oracle) / (L_clm - L_oracle)`` on the domain means: the share of the distillation gain lost."""
    gain = interference(clm, oracle)
    if gain <= 0:
        return math.nan  # distillation did not help at all: the ratio means nothing
    return interference(method, oracle) / gain


def reduction(value: float, reference: float) -> float:
    """Relative reduction of ``value`` vs ``reference`` in percent (positive = lower than the reference)."""
    if reference == 0:
        return math.nan
    return 100.0 * (reference - value) / abs(reference)


def _check_domains(a: Mapping[str, float], b: Mapping[str, float]) -> None:
    if not b:
        raise ValueError("Interference needs at least one domain with an oracle loss.")
    missing = sorted(set(b) - set(a))
    if missing:
        raise ValueError(f"No loss for domains {missing}; the method was evaluated on {sorted(a)}.")


def format_table(results: Mapping[str, float], stage: str = "val", routed: bool = False) -> str:
    """A per-domain text table: loss, perplexity and next-token accuracy of the target and every source, then the
    domain x source selection share. ``routed`` (``routing: before_sources``): each source ran only on the rows
    routed to it, so its columns are marked ``*`` and a note says so."""
    table = parse_results(results, stage)
    if not table:
        return "(no per-domain results)"
    models = sorted({m for rows in table.values() for m, v in rows.items() if "ce" in v}, key=lambda m: (m != "target", m))
    label = {m: (f"{m[:17]}*" if routed and m != "target" else m[:18]) for m in models}
    head = f"{'domain':<14}" + "".join(f" {label[m]:>19}" for m in models)
    lines = ["loss (nats/token) / perplexity / next-token accuracy", head]
    for domain, rows in table.items():
        cells = []
        for m in models:
            v = rows.get(m, {})
            cells.append(f"{v['ce']:.3f}/{v['ppl']:.1f}/{v.get('acc', math.nan):.2f}" if "ce" in v else "-")
        lines.append(f"{domain:<14}" + "".join(f" {c:>19}" for c in cells))
    if routed and len(models) > 1:
        lines.append("* routed mode: a source's numbers cover only the rows routed to it (- = none were)")
    shares = selection_matrix(results, stage)
    sources = sorted({s for row in shares.values() for s in row})
    if sources:
        lines += ["", "selection share (mean fusion weight)", f"{'domain':<14}" + "".join(f"{s[:12]:>14}" for s in sources)]
        for domain, row in shares.items():
            lines.append(f"{domain:<14}" + "".join(f"{row.get(s, math.nan):>14.2f}" for s in sources))
    return "\n".join(lines)


def evaluate(
    model_dir: str,
    data_dir: str,
    sources: Sequence[str] = (),
    block_size: int = 128,
    batch_size: int = 8,
    limit_batches: int | None = None,
) -> dict[str, float]:
    """Per-domain held-out loss, perplexity and accuracy of an exported model (and of sources, on the same tokens).

    Args:
        model_dir: exported model folder (``lightning-fuse export``) or any causal LM folder / hub id.
        data_dir: folder with one sub-folder per domain (``demo://corpus`` for the demo's data).
        sources: optional source folders to evaluate on the same tokens (aligned if their tokenizer differs).
        block_size: tokens per block.
        batch_size: blocks per batch.
        limit_batches: evaluate at most this many batches (None = all).
    """
    import lightning.pytorch as pl

    from lightning_fuse.data import TextDataModule
    from lightning_fuse.module import FusionModule
    from lightning_fuse.sources import SourceSpec

    specs = [SourceSpec(name=f"source{i}", path=p) for i, p in enumerate(sources)]
    module = FusionModule(target=model_dir, sources=specs, strategy="uniform" if specs else "clm", top_k=1)
    dm = TextDataModule(data_dir, block_size=block_size, batch_size=batch_size)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=limit_batches if limit_batches is not None else 1.0, accelerator="auto", devices=1,
    )
    with torch.no_grad():
        trainer.validate(module, dm, verbose=False)
    print(format_table(module.eval_results))
    return module.eval_results
