"""``lightning-fuse precompute``: run every source once over the corpus and cache its sparse outputs (offline mode).

Reads the same YAML as ``lightning-fuse fit`` (its ``model:`` and ``data:`` sections), builds the same blocks, and
writes, per source and split, the top-k ids and log-probs, the gold log-prob and the per-sequence CE that
``FrozenSource.forward`` returns online (see :mod:`lightning_fuse.offline` for the layout and
:mod:`lightning_fuse.cache` for the storage). Shards are written atomically; a rerun skips finished shards and
finished sources without loading them. ``--devices N`` spreads the shards over N processes (:mod:`lightning_fuse.ranks`).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_fuse.cache import (
    FORMAT,
    MANIFEST,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    CacheWriter,
    SourceWriter,
)
from lightning_fuse.data import TextDataModule
from lightning_fuse.data.collate import chat_rows
from lightning_fuse.errors import condense_usage_error
from lightning_fuse.module import FusionModule
from lightning_fuse.offline import (
    CachedTextDataModule,
    default_cache_dir,
    expected_identities,
    source_identity,
    split_root,
)
from lightning_fuse.ranks import Ranks, balance, launch
from lightning_fuse.sources import FrozenSource, SourceSpec

log = logging.getLogger(__name__)


def precompute(
    config: str | list[str],
    cache_dir: str | None = None,
    top_k: int | None = None,
    shard_size: int = 256,
    max_tokens_per_batch: int = 16384,
    val: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    num_threads: int | None = None,
) -> Path:
    """Run every source of a fit config once over its blocks and cache its top-k outputs for offline fusion.

    Then train with ``data.class_path: lightning_fuse.offline.CachedTextDataModule`` (and ``model.offline: true``
    to never load the sources), e.g. ``configs/offline.yaml``. Interrupted runs resume: rerun the same command.
    With ``--devices N`` (and ``--num_nodes M``) N processes per node share the shards, launched by Lightning as
    for ``fit`` under DDP; the cache is the same, byte for byte, whatever the number of processes or batch size.

    Args:
        config: the YAML given to ``lightning-fuse fit`` (its ``model:`` and ``data:`` sections; others ignored);
            several (``--config a.yaml --config b.yaml``) compose in order as they do for ``fit``.
        cache_dir: where to write the cache; default the config's ``data.init_args.cache_dir``, else
            ``<data_dir>/.fuse_cache``.
        top_k: ids and log-probs kept per token and source; default ``model.distill_top_k``.
        shard_size: sequences per shard file (the unit of atomic writes, of resume and of the work shared
            between processes).
        max_tokens_per_batch: tokens per source forward pass (``max_tokens_per_batch // block_size`` sequences,
            at least one; a batch never spans two shards).
        val: also cache the validation blocks (needed when training with ``model.offline: true``).
        overwrite: recompute the declared sources from scratch (also when the cache was built for another model,
            tokenizer, corpus, block size or k, which is otherwise an error).
        device: device the sources run on (``cuda``, ``cuda:1``, ``cpu``); default CUDA when available. With
            ``devices`` > 1: ``cuda`` (process i on GPU i of its node) or ``cpu``.
        devices: processes per node, each writing its share of the shards (one per GPU; on CPU, e.g. one per
            core group with ``num_threads``).
        num_nodes: nodes (launch the command on each, as for ``fit``; the cache dir must be shared).
        num_threads: torch intra-op CPU threads per process (None: the config's ``num_threads``, else torch's
            default, divided between the processes of a node).

    Returns:
        The cache directory.
    """
    if shard_size < 1 or max_tokens_per_batch < 1:
        raise ValueError(f"`--shard_size` and `--max_tokens_per_batch` must be >= 1, got {shard_size} and "
                         f"{max_tokens_per_batch}.")
    module, dm, threads = _load_fit_config(config)
    if not module.source_specs:
        raise ValueError(f"{config} declares no sources in `model.init_args.sources`: there is nothing to precompute.")
    root = _cache_dir(dm, cache_dir)
    dm.connect(module.tokenizer, module.max_seq_length)
    if num_threads or threads:
        torch.set_num_threads(num_threads or threads)
    if isinstance(dm, CachedTextDataModule):  # tokenised once here, before the other processes start
        dm.setup_blocks("fit")
    else:
        dm.setup("fit")
    ranks = launch(device, devices, num_nodes)  # the other processes re-run this command up to here
    if num_threads or threads:
        torch.set_num_threads(num_threads or threads)
    try:
        return _precompute(ranks, module, dm, root, top_k, shard_size, max_tokens_per_batch, val, overwrite)
    except BaseException:
        ranks.abort()
        raise


def _precompute(
    ranks: Ranks, module: FusionModule, dm: TextDataModule, root: Path, top_k: int | None,
    shard_size: int, max_tokens_per_batch: int, val: bool, overwrite: bool,
) -> Path:
    specs = module.source_specs
    k = top_k if top_k is not None else module.hparams.distill_top_k
    if k < module.hparams.distill_top_k and ranks.is_main:
        log.warning("--top_k %d < model.distill_top_k %d: training on this cache will refuse it", k,
                    module.hparams.distill_top_k)
    vocab = module.target_config.vocab_size
    dev = ranks.device
    module.to(dev)  # no parameters yet: sets the device the sources load on
    splits: dict[str, Dataset] = {"train": dm.train_set}
    if val:
        splits["val"] = dm.val_set
    rows = max(1, max_tokens_per_batch // int(dm.train_set.blocks.shape[1]))

    # rank 0 checks the cache (identities, damaged shards) and plans; the others open it as rank 0 left it
    identities = plan = None
    if ranks.is_main:
        print(f"precompute: cache dir {root}" + (f", {ranks.world_size} processes" if ranks.world_size > 1 else ""),
              flush=True)
        identities = {s.name: source_identity(s, module.tokenizer, dev) for s in specs}
        writers = _open_writers(root, splits, specs, identities, k, vocab, shard_size, overwrite)
        plan = {name: {split: w.pending_shards() for split, w in per_split.items()} for name, per_split in writers.items()}
    identities, plan = ranks.broadcast((identities, plan))
    if not ranks.is_main:
        writers = _open_writers(root, splits, specs, identities, k, vocab, shard_size, False, repair=False)

    loads = [0] * ranks.world_size
    shares = {spec.name: _my_shards(ranks, plan[spec.name], writers[spec.name], loads) for spec in specs}
    if ranks.is_main:
        for spec in specs:
            if not any(plan[spec.name].values()):
                log.info("source %r: already cached, skipped", spec.name)
    todo = [spec for spec in specs if any(shares[spec.name].values())]
    written = sum(len(pending) for spec in todo for pending in shares[spec.name].values())
    for i, spec in enumerate(todo):
        source = _load_source(module, spec, dev)
        try:
            for split, pending in shares[spec.name].items():
                if pending:
                    _run_source(source, splits[split], writers[spec.name][split], pending, k, vocab, rows, dev, split)
        finally:
            del source
            if i + 1 < len(todo):  # free the source before the next one loads (a full collection: 0.25 s here)
                gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if ranks.world_size > 1:
        print(f"precompute: process {ranks.rank} of {ranks.world_size} wrote {written} shard(s)", flush=True)
    ranks.barrier()  # every shard written
    if not ranks.is_main:
        return root
    for per_split in writers.values():
        for w in per_split.values():
            w.finalize()
    for split in splits:
        per_token = storage_bytes_per_token(split_root(root, split))
        print(f"precompute: {split}: " + ", ".join(f"{n} {b:.1f} B/token" for n, b in per_token.items()), flush=True)
    print(f"precompute: done, cache in {root}", flush=True)
    return root


def _my_shards(ranks: Ranks, pending: dict[str, list[int]], writers: dict[str, SourceWriter],
               loads: list[int]) -> dict[str, list[int]]:
    """This rank's pending shards of one source, per split: all the source's shards (every split) balanced over the
    ranks by sequence count (:func:`~lightning_fuse.ranks.balance`, ``loads`` carried over the sources)."""
    items = [(split, shard) for split, shards in pending.items() for shard in shards]
    owners = balance([len(writers[split].shard_range(shard)) for split, shard in items], ranks.world_size, loads)
    mine: dict[str, list[int]] = {split: [] for split in pending}
    for (split, shard), owner in zip(items, owners):
        if owner == ranks.rank:
            mine[split].append(shard)
    return mine


def _open_writers(
    root: Path, splits: dict[str, Dataset], specs: list[SourceSpec], identities: dict[str, dict[str, Any]], k: int,
    vocab: int, shard_size: int, overwrite: bool, repair: bool = True,
) -> dict[str, dict[str, SourceWriter]]:
    """Per source and split, its writer: with ``repair`` (rank 0) a foreign or unreadable manifest is handled,
    ``overwrite`` resets, damaged shards are unrecorded; without (the other ranks, after rank 0) just opened."""
    writers: dict[str, dict[str, SourceWriter]] = {s.name: {} for s in specs}
    for split, ds in splits.items():
        kwargs = {"seq_len": int(ds.blocks.shape[1]), "top_k": int(k), "vocab_size": int(vocab),
                  "shard_size": shard_size}
        writer = _open_cache(split_root(root, split), kwargs, overwrite) if repair else \
            CacheWriter(split_root(root, split), **kwargs)
        expect = expected_identities(specs, ds, identities)
        for spec in specs:
            if repair:
                writers[spec.name][split] = _open_source(writer, spec.name, expect[spec.name], overwrite)
            else:
                e = expect[spec.name]
                writers[spec.name][split] = writer.source(spec.name, e["model_id"], e["tokenizer_id"], e["data_id"],
                                                          num_sequences=e["num_sequences"])
    return writers


# ----------------------------------------------------------------------------------------------- config


def load_fit_config(config: str | list[str]) -> tuple[FusionModule, TextDataModule]:
    """The FusionModule and DataModule a ``lightning-fuse fit --config`` YAML declares (no weights loaded).

    Several YAMLs compose in order, later ones overriding earlier ones, as ``fit --config a --config b`` does.
    """
    module, dm, _ = _load_fit_config(config)
    return module, dm


def _load_fit_config(config: str | list[str]) -> tuple[FusionModule, TextDataModule, int | None]:
    from jsonargparse import ActionConfigFile
    from lightning.pytorch.cli import LightningArgumentParser

    paths = [config] if isinstance(config, str) else list(config)
    if not paths:
        raise ValueError("`--config` is missing. Pass the YAML you give `lightning-fuse fit`.")
    parts, threads = [], None
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"`--config` {p!r} is not a file. Pass the YAML you give `lightning-fuse fit`.")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p} is not a YAML mapping: pass a fit config.")
        threads = raw.get("num_threads", threads)
        # trainer, seed_everything, optimizer, ckpt_path, ...: not needed to run the sources
        parts.append({key: raw[key] for key in ("model", "data") if key in raw})
    missing = [key for key in ("model", "data") if not any(key in part for part in parts)]
    if missing:
        raise ValueError(f"{' + '.join(paths)} has no {' / '.join(missing)} section: pass a fit config.")
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_lightning_class_args(FusionModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(TextDataModule, "data", subclass_mode=True)
    try:
        cfg = parser.parse_args([arg for part in parts for arg in ("--config", yaml.safe_dump(part))])
    except Exception as err:  # jsonargparse's ArgumentError: say which file
        raise ValueError(f"{' + '.join(paths)}: {condense_usage_error(str(err))}") from err
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    init = instantiate(cfg)
    return init.model, init.data, threads


def _cache_dir(dm: TextDataModule, cache_dir: str | None) -> Path:
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
        if isinstance(dm, CachedTextDataModule) and root.resolve() != dm.cache_root.resolve():
            log.warning("--cache_dir %s differs from the config's data cache_dir %s: training will read the latter",
                        root, dm.cache_root)
        return root
    if isinstance(dm, CachedTextDataModule):
        return dm.cache_root
    if dm.data_dir is None:
        raise ValueError("`--cache_dir` is needed with `--data.dataset` (no data_dir to keep the cache in): pass "
                         "`--cache_dir DIR`, or set `data.init_args.cache_dir` with CachedTextDataModule.")
    return default_cache_dir(dm.data_dir)


# ----------------------------------------------------------------------------------------------- writing


def _open_cache(root: Path, kwargs: dict[str, int], overwrite: bool) -> CacheWriter:
    try:
        return CacheWriter(root, **kwargs)
    except CacheCorruptError as err:  # garbage or foreign manifest.json: keep it aside, rebuild the cache
        broken = root / f"{MANIFEST}.broken-{uuid.uuid4().hex[:8]}"
        (root / MANIFEST).replace(broken)
        log.warning("%s: moved the unreadable manifest to %s and rebuilding the cache (%s)", root, broken.name, err)
        return CacheWriter(root, **kwargs)
    except CacheMismatchError as err:
        if not overwrite:
            raise CacheMismatchError(f"{err}; or pass `--overwrite true` to rebuild it") from err
    if _is_cache(root):  # built with another L / k / vocabulary / shard size: start over
        log.warning("%s was built with other settings: removing it (--overwrite true)", root)
        shutil.rmtree(root)
    return CacheWriter(root, **kwargs)


def _is_cache(root: Path) -> bool:
    try:
        return json.loads((root / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _open_source(writer: CacheWriter, name: str, expect: dict[str, Any], overwrite: bool) -> SourceWriter:
    """The source's writer with its damaged shards (missing, truncated, failing their checksum) unrecorded, so
    that only they are recomputed."""
    ident = {key: expect[key] for key in ("model_id", "tokenizer_id", "data_id")}
    n = expect["num_sequences"]
    if overwrite:  # drop whatever is cached for this source (a placeholder identity unrecords its shards)
        writer.source(name, {"reset": uuid.uuid4().hex}, "reset", "reset", num_sequences=n, overwrite=True)
    try:
        w = writer.source(name, ident["model_id"], ident["tokenizer_id"], ident["data_id"], num_sequences=n,
                          overwrite=overwrite)
    except CacheMismatchError as err:
        raise CacheMismatchError(f"{err}: e.g. `lightning-fuse precompute ... --overwrite true`") from err
    damaged = w.drop_damaged()
    if damaged:
        log.warning("cache of source %r in %s: shard(s) %s missing, truncated or failing their checksum: "
                    "recomputing them", name, writer.root, damaged[:10])
    return w


def _load_source(module: FusionModule, spec: SourceSpec, device: torch.device) -> FrozenSource:
    """One source, loaded through the module's ``build_sources`` (its checks and subclass hooks), one at a time."""
    specs = module.source_specs
    module.source_specs = [spec]
    try:
        (source,) = module.build_sources()
    finally:
        module.source_specs = specs
    return source.to(device)


def _run_source(
    source: FrozenSource,
    ds: Dataset,
    writer: SourceWriter,
    pending: list[int],
    k: int,
    vocab: int,
    rows_per_batch: int,
    device: torch.device,
    split: str,
) -> None:
    L = ds.blocks.shape[1]
    total = sum(len(writer.shard_range(i)) for i in pending)
    start = time.perf_counter()
    # disable=None: no bar when stderr is not a terminal (a log file would get every carriage-return update)
    with tqdm(total=total * L, unit="tok", unit_scale=True, desc=f"{source.name} [{split}]", dynamic_ncols=True,
              disable=None) as bar:
        for shard in pending:
            rows = writer.shard_range(shard)
            parts: dict[str, list[np.ndarray]] = {"ids": [], "logprobs": [], "gold_logprob": [], "ce": []}
            for b in range(rows.start, rows.stop, rows_per_batch):
                stop = min(b + rows_per_batch, rows.stop)
                ids = ds.blocks[b:stop].to(device)
                mask = torch.ones_like(ids)
                labels = _labels(ds, b, stop, ids).masked_fill(mask == 0, -100)  # as _step
                aligned = None
                if source.aligner is not None and source.aligner.reads_own_template:  # as AlignCollate
                    chat = chat_rows(ds, np.arange(b, stop))
                    aligned = source.aligner.align_batch(ids.cpu(), mask.cpu(), chat) if chat is not None else None
                out = source.forward(ids, mask, labels, k, vocab, aligned)
                top_lp, top_ids = out.dist.logprobs, out.dist.ids
                if k >= vocab:  # dense mode keeps the ids in vocabulary order; the cache stores them sorted
                    top_lp, order = top_lp.sort(-1, descending=True)
                    top_ids = top_ids.gather(-1, order)
                for key, t in (("ids", top_ids), ("logprobs", top_lp),
                               ("gold_logprob", out.gold_logprob), ("ce", out.ce)):
                    parts[key].append(t.cpu().numpy())
                bar.update(ids.numel())
            arrays = {key: np.concatenate(v) for key, v in parts.items()}
            if not np.isfinite(arrays["ce"]).all():
                raise FloatingPointError(f"source {source.name!r} produced NaN/inf log-probs in {split} shard {shard}")
            writer.write_shard(shard, **arrays)
    seconds = time.perf_counter() - start
    log.info("source %r [%s]: %d tokens in %.1f s (%.0f tokens/s, including writes)", source.name, split,
             total * L, seconds, total * L / max(seconds, 1e-9))


def _labels(ds: Dataset, start: int, stop: int, ids: torch.Tensor) -> torch.Tensor:
    """The blocks' labels (chat data: -100 outside the assistant replies), else the ids."""
    label_blocks = getattr(ds, "label_blocks", None)
    return ids if label_blocks is None else label_blocks[start:stop].to(ids.device)


def storage_bytes_per_token(root: Path) -> dict[str, float]:
    """Bytes on disk per cached token, per source (all shard files, .npy headers included)."""
    manifest = json.loads((Path(root) / MANIFEST).read_text())
    out = {}
    for name, entry in manifest["sources"].items():
        size = sum(f["bytes"] for r in entry["shards"] for f in r["files"].values())
        out[name] = size / max(1, entry["num_sequences"] * manifest["seq_len"])
    return out


__all__ = ["CacheError", "load_fit_config", "precompute", "storage_bytes_per_token"]
