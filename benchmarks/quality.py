"""Fusion quality: knowledge interference of every fusion strategy against the per-domain oracle (METHOD.md §7).

Usage: python benchmarks/quality.py            # full benchmark (default demo assets, 3 seeds)
       python benchmarks/quality.py --fast     # CI smoke run: FAST_BUILD assets, 1 seed, few steps, 4 methods
       python benchmarks/quality.py --mixed    # per-token fusion: mixed-domain blocks + pure blocks (issue 17)

World: the embedded demo's 3 real-text domains (python stdlib source, licences, Debian changelogs) and N = 8
frozen sources sharing its tokenizer: the demo's 3 specialists and its ``weak`` source, plus four built here with
the demo's own trainer and cached next to the demo assets: ``weak_s1`` (10 steps on the mixed domains, another
seed), ``general`` (a mediocre generalist: 20% of a specialist's steps on the mixed domains; close enough to the
specialists in CE that softmax_ce gives it real weight), ``c_headers`` and ``manpages`` (specialists on off-domain
machine text: /usr/include/**/*.h and /usr/share/man/man?/*.gz, half a specialist's steps).
The sources run once over the corpus (``lightning_fuse.precompute``, offline cache); every fit reads that cache.

Every method trains the same target (the demo's architecture, initialised with the seed's own init, identical
across methods) on the same batches for the same number of steps, in a distillation-heavy regime
(``clm_weight`` lambda = 0.1). ``oracle`` is one run whose fusion weights put 1 on each sample's own domain
specialist (from ``batch["domain"]``): per domain, a target distilled from the right specialist only.
Interference = mean over domains of (loss - oracle loss) on held-out text of each domain, per seed, then mean and
spread (sample std) over seeds. Two fits run in parallel (one thread each).

``--mixed`` (per-token fusion, METHOD.md §8): the training and held-out sets also hold mixed blocks, each 2-3
segments of 16-96 tokens of different domains (``benchmarks/mixed_blocks.py``); every batch knows the domain of each
token. The oracle weights each position's own segment specialist. Interference on mixed blocks is measured per
segment against that oracle: the target's loss on the tokens of each domain inside mixed blocks, minus the oracle's,
averaged over domains; on pure blocks as above. Writes quality_mixed.md / quality_mixed.png.

Writes benchmarks/results/quality.md (table) and benchmarks/results/quality.png (plot); prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # mixed_blocks (also for precompute's class_path)


# ----------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Regime:
    """What every fit shares (same steps, data, target init per seed)."""

    steps: int = 300
    batch_size: int = 16
    block_size: int = 128
    max_blocks_per_domain: int = 1000
    clm_weight: float = 0.1
    learning_rate: float = 2e-3
    selector_learning_rate: float = 1e-3
    warmup_steps: int = 20
    distill_top_k: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    mixed_train_blocks: int = 0  # --mixed: mixed-domain blocks added to the training set
    mixed_val_blocks: int = 0  # --mixed: mixed-domain held-out blocks


FAST_REGIME = Regime(steps=30, batch_size=8, block_size=64, max_blocks_per_domain=120, seeds=(0,))
MIXED_FULL = {"mixed_train_blocks": 400, "mixed_val_blocks": 64}  # + the pure blocks
MIXED_FAST = {"mixed_train_blocks": 60, "mixed_val_blocks": 16}

# name -> (FusionModule kwargs, SelectionFeedback kwargs or None)
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "clm": ({"strategy": "clm"}, None),
    "uniform": ({"strategy": "uniform"}, None),
    "min_ce": ({"strategy": "min_ce"}, None),
    "avg_ce": ({"strategy": "avg_ce"}, None),
    "softmax_ce": ({"strategy": "softmax_ce"}, None),
    "adaptive k1 b0 (no prior)": ({"strategy": "adaptive", "top_k": 1, "selector_prior": False}, {"beta": 0.0}),
    "adaptive k1 b0": ({"strategy": "adaptive", "top_k": 1}, {"beta": 0.0}),
    "adaptive k2 b0": ({"strategy": "adaptive", "top_k": 2}, {"beta": 0.0}),
    "adaptive k2 cv2": ({"strategy": "adaptive", "top_k": 2}, {"beta": 0.1, "mode": "cv2"}),
    "adaptive k2 hinge": ({"strategy": "adaptive", "top_k": 2}, {"beta": 0.1, "mode": "hinge", "floor": 0.02}),
    "adaptive k2 b0 (both)": ({"strategy": "adaptive", "top_k": 2, "selector_features": "both"}, {"beta": 0.0}),
    "adaptive k2 b0 (hidden)": ({"strategy": "adaptive", "top_k": 2, "selector_features": "hidden"}, {"beta": 0.0}),
    "oracle": ({"strategy": "uniform", "oracle": True}, None),
}
FAST_METHODS = ("clm", "uniform", "adaptive k1 b0", "oracle")
# --mixed: per-sequence vs per-token rows (selection: token, lightning_fuse/token_fusion.py)
MIXED_METHODS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "min_ce": METHODS["min_ce"],
    "avg_ce": METHODS["avg_ce"],
    "adaptive k2 b0": METHODS["adaptive k2 b0"],
    "token min_ce": ({"strategy": "min_ce", "selection": "token"}, None),
    "token adaptive k3": ({"strategy": "adaptive", "top_k": 3, "selection": "token", "token_features": "both"},
                          {"beta": 0.0}),
    "token adaptive k3 (routed)": ({"strategy": "adaptive", "top_k": 3, "selection": "token", "token_features": "both",
                                    "routing": "before_sources", "selector_features": "hidden"}, {"beta": 0.0}),
    "oracle": METHODS["oracle"],
}
MIXED_EXTRA: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "adaptive k3 b0": ({"strategy": "adaptive", "top_k": 3}, {"beta": 0.0}),
    "adaptive k2 b0 (rel 0.5)": ({"strategy": "adaptive", "top_k": 2, "relative_threshold": 0.5}, {"beta": 0.0}),
    "adaptive (library defaults)": ({"strategy": "adaptive", "library_defaults": True}, None),
    "oracle (library defaults)": ({"strategy": "uniform", "oracle": True, "library_defaults": True}, None),
    "min_ce (library defaults)": ({"strategy": "min_ce", "library_defaults": True}, None),
    "token adaptive k3 (rel 0.5)": ({"strategy": "adaptive", "top_k": 3, "selection": "token", "token_features": "both",
                                     "relative_threshold": 0.5}, {"beta": 0.0}),
    "token avg_ce": ({"strategy": "avg_ce", "selection": "token"}, None),
    "token min_ce (window 5)": ({"strategy": "min_ce", "selection": "token", "token_window": 5}, None),
    "token adaptive k2": ({"strategy": "adaptive", "top_k": 2, "selection": "token", "token_features": "both"},
                          {"beta": 0.0}),
    "token adaptive k3 (hidden)": ({"strategy": "adaptive", "top_k": 3, "selection": "token",
                                    "token_features": "hidden"}, {"beta": 0.0}),
}
# opt-in rows (``--methods``), not in the default run
EXTRA_METHODS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "adaptive thr0.3 b0": ({"strategy": "adaptive", "threshold": 0.3}, {"beta": 0.0}),
    "adaptive k2 b0 (T = 2)": ({"strategy": "adaptive", "top_k": 2, "temperature": 2.0}, {"beta": 0.0}),
    "oracle (T = 2)": ({"strategy": "uniform", "oracle": True, "temperature": 2.0}, None),
    "adaptive k1 b0 (no prior, warm-up 100)": (
        {"strategy": "adaptive", "top_k": 1, "selector_prior": False, "selector_warmup_steps": 100}, {"beta": 0.0}),
    "adaptive k2 b0 (hidden, warm-up 100)": (
        {"strategy": "adaptive", "top_k": 2, "selector_features": "hidden", "selector_warmup_steps": 100},
        {"beta": 0.0}),
}
ALL_METHODS = {**METHODS, **EXTRA_METHODS, **MIXED_METHODS, **MIXED_EXTRA}


# ----------------------------------------------------------------------------------------------------------
# Assets: the demo build plus three extra sources, and the offline cache of every source's outputs


def _off_domain_files(name: str) -> list[Path]:
    if name == "c_headers":
        return sorted(p for p in Path("/usr/include").rglob("*.h") if p.is_file())
    if name == "manpages":
        return sorted(p for p in Path("/usr/share/man").glob("man[1-8]/*.gz") if p.is_file())
    raise ValueError(name)


EXTRA_SOURCES = {  # name -> (kind, steps as a share of the demo's specialist steps (None: weak_steps), seed offset)
    "weak_s1": ("mixed", None, 1),
    "general": ("mixed", 0.2, 4),
    "c_headers": ("off_domain", 0.5, 2),
    "manpages": ("off_domain", 0.5, 3),
}


def _build_extra_source(name: str, root: Path, out_root: Path, settings: Any) -> None:
    """One extra source, built with the demo's own trainer (same architecture and tokenizer) and cached."""
    from lightning_fuse import demo

    out = out_root / name
    if out.is_dir():
        return
    kind, share, seed_offset = EXTRA_SOURCES[name]
    tokenizer = demo._load_tokenizer(root / "tokenizer")
    tokens = {d: {"val": demo._encode(tokenizer, (root / "corpus" / d / "val.txt").read_text("utf-8"))}
              for d in settings.domains}
    if kind == "mixed":
        for d in settings.domains:
            tokens[d]["train"] = demo._encode(tokenizer, (root / "corpus" / d / "train.txt").read_text("utf-8"))
        steps = settings.weak_steps if share is None else max(1, int(settings.steps * share))
        s = dataclasses.replace(settings, weak_steps=steps, seed=settings.seed + 100 * seed_offset)
        build_name = demo.WEAK  # the demo's builder trains its `weak` source on the mixed domains
    else:
        docs, used = [], 0
        for path in _off_domain_files(name):
            if used >= settings.byte_budget:
                break
            data = demo._read_head(path, min(settings.max_file_bytes, settings.byte_budget - used))
            if data.strip():
                docs.append(data.decode("utf-8", errors="replace"))
                used += len(data)
        tokens[name] = {"train": demo._encode(tokenizer, "\n\n".join(docs))}
        s = dataclasses.replace(settings, steps=max(1, int(settings.steps * share)),
                                seed=settings.seed + 100 * seed_offset)
        build_name = name
    out_root.mkdir(parents=True, exist_ok=True)
    with demo._atomic_dir(out_root, out) as tmp:
        demo._build_source(build_name, 0, tokenizer, tokens, tmp, s)
        meta = json.loads((tmp / demo.META_FILE).read_text())
        (tmp / demo.META_FILE).write_text(json.dumps({**meta, "name": name, "kind": kind}, indent=2))


def prepare(fast: bool, regime: Regime) -> dict[str, Any]:
    """Build (or find) the demo assets, the extra sources and the offline cache; return their paths."""
    from lightning_fuse import demo

    kwargs = demo.FAST_BUILD if fast else {}
    t0 = time.perf_counter()
    root = demo.build_demo_assets(**kwargs)
    settings = demo.DemoSettings(**kwargs)
    extra_digest = hashlib.sha256(json.dumps([settings.digest(), EXTRA_SOURCES], sort_keys=True).encode()).hexdigest()[:10]
    bench_root = root.parent / f"quality-{extra_digest}"
    for name in EXTRA_SOURCES:
        _build_extra_source(name, root, bench_root / "sources", settings)
    sources = [{"name": n, "path": str(root / "sources" / n)} for n in settings.source_names]
    sources += [{"name": n, "path": str(bench_root / "sources" / n)} for n in EXTRA_SOURCES]
    return cache_sources(root, bench_root, sources, regime, "FAST_BUILD" if fast else "default", t0)


def prepare_machine(fast: bool, regime: Regime) -> dict[str, Any]:
    """The second world (``benchmarks/machine_world.py``): its assets and the offline cache of its 6 sources."""
    import machine_world

    t0 = time.perf_counter()
    root, sources = machine_world.build(fast)
    bench_root = root / "extra"
    assets = cache_sources(root, bench_root, sources, regime, ("FAST_BUILD" if fast else "default") + " machine world",
                           t0)
    return {**assets, "describe": machine_world.describe(sources)}


def cache_sources(root: Path, bench_root: Path, sources: list[dict[str, str]], regime: Regime, label: str,
                  t0: float) -> dict[str, Any]:
    """Run every source once over the corpus's blocks into an offline cache (what is missing); return the paths."""
    from lightning_fuse import demo

    data = {"data_dir": str(root / "corpus"), "block_size": regime.block_size, "batch_size": regime.batch_size,
            "max_blocks_per_domain": regime.max_blocks_per_domain}
    cache_dir = bench_root / f"cache-{regime.block_size}-{regime.max_blocks_per_domain}-{regime.distill_top_k}"
    data_class = "lightning_fuse.offline.CachedTextDataModule"
    if regime.mixed_val_blocks or regime.mixed_train_blocks:
        data.update(mixed_train_blocks=regime.mixed_train_blocks, mixed_val_blocks=regime.mixed_val_blocks)
        cache_dir = cache_dir.with_name(f"{cache_dir.name}-mixed-{regime.mixed_train_blocks}-{regime.mixed_val_blocks}")
        data_class = "mixed_blocks.MixedCachedDataModule"
    config = {
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": str(root / "target"), "sources": sources, "offline": True, "strategy": "uniform",
            "distill_top_k": regime.distill_top_k}},
        "data": {"class_path": data_class, "init_args": {**data, "cache_dir": str(cache_dir)}},
    }
    config_file = bench_root / f"precompute-{cache_dir.name}.yaml"
    config_file.write_text(json.dumps(config, indent=1))  # JSON is YAML
    from lightning_fuse.cache import CacheMismatchError
    from lightning_fuse.precompute import precompute

    os.environ.setdefault("TQDM_DISABLE", "1")  # precompute's progress bars
    with contextlib.redirect_stdout(io.StringIO()):  # checks the cache against the blocks; runs what is missing
        try:
            precompute(str(config_file), max_tokens_per_batch=16 * regime.block_size, device="cpu")
        except CacheMismatchError:  # built for other blocks (e.g. the corpus or the packing changed): rebuild
            precompute(str(config_file), max_tokens_per_batch=16 * regime.block_size, device="cpu",
                       overwrite=True)
    matrix = {}
    for s in sources:
        meta = json.loads((Path(s["path"]) / demo.META_FILE).read_text())
        matrix[s["name"]] = meta["val_loss"]
    return {"root": str(root), "bench_root": str(bench_root), "sources": sources, "data": data,
            "cache_dir": str(cache_dir), "demo": label, "prepare_s": time.perf_counter() - t0,
            "build_loss_matrix": matrix}


# ----------------------------------------------------------------------------------------------------------
# One fit (runs in a worker process)


def _module_class():
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_fuse import FusionModule
    from lightning_fuse.selector import Selection

    class QualityFusion(FusionModule):
        """FusionModule with a per-seed target init, an ``oracle`` mode, a cosine schedule and target-only clipping.

        ``oracle``: the weights put 1 on each sample's own domain specialist (``batch["domain"]``), so that every
        domain is distilled from its right specialist only: one run stands for the D per-domain oracles.
        """

        def __init__(self, init_seed: int = 0, oracle: bool = False, library_defaults: bool = False,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.init_seed = init_seed
            self.oracle = oracle
            self.library_defaults = library_defaults  # FusionModule's own schedule (constant) and no clipping

        def configure_optimizers(self) -> Any:
            """AdamW as FusionModule's, with linear warm-up then cosine decay to 10% (as the demo's sources): the
            final loss is read at a small learning rate, which makes it less noisy than at a constant one."""
            config = super().configure_optimizers()
            if self.library_defaults:
                return config
            warmup, total = max(1, self.hparams.warmup_steps), max(2, self.trainer.max_steps)

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

            scheduler = torch.optim.lr_scheduler.LambdaLR(config["optimizer"], factor)
            return {"optimizer": config["optimizer"], "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            """Clip the target's gradient norm to 1 (not the selector's: every method's target steps alike)."""
            if self.library_defaults:
                return
            torch.nn.utils.clip_grad_norm_(self.target.parameters(), 1.0)

        def build_target(self) -> torch.nn.Module:
            with torch.random.fork_rng():
                torch.manual_seed(10_000 + self.init_seed)
                return AutoModelForCausalLM.from_config(self.target_config)

        def run_sources(self, batch, rows=None):
            self._batch_domain = batch["domain"]
            self._batch_segments = batch.get("segments")  # --mixed: the domain of every token
            return super().run_sources(batch, rows)

        def fusion_weights(self, outputs, features):
            if self.hparams.strategy == "clm":  # evaluation of clm with sources: FusionModule raises (see report)
                w = torch.full((len(outputs[0].ce), len(outputs)), 1.0 / len(outputs), device=outputs[0].ce.device)
                return Selection(w, w > 0, w)
            if not self.oracle:
                return super().fusion_weights(outputs, features)
            domains = [d for d in self.trainer.datamodule.domains if d in self.source_names]  # not `mixed`
            column = torch.tensor([self.source_names.index(d) for d in domains], device=self._batch_domain.device)
            n = len(self.source_names)
            if self._batch_segments is None:
                w = torch.nn.functional.one_hot(column[self._batch_domain], n).float()
                return Selection(w, w > 0, w)
            nxt = self._batch_segments.clone()  # position t predicts token t + 1: its segment's specialist teaches
            nxt[:, :-1] = self._batch_segments[:, 1:]
            tw = torch.nn.functional.one_hot(column[nxt], n).float()
            w = tw.mean(1)
            return Selection(w, w > 0, w, token_weights=tw)

    return QualityFusion


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Fit one (method, seed) and return its per-domain validation results."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    from transformers.utils import logging as hf_logging

    from lightning_fuse import SelectionFeedback
    from lightning_fuse.offline import CachedTextDataModule

    for name in ("lightning", "lightning.pytorch", "lightning_fuse"):  # after the imports, which set their levels
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()

    t0 = time.perf_counter()
    r: Regime = Regime(**job["regime"])
    module_kwargs, feedback = job["module"], job["feedback"]
    pl.seed_everything(job["seed"], verbose=False)
    bench = {"selector_features": "rewards", "selector_learning_rate": r.selector_learning_rate}
    if module_kwargs.get("library_defaults"):  # FusionModule's defaults for everything the user did not set
        bench = {}
    module = _module_class()(
        init_seed=job["seed"], target=str(Path(job["root"]) / "target"), sources=job["sources"], offline=True,
        **{**bench, "clm_weight": r.clm_weight, "learning_rate": r.learning_rate, "warmup_steps": r.warmup_steps,
           "distill_top_k": r.distill_top_k, **module_kwargs},
    )
    if "mixed_val_blocks" in job["data"]:
        from mixed_blocks import MixedCachedDataModule as CachedTextDataModule  # noqa: N814
    dm = CachedTextDataModule(**job["data"], cache_dir=job["cache_dir"], seed=job["seed"], verify=False)
    callbacks = [SelectionFeedback(**feedback)] if feedback is not None else []
    trainer = pl.Trainer(
        max_steps=r.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, dm)
    fit_s = time.perf_counter() - t0
    trainer.limit_val_batches = 1.0
    with contextlib.redirect_stdout(io.StringIO()):  # FusionModule prints its per-domain table on validate
        trainer.validate(module, dm, verbose=False)
    results = dict(module.eval_results)
    if "mixed_val_blocks" in job["data"]:
        results.update(segment_results(module, dm))
    return {"method": job["method"], "seed": job["seed"], "results": results,
            "fit_s": fit_s, "seconds": time.perf_counter() - t0}


def segment_results(module: Any, dm: Any, batch_size: int = 16) -> dict[str, float]:
    """On the held-out mixed blocks, per domain of the predicted token: the target's loss
    (``seg/<domain>/target_ce``) and each source's mean fusion weight there (``seg/<domain>/<source>_share``: the
    per-token weight with ``selection: token``, the row's weight per sequence)."""
    import torch
    from torch.utils.data import default_collate

    ds = dm.val_set
    base = getattr(ds, "base", ds)
    mixed = len(dm.pure_domains)
    rows = (base.domains == mixed).nonzero().squeeze(-1).tolist()
    d_count, n = len(dm.pure_domains), len(module.source_names)
    loss_sum, count = torch.zeros(d_count, dtype=torch.float64), torch.zeros(d_count, dtype=torch.float64)
    share = torch.zeros(d_count, n, dtype=torch.float64)
    module.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = default_collate(ds.__getitems__(rows[i : i + batch_size]))
            r = module._step(batch, "val")
            ids = batch["input_ids"]
            logits = module.target(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()
            nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            seg = batch["segments"][:, 1:]
            sel = r.get("selection")
            if sel is not None:
                w = sel.token_weights if sel.token_weights is not None else sel.weights[:, None].expand(-1, ids.shape[1], -1)
                w = w[:, :-1].double()
            for d in range(d_count):
                at = seg == d
                loss_sum[d] += nll[at].double().sum()
                count[d] += at.sum()
                if sel is not None:
                    share[d] += w[at].sum(0)
    out = {}
    for d, name in enumerate(dm.pure_domains):
        if count[d] > 0:
            out[f"seg/{name}/target_ce"] = float(loss_sum[d] / count[d])
            for k, source in enumerate(module.source_names):
                out[f"seg/{name}/{source}_share"] = float(share[d, k] / count[d])
    return out


def split_mixed(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(pure, mixed)`` copies of the runs whose results hold the pure blocks' and the mixed blocks' per-segment
    numbers under the usual ``val/<domain>/...`` keys, so that ``aggregate`` reads either."""
    pure, mixed = [], []
    for r in runs:
        res = r["results"]
        pure.append({**r, "results": {k: v for k, v in res.items() if not k.startswith(("seg/", "val/mixed/"))}})
        mixed.append({**r, "results": {"val/" + k.removeprefix("seg/"): v for k, v in res.items() if k.startswith("seg/")}})
    return pure, mixed


# ----------------------------------------------------------------------------------------------------------
# Aggregation, table, plot


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]], methods: list[str], source_names: list[str]) -> dict[str, Any]:
    """Per method: per-domain loss, mean loss, interference (+ normalised, + reductions) as mean/std over seeds."""
    from lightning_fuse.evaluation import domain_losses, interference, normalised_interference, reduction

    by = {(r["method"], r["seed"]): r["results"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    domains = sorted(domain_losses(runs[0]["results"]))
    rows: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, dict[int, dict[str, float]]] = {}
    for m in methods:
        per_seed[m] = {}
        for s in seeds:
            if (m, s) not in by or ("oracle", s) not in by:
                continue
            loss = domain_losses(by[(m, s)])
            oracle = domain_losses(by[("oracle", s)])
            v = {f"loss/{d}": loss[d] for d in domains}
            v["mean"] = statistics.fmean(loss.values())
            v["interference"] = interference(loss, oracle)
            if ("clm", s) in by:
                v["normalised_seed"] = normalised_interference(loss, oracle, domain_losses(by[("clm", s)]))
            per_seed[m][s] = v
    for m in methods:
        keys = sorted({k for v in per_seed[m].values() for k in v})
        rows[m] = {k: _mean_std([v.get(k, math.nan) for v in per_seed[m].values()]) for k in keys}
        rows[m]["n"] = len(per_seed[m])
    for m in methods:  # ratios of the seed means (a mean of per-seed ratios explodes when a denominator is ~0)
        if not rows[m]["n"]:
            continue
        mean = rows[m]["interference"][0]
        if "clm" in rows and rows["clm"]["n"]:
            gain = rows["clm"]["interference"][0]
            rows[m]["normalised"] = mean / gain if gain > 0 else math.nan
        for ref in ("uniform", "avg_ce"):
            if ref in rows and rows[ref]["n"]:
                rows[m][f"vs_{ref}"] = reduction(mean, rows[ref]["interference"][0])
    sources = {}  # every single source's loss (from the cached outputs, identical across runs)
    res = runs[0]["results"]
    for name in source_names:
        loss = domain_losses(res, name)
        if loss:
            sources[name] = {**{f"loss/{d}": loss[d] for d in domains}, "mean": statistics.fmean(loss.values())}
    shares = {}
    for m in methods:
        if any(f"val/{d}/{source_names[0]}_share" in by.get((m, seeds[0]), {}) for d in domains):
            shares[m] = {d: {n: statistics.fmean(by[(m, s)].get(f"val/{d}/{n}_share", math.nan) for s in seeds
                                                 if (m, s) in by) for n in source_names} for d in domains}
    return {"rows": rows, "per_seed": per_seed, "domains": domains, "seeds": seeds, "sources": sources,
            "shares": shares}


def _cell(ms: tuple[float, float], fmt: str = ".3f") -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    return f"{m:{fmt}} ± {s:{fmt}}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:{fmt}}"


def format_table(agg: dict[str, Any], methods: list[str]) -> str:
    domains = agg["domains"]
    head = ["method", *[f"{d} loss" for d in domains], "mean loss", "interference", "normalised",
            "% red. vs uniform", "% red. vs avg_ce"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = agg["rows"].get(m)
        if not row or not row["n"]:
            continue
        cells = [m, *[_cell(row[f"loss/{d}"]) for d in domains], _cell(row["mean"]), _cell(row["interference"]),
                 _num(row.get("normalised"), ".2f"), _num(row.get("vs_uniform"), ".0f"),
                 _num(row.get("vs_avg_ce"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    for name, v in agg["sources"].items():
        cells = [f"source `{name}`", *[f"{v[f'loss/{d}']:.3f}" for d in domains], f"{v['mean']:.3f}", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def significance(agg: dict[str, Any], pairs: list[tuple[str, str]]) -> list[str]:
    """For each pair (a, b): the interference difference, and whether it exceeds twice the seed spread.

    The spread of a difference is the sample std over seeds of the per-seed differences (paired: same seed, same
    init, same batches), and, conservatively, also the larger of the two methods' own std.
    """
    out = []
    ps = agg["per_seed"]
    for a, b in pairs:
        common = sorted(set(ps.get(a, {})) & set(ps.get(b, {})))
        if not common:
            continue
        diffs = [ps[a][s]["interference"] - ps[b][s]["interference"] for s in common]
        mean, paired = _mean_std(diffs)
        own = max(agg["rows"][a]["interference"][1], agg["rows"][b]["interference"][1])
        spread = max(paired, own)
        verdict = "yes" if len(common) > 1 and abs(mean) > 2 * spread else "no"
        out.append(f"| {a} − {b} | {mean:+.3f} | {paired:.3f} | {own:.3f} | {verdict} |")
    return ["| difference of interference | mean | paired std | max own std | > 2 × spread |", "|---|---|---|---|---|",
            *out]


def plot(agg: dict[str, Any], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in methods if agg["rows"].get(m, {}).get("n")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    means = [agg["rows"][m]["interference"][0] for m in rows]
    stds = [agg["rows"][m]["interference"][1] for m in rows]
    colors = ["#888" if m in ("clm", "oracle") else "#d62728" if m in ("uniform", "avg_ce", "softmax_ce", "min_ce") else "#1f77b4"
              for m in rows]
    ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
    for i, s in enumerate(agg["seeds"]):
        ys = [agg["per_seed"][m].get(s, {}).get("interference", math.nan) for m in rows]
        ax.scatter([x + 0.12 * (i - 1) for x in range(len(rows))], ys, s=8, color="k", zorder=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(rows)), rows, rotation=35, ha="right")
    ax.set_ylabel("interference (nats/token vs oracle)")
    ax.set_title(f"Knowledge interference, mean ± std over {len(agg['seeds'])} seed(s)")
    ax = axes[1]
    domains = agg["domains"]
    width = 0.8 / max(1, len(rows))
    for j, m in enumerate(rows):
        ys = [agg["rows"][m][f"loss/{d}"][0] for d in domains]
        es = [agg["rows"][m][f"loss/{d}"][1] for d in domains]
        ax.bar([i + j * width for i in range(len(domains))], ys, width, yerr=es, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Per-domain loss of the fused target")
    ax.legend(fontsize=7, ncol=2)
    lo = min(agg["rows"][m][f"loss/{d}"][0] for m in rows for d in domains)
    hi = max(agg["rows"][m][f"loss/{d}"][0] for m in rows for d in domains)
    ax.set_ylim(max(0.0, lo - 0.3), hi + 0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="CI smoke run: FAST_BUILD assets, 1 seed, few steps")
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(ALL_METHODS)}")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max_blocks_per_domain", type=int, default=None, help="pure training blocks per domain")
    parser.add_argument("--clm_weight", type=float, default=None, help="lambda (default 0.1)")
    parser.add_argument("--workers", type=int, default=2, help="fits run in parallel (one thread each)")
    parser.add_argument("--fast_assets", action="store_true",
                        help="use the FAST_BUILD demo assets (weaker specialists, built in minutes) with the full regime")
    parser.add_argument("--mixed", action="store_true",
                        help="per-token fusion benchmark: mixed-domain blocks plus pure blocks (quality_mixed.md)")
    parser.add_argument("--world", choices=("demo", "machine"), default="demo",
                        help="demo: the demo's 3 domains, N = 8; machine: benchmarks/machine_world.py (4 other "
                             "machine-text domains, N = 6)")
    parser.add_argument("--add_to", type=Path, default=None,
                        help="a runs-*.json of an earlier run with the same regime and world: only the (method, seed) "
                             "fits it lacks run, the table covers both")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for quality.md / quality.png (default benchmarks/results; --fast: a temp folder)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    regime = FAST_REGIME if args.fast else Regime()
    if args.mixed:
        regime = dataclasses.replace(regime, **(MIXED_FAST if args.fast else MIXED_FULL))
    if args.steps is not None:
        regime = dataclasses.replace(regime, steps=args.steps)
    if args.max_blocks_per_domain is not None:
        regime = dataclasses.replace(regime, max_blocks_per_domain=args.max_blocks_per_domain)
    if args.seeds:
        regime = dataclasses.replace(regime, seeds=tuple(args.seeds))
    if args.clm_weight is not None:
        regime = dataclasses.replace(regime, clm_weight=args.clm_weight)
    methods = list(args.methods or (MIXED_METHODS if args.mixed else FAST_METHODS if args.fast else METHODS))
    for m in ("oracle",) if args.mixed else ("oracle", "clm"):
        if m not in methods:
            methods.append(m)  # interference needs the oracle, normalised interference the clm run
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    methods = [m for m in ALL_METHODS if m in methods]

    assets = (prepare_machine if args.world == "machine" else prepare)(args.fast or args.fast_assets, regime)
    earlier: list[dict[str, Any]] = []
    if args.add_to is not None:
        saved = json.loads(args.add_to.read_text())
        ours = json.loads(json.dumps(dataclasses.asdict(regime)))
        if {k: v for k, v in saved["regime"].items() if k != "seeds"} != {k: v for k, v in ours.items() if k != "seeds"}:
            parser.error(f"--add_to {args.add_to}: its regime {saved['regime']} is not this run's")
        # more seeds may be added: the run then covers the union of both runs' seeds
        regime = dataclasses.replace(regime, seeds=tuple(sorted({*saved["regime"]["seeds"], *regime.seeds})))
        methods = [m for m in ALL_METHODS if m in methods or any(r["method"] == m for r in saved["runs"])]
        earlier = [r for r in saved["runs"] if r["method"] in methods]
    print(f"assets ready in {assets['prepare_s']:.0f}s ({assets['demo']} demo build at {assets['root']}; "
          f"extra sources in {assets['bench_root']})", flush=True)
    jobs = []
    done = {(r["method"], r["seed"]) for r in earlier}
    for seed in regime.seeds:
        for m in methods:
            if (m, seed) in done:
                continue
            module, feedback = ALL_METHODS[m]
            jobs.append({"method": m, "seed": seed, "module": module, "feedback": feedback,
                         "regime": dataclasses.asdict(regime), "root": assets["root"], "sources": assets["sources"],
                         "data": assets["data"], "cache_dir": assets["cache_dir"]})
    jobs.sort(key=lambda j: (j["module"]["strategy"] != "adaptive", j["seed"]))  # slowest first
    runs = []
    ctx = mp.get_context("spawn")
    partial = Path(assets["bench_root"]) / f"runs-partial-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with ctx.Pool(max(1, args.workers), maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(run_one, jobs):
            runs.append(r)  # every finished fit is kept: a stopped run resumes with --add_to <this file>
            partial.write_text(json.dumps({"regime": dataclasses.asdict(regime), "runs": earlier + runs}, indent=1))
            print(f"  [{len(runs):>2}/{len(jobs)}] {r['method']:<18} seed {r['seed']}  {r['seconds']:5.0f}s  "
                  f"val loss {statistics.fmean(v for k, v in r['results'].items() if k.endswith('/target_ce')):.3f}",
                  flush=True)
    runs = earlier + runs
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (Path(assets["bench_root"]) / f"runs-{stamp}.json").write_text(json.dumps({"regime": dataclasses.asdict(regime),
                                                                             "runs": runs}, indent=1))
    source_names = [s["name"] for s in assets["sources"]]
    wall = time.perf_counter() - t0
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    out = args.out or (Path(tempfile.gettempdir()) / "lightning_fuse_quality_fast" if args.fast else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    if args.mixed:
        pure_runs, mixed_runs = split_mixed(runs)
        agg_pure, agg_mixed = aggregate(pure_runs, methods, source_names), aggregate(mixed_runs, methods, source_names)
        md = render_mixed(agg_pure, agg_mixed, methods, regime, assets, wall, runs, args.fast, command)
        print(md)
        (out / "quality_mixed.md").write_text(md + "\n")
        plot_mixed(agg_pure, agg_mixed, methods, out / "quality_mixed.png")
        print(f"wrote {out / 'quality_mixed.md'} and {out / 'quality_mixed.png'} (wall time {wall / 60:.1f} min)")
        return 0
    agg = aggregate(runs, methods, source_names)
    md = render(agg, methods, regime, assets, wall, runs, args.fast, command)
    print(md)
    (out / "quality.md").write_text(md + "\n")
    plot(agg, methods, out / "quality.png")
    print(f"wrote {out / 'quality.md'} and {out / 'quality.png'} (wall time {wall / 60:.1f} min)")
    return 0


def _pairs(methods: list[str]) -> list[tuple[str, str]]:
    adaptive = [m for m in methods if m.startswith("adaptive")]
    pairs = [(m, o) for m in adaptive for o in ("min_ce", "avg_ce", "uniform")]
    pairs += [(m, "softmax_ce") for m in adaptive]
    pairs += [("min_ce", "uniform"), ("avg_ce", "uniform"), ("min_ce", "avg_ce"), ("uniform", "clm")]
    pairs += [("softmax_ce", "avg_ce"), ("min_ce", "softmax_ce"), ("adaptive k2 b0 (T = 2)", "adaptive k2 b0"),
              ("oracle (T = 2)", "oracle")]
    pairs += [("adaptive k1 b0 (no prior)", "adaptive k1 b0"), ("adaptive k2 b0", "adaptive k1 b0"),
              ("adaptive k2 cv2", "adaptive k2 b0"), ("adaptive k2 hinge", "adaptive k2 b0"),
              ("adaptive k2 b0 (both)", "adaptive k2 b0"), ("adaptive k2 b0 (hidden)", "adaptive k2 b0")]
    return [(a, b) for a, b in pairs if a in methods and b in methods]


def goals(agg: dict[str, Any], method: str) -> list[str]:
    """The issue's targets for one adaptive configuration, checked on the seed means."""
    rows, out = agg["rows"], []
    if method not in rows or not rows[method]["n"]:
        return out
    r = rows[method]
    inter = r["interference"][0]
    if "min_ce" in rows and rows["min_ce"]["n"]:
        ref = rows["min_ce"]["interference"][0]
        out.append(f"- interference no higher than min_ce's: {inter:+.3f} vs {ref:+.3f}: "
                   f"{'met' if inter <= ref else 'NOT met'}")
    for ref, target in (("uniform", 60), ("avg_ce", 50)):
        if f"vs_{ref}" in r:
            out.append(f"- >= {target}% lower than {ref}: {r[f'vs_{ref}']:.0f}%: "
                       f"{'met' if r[f'vs_{ref}'] >= target else 'NOT met'}")
    if agg["sources"]:
        best = min(agg["sources"], key=lambda n: agg["sources"][n]["mean"])
        mean, b = r["mean"][0], agg["sources"][best]["mean"]
        out.append(f"- domain-average loss below every single source's: {mean:.3f} vs best source `{best}` {b:.3f}: "
                   f"{'met' if mean < b else 'NOT met'}")
    return out


def render(agg, methods, regime, assets, wall, runs, fast, command) -> str:
    src = ", ".join(s["name"] for s in assets["sources"])
    fit_s = statistics.fmean(r["seconds"] for r in runs)
    lines = [
        "# Fusion quality" + (" (--fast smoke run: not a result)" if fast else ""),
        "",
        f"Reproduce: `{command}`. Demo build: {assets['demo']}; "
        f"N = {len(assets['sources'])} sources ({src}), outputs cached once (offline mode). Regime: {regime.steps} "
        f"steps x {regime.batch_size} blocks of {regime.block_size} tokens, lambda (clm_weight) = {regime.clm_weight}, "
        f"forward KL on the top-{regime.distill_top_k} union, AdamW lr {regime.learning_rate} ({regime.warmup_steps} "
        f"warm-up steps, cosine to 10%), target gradient norm clipped to 1, selector lr "
        f"{regime.selector_learning_rate}. Seeds {list(regime.seeds)}: a seed fixes the "
        "target init, the batch order and the selector init, identical for every method. Oracle: one run whose "
        "weights put 1 on each sample's own domain specialist. `adaptive kK bB`: the library's selector keeping the "
        "top-K sources, feedback weight B (cv2 / hinge: the feedback mode), features = the sources' rewards "
        "(`(both)`: rewards + the target's pooled hidden state; `(hidden)`: the hidden state only, what routed mode "
        "uses), starting from the CE prior (`lightning_fuse/selector.py`); `(no prior)`: `selector_prior: false`, "
        "a randomly initialised MLP.",
        "",
        "Losses: nats/token on held-out text, mean ± sample std over seeds. Interference = mean over domains of "
        "(loss - oracle loss), per seed, then mean ± std. `normalised` = interference / clm's interference and "
        "`% red.` = reduction of interference vs uniform / avg_ce, both from the seed means.",
        f"Wall time {wall / 60:.1f} min (assets {assets['prepare_s']:.0f} s, {len(runs)} fits of {fit_s:.0f} s each "
        f"on average, 2 in parallel).",
        "",
        format_table(agg, methods),
        "",
        "Differences of interference, paired by seed; a difference counts when |mean| > 2 x the larger of its paired "
        "std and the two methods' own std:",
        "",
        *significance(agg, _pairs(methods)),
    ]
    for m in ("adaptive k2 b0", "adaptive k1 b0"):
        checks = goals(agg, m)
        if checks:
            lines += ["", f"Goals for `{m}` (seed means):", *checks]
    if agg["shares"]:
        names = [s["name"] for s in assets["sources"]]
        lines += ["", "Selection share on held-out text (mean fusion weight, seed mean):", "",
                  "| method | domain | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for m, per_domain in agg["shares"].items():
            if m in ("clm", "uniform") or m.startswith("oracle"):
                continue
            for d, row in per_domain.items():
                lines.append(f"| {m} | {d} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def _mixed_pairs(methods: list[str]) -> list[tuple[str, str]]:
    pairs = [(m, ref) for m in methods if m.startswith("token") for ref in ("min_ce", "adaptive k2 b0")]
    pairs += [("token adaptive k3", "token min_ce"), ("token adaptive k3 (routed)", "token adaptive k3"),
              ("adaptive k2 b0", "min_ce"), ("avg_ce", "min_ce"), ("adaptive k3 b0", "min_ce"),
              ("token adaptive k3", "adaptive k3 b0"), ("token adaptive k2", "token min_ce"),
              ("adaptive k2 b0 (rel 0.5)", "min_ce"), ("adaptive k2 b0 (rel 0.5)", "adaptive k2 b0"),
              ("token adaptive k3 (rel 0.5)", "token adaptive k3"), ("adaptive (library defaults)", "min_ce"),
              ("adaptive (library defaults)", "adaptive k2 b0")]
    return [(a, b) for a, b in pairs if a in methods and b in methods]


def mixed_goals(pure: dict[str, Any], mixed: dict[str, Any], method: str = "token adaptive k3") -> list[str]:
    """Issue 17's goals, on the seed means and the paired seed spread; pure blocks against per-sequence adaptive at
    the same K."""
    out = []
    rp, rm = pure["rows"], mixed["rows"]
    same_k = method.replace("token adaptive", "adaptive") + " b0"
    if not rm.get(method, {}).get("n") or not rm.get("min_ce", {}).get("n"):
        return out
    a, b = rm[method]["interference"][0], rm["min_ce"]["interference"][0]
    common = sorted(set(mixed["per_seed"][method]) & set(mixed["per_seed"]["min_ce"]))
    diffs = [mixed["per_seed"][method][s]["interference"] - mixed["per_seed"]["min_ce"][s]["interference"] for s in common]
    mean, spread = _mean_std(diffs)
    red = 100 * (b - a) / abs(b) if b else math.nan
    ok = red >= 50 and abs(mean) > 2 * spread and len(common) > 1
    out.append(f"- mixed blocks: `{method}` interference {a:+.3f} vs per-sequence min_ce {b:+.3f}: {red:.0f}% lower "
               f"(goal >= 50%), paired difference {mean:+.3f} ± {spread:.3f} (goal beyond 2x): "
               f"{'met' if ok else 'NOT met'}")
    if rp.get(method, {}).get("n") and rp.get(same_k, {}).get("n"):
        common = sorted(set(pure["per_seed"][method]) & set(pure["per_seed"][same_k]))
        diffs = [pure["per_seed"][method][s]["interference"] - pure["per_seed"][same_k][s]["interference"]
                 for s in common]
        mean, spread = _mean_std(diffs)
        ok = mean <= 2 * spread
        out.append(f"- pure blocks: `{method}` vs per-sequence `{same_k}` (same K): paired difference of interference "
                   f"{mean:+.3f} ± {spread:.3f} (goal: no worse beyond 2x the spread): {'met' if ok else 'NOT met'}")
    return out


def render_mixed(pure, mixed, methods, regime, assets, wall, runs, fast, command) -> str:
    src = ", ".join(s["name"] for s in assets["sources"])
    fit_s = statistics.fmean(r["seconds"] for r in runs)
    for agg in (pure, mixed):
        agg["sources"] = {}  # the single sources' pure-block losses are in quality.md
    lines = [
        "# Per-token fusion on mixed-domain blocks" + (" (--fast smoke run: not a result)" if fast else ""),
        "",
        f"Reproduce: `{command}`. Demo build: {assets['demo']}; N = {len(assets['sources'])} sources ({src}), "
        f"outputs cached once (offline mode). Training set: the pure blocks plus {regime.mixed_train_blocks} mixed "
        f"blocks; held-out: half of each domain's held-out blocks as pure blocks, {regime.mixed_val_blocks} mixed blocks "
        "cut from the other half. A mixed block is 2-3 segments of 16-96 tokens of different domains "
        "(`benchmarks/mixed_blocks.py`). "
        f"Regime: {regime.steps} steps x {regime.batch_size} blocks of {regime.block_size} tokens, lambda = "
        f"{regime.clm_weight}, forward KL on the top-{regime.distill_top_k} union, AdamW lr {regime.learning_rate} "
        f"({regime.warmup_steps} warm-up steps, cosine to 10%), target gradient norm clipped to 1, selector (and token "
        f"gate) lr {regime.selector_learning_rate}, per-sequence selector features = rewards. Seeds {list(regime.seeds)}.",
        "",
        "Rows: `min_ce`, `avg_ce` (FuseLLM's formulas) and `adaptive k2 b0` weight the sources per sequence; `token "
        "min_ce` takes at each position the source with the highest gold log-prob; `token adaptive k2`: the per-sequence "
        "selector keeps K sources per row and the trained per-token gate (target hidden state + the sources' per-position "
        "signals, gold log-prob prior) mixes them at every position; `(routed)`: the selector decides from the target's "
        "pooled hidden state before the sources run, and only the K kept sources run on a row. Oracle: each position "
        "distilled from its own segment's specialist (pure blocks: the block's).",
        "",
        "Interference = mean over domains of (loss - oracle loss), per seed; on mixed blocks the loss of a domain is the "
        "target's loss on the tokens of that domain's segments inside mixed blocks.",
        f"Wall time {wall / 60:.1f} min ({len(runs)} fits of {fit_s:.0f} s each on average, 2 in parallel, on a shared "
        "machine).",
        "",
        "## Mixed blocks (per segment)",
        "",
        format_table(mixed, methods),
        "",
        *significance(mixed, _mixed_pairs(methods)),
        "",
        "## Pure blocks",
        "",
        format_table(pure, methods),
        "",
        *significance(pure, _mixed_pairs(methods)),
        "",
        "Goals (issue 17):",
        *[g for m in ("token adaptive k3", "token adaptive k2") for g in mixed_goals(pure, mixed, m)],
        "",
        *off_specialist(pure, mixed, [s["name"] for s in assets["sources"]]),
    ]
    if assets.get("describe"):
        lines[2:2] = ["Sources (the fast machine-text world, `benchmarks/machine_world.py`):", "", *assets["describe"],
                      ""]
    if mixed["shares"]:
        names = [s["name"] for s in assets["sources"]]
        lines += ["", "Mean fusion weight per source on the tokens of each domain inside mixed blocks (seed mean):", "",
                  "| method | tokens of | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for m, per_domain in mixed["shares"].items():
            for d, row in per_domain.items():
                lines.append(f"| {m} | {d} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def off_specialist(pure: dict[str, Any], mixed: dict[str, Any], names: list[str]) -> list[str]:
    """Per method: the fusion weight not on the tokens' own domain specialist, and the largest weight on any single
    other source (the 'second source'), averaged over domains (seed means)."""
    lines = ["Weight off the tokens' own specialist (mean over domains; `largest other`: the largest mean weight on "
             "one other source, e.g. an off-domain second source):", "",
             "| method | pure: off own specialist | pure: largest other | mixed: off own specialist | "
             "mixed: largest other |", "|---|---|---|---|---|"]
    for m in pure["shares"]:
        if m.startswith("oracle") or m not in mixed["shares"]:
            continue
        cells = []
        for agg in (pure, mixed):
            per_domain = {d: row for d, row in agg["shares"][m].items() if d in names}
            off = statistics.fmean(1 - row[d] for d, row in per_domain.items())
            other = statistics.fmean(max(v for n, v in row.items() if n != d) for d, row in per_domain.items())
            cells += [f"{off:.2f}", f"{other:.2f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot_mixed(pure: dict[str, Any], mixed: dict[str, Any], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in methods if mixed["rows"].get(m, {}).get("n") and m != "oracle"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.38
    for j, (agg, label) in enumerate(((mixed, "mixed blocks (per segment)"), (pure, "pure blocks"))):
        means = [agg["rows"][m]["interference"][0] for m in rows]
        stds = [agg["rows"][m]["interference"][1] for m in rows]
        xs = [i + (j - 0.5) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, color=("#1f77b4", "#aaa")[j])
        for s in agg["seeds"]:
            ax.scatter(xs, [agg["per_seed"][m].get(s, {}).get("interference", math.nan) for m in rows], s=7, color="k",
                       zorder=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(rows)), rows, rotation=25, ha="right")
    ax.set_ylabel("interference (nats/token vs oracle)")
    ax.set_title(f"Per-sequence vs per-token fusion, mean ± std over {len(mixed['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
