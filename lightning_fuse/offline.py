"""Offline fusion (FuseLLM style): the sources run once (``lightning-fuse precompute``), training reads their outputs.

``CachedTextDataModule`` gives the same blocks as ``TextDataModule``; every training sample also carries
``cached = {source_name: {ids [L, k], logprobs [L, k], gold_logprob [L], ce []}}``, so a batch has
``batch["cached"][name]`` and ``FusionModule.run_sources`` reads it instead of running the sources. With
``model.offline: true`` the sources are never loaded, and validation batches carry the cached outputs too.

Cache layout (two independent ``lightning_fuse.cache`` roots, one per split)::

    <cache_dir>/train/manifest.json, <source>/shard-*.npy     the training blocks, in dataset order
    <cache_dir>/val/manifest.json,   <source>/shard-*.npy     the validation blocks (for ``model.offline: true``)

Each source's cache records its identity: ``model_id`` (path as declared, hash of config.json, sha256 of every byte of
the weight files, dtype; for a source with another tokenizer also its alignment mode and the target tokenizer's
fingerprint), ``tokenizer_id`` (the source tokenizer's vocabulary fingerprint) and ``data_id`` (sha256 of
the split's token ids: tokenizer, block size, files and block cap all enter it). Opening a cache built for another
model, tokenizer or corpus fails with a :class:`~lightning_fuse.cache.CacheError` saying what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_fuse.alignment import ALIGNMENT_VERSION
from lightning_fuse.alignment.chat import template_id
from lightning_fuse.cache import (
    CachedSourcesDataset,
    CacheIncompleteError,
    CacheMismatchError,
    CacheReader,
    data_fingerprint,
)
from lightning_fuse.data import TextDataModule
from lightning_fuse.sources import (
    SourceSpec,
    load_config,
    load_mode,
    load_tokenizer,
    resolve_path,
    tokenizer_fingerprint,
)
from lightning_fuse.weights_hash import folder_weights_hash

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset")


def default_cache_dir(data_dir: str) -> Path:
    """``<data_dir>/.fuse_cache`` (the data module only reads .txt/.jsonl files, so the cache never becomes data)."""
    return Path(resolve_path(data_dir)) / ".fuse_cache"


def split_root(cache_dir: str | os.PathLike, split: str) -> Path:
    """The cache root of one split (``train`` or ``val``)."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return Path(cache_dir) / split


def _sha256_short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _config_hash(spec: SourceSpec) -> str:
    path = resolve_path(spec.path)
    config_file = Path(path) / "config.json"
    if os.path.isdir(path) and spec.gguf_file is None and config_file.is_file():
        return _sha256_short(config_file.read_bytes())  # file bytes: stable across transformers versions
    config = load_config(spec.path, f"source {spec.name!r}", spec.trust_remote_code, spec.gguf_file).to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return _sha256_short(json.dumps(config, sort_keys=True, default=str).encode())


def _weights_hash(spec: SourceSpec) -> str | None:
    """Hash of every byte of a local model folder's weight files (computed once per file version, see
    :mod:`lightning_fuse.weights_hash`): a source retrained or edited in place no longer matches. ``None`` for hub
    ids."""
    path = resolve_path(spec.path)
    if not os.path.isdir(path):
        return None
    return folder_weights_hash(path)


def source_identity(
    spec: SourceSpec, target_tokenizer: PreTrainedTokenizerBase | None = None, device: torch.device | str | None = None
) -> dict[str, Any]:
    """``model_id`` and ``tokenizer_id`` a source's cache is recorded under (computed without loading weights).

    ``model_id`` records how the source runs on ``device`` (its dtype, and ``quantization: int8`` when it loads in
    8-bit there: ``load_in_8bit: true``, or ``auto`` on CUDA without a declared dtype). For a source whose tokenizer
    differs from ``target_tokenizer``, the cached distributions are its outputs mapped onto the target's vocabulary,
    so ``model_id`` also records the alignment mode and the target tokenizer.
    """
    model_id: dict[str, Any] = {"path": spec.path, "config": _config_hash(spec), **load_mode(spec, device)}
    weights = _weights_hash(spec)
    if weights is not None:
        model_id["weights"] = weights
    if spec.gguf_file is not None:
        model_id["gguf_file"] = spec.gguf_file
    tokenizer = load_tokenizer(spec.tokenizer or spec.path, f"source {spec.name!r} tokenizer", spec.trust_remote_code)
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    if target_tokenizer is not None and tokenizer_id != (target_id := tokenizer_fingerprint(target_tokenizer)):
        model_id["alignment"] = {"mode": spec.alignment, "target_tokenizer": target_id, "version": ALIGNMENT_VERSION,
                                 "chat_templates": [template_id(tokenizer), template_id(target_tokenizer)]}
    return {"model_id": model_id, "tokenizer_id": tokenizer_id}


def expected_identities(
    specs: Sequence[SourceSpec], blocks: Any, identities: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """``CacheReader(expect=...)`` for the declared sources over one split's blocks: a dataset with a ``fingerprint``
    (``lightning_fuse.data``: from the stored blocks' digests, no pass over the data) or an ``[S, L]`` tensor."""
    identities = identities or {s.name: source_identity(s) for s in specs}
    data_id = blocks.fingerprint if hasattr(blocks, "fingerprint") else data_fingerprint(blocks)
    return {s.name: {**identities[s.name], "data_id": data_id, "num_sequences": len(blocks)} for s in specs}


class CachedBlockDataset(Dataset):
    """Blocks of a ``BlockDataset`` plus, per block, the cached outputs of every source (``"cached"``).

    ``top_k`` keeps the first ``top_k`` of the cached ids (they are sorted by log-prob), so a cache built with a
    larger k serves a module with a smaller ``distill_top_k``.
    """

    def __init__(self, blocks: Dataset, cached: CachedSourcesDataset, top_k: int | None = None) -> None:
        if len(blocks) != len(cached):
            raise CacheMismatchError(f"{len(blocks)} blocks but {len(cached)} cached sequences: rerun precompute")
        self.base = blocks
        self.cached = cached
        self.top_k = top_k

    @property
    def blocks(self) -> torch.Tensor:
        return self.base.blocks

    @property
    def domains(self) -> torch.Tensor:
        return self.base.domains

    @property
    def fingerprint(self) -> str:
        return self.base.fingerprint

    @property
    def label_blocks(self) -> Any:
        return getattr(self.base, "label_blocks", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        cached = self.cached.__getitems__(indices)  # one read per shard and source for the whole batch
        k = self.top_k
        getitems = getattr(self.base, "__getitems__", None)
        base = getitems(indices) if getitems is not None else [self.base[i] for i in indices]
        items = []
        for item, c in zip(base, cached):
            if k is not None:
                c = {name: {**f, "ids": f["ids"][:, :k], "logprobs": f["logprobs"][:, :k]} for name, f in c.items()}
            items.append({**item, "cached": c})
        return items


class CachedTextDataModule(TextDataModule):
    """``TextDataModule`` whose batches carry the sources' cached top-k outputs (run ``lightning-fuse precompute``).

    The cache must match the module's declared sources (path, config, weights, tokenizer) and these exact blocks
    (data fingerprint); otherwise setup fails with a ``CacheError`` saying what differs. Setup also checks every
    shard's size and, with ``verify``, its checksum. Validation batches carry cached outputs when the module is
    offline (``model.offline: true``, sources not loaded); otherwise the loaded sources run on them.

    Args:
        data_dir: folder with one sub-folder per domain (``demo://corpus`` for the embedded demo's data).
        cache_dir: the cache written by ``lightning-fuse precompute``; default ``<data_dir>/.fuse_cache``.
        block_size: tokens per block; must not exceed the target's maximum positions.
        batch_size: blocks per batch (per device).
        val_fraction: share of each domain's blocks held out when it has no ``val.*`` file.
        max_blocks_per_domain: cap on training blocks per domain (None = all), to keep domains balanced.
        max_val_blocks_per_domain: cap on validation blocks per domain (None = all).
        text_field: JSON field holding the text in .jsonl files.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
        verify: check every shard file's checksum at setup, once per cache (recorded in ``verified.json``; a file
            rewritten since is checked again), on the global rank 0 only.
        dataset, domain_field, messages_field, train_split, val_split, tokenized_dir, num_proc: as for
            ``TextDataModule`` (Hugging Face datasets, chat data, where the tokenised blocks live).
    """

    def __init__(
        self,
        data_dir: str,
        cache_dir: str | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        max_blocks_per_domain: int | None = None,
        max_val_blocks_per_domain: int | None = None,
        text_field: str = "text",
        num_workers: int = 0,
        seed: int = 0,
        verify: bool = True,
        dataset: str | dict[str, str] | None = None,
        domain_field: str | None = None,
        messages_field: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        tokenized_dir: str | None = None,
        num_proc: int | None = None,
    ) -> None:
        super().__init__(
            data_dir, block_size=block_size, batch_size=batch_size, val_fraction=val_fraction,
            max_blocks_per_domain=max_blocks_per_domain, max_val_blocks_per_domain=max_val_blocks_per_domain,
            text_field=text_field, num_workers=num_workers, seed=seed, dataset=dataset, domain_field=domain_field,
            messages_field=messages_field, train_split=train_split, val_split=val_split,
            tokenized_dir=tokenized_dir, num_proc=num_proc,
        )
        if cache_dir is None and data_dir is None:
            raise ValueError("`--data.cache_dir` is needed with `--data.dataset` (there is no data_dir to keep the "
                             "offline cache in): point it to a folder.")
        self.cache_dir = cache_dir
        self.verify = verify
        self.source_specs: list[SourceSpec] | None = None
        self.distill_top_k: int | None = None
        self.offline = False
        self.vocab_size: int | None = None
        self.readers: dict[str, CacheReader] = {}

    @property
    def cache_root(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir)) if self.cache_dir else default_cache_dir(self.data_dir)

    def bind(self, module: Any) -> None:
        """Take the tokenizer, declared sources, ``distill_top_k``, ``offline`` and vocabulary from a FusionModule
        (done in ``setup`` from the trainer's module; call it yourself to use the data module without a trainer)."""
        if self.tokenizer is None:
            self.connect(module.tokenizer, getattr(module, "max_seq_length", None))
        self.source_specs = list(module.source_specs)
        hparams = getattr(module, "hparams", {})
        self.distill_top_k = hparams.get("distill_top_k")
        self.offline = bool(hparams.get("offline", False))
        self.vocab_size = getattr(getattr(module, "target_config", None), "vocab_size", None)

    def setup_blocks(self, stage: str | None = None) -> None:
        """The plain ``TextDataModule`` blocks, without opening the cache (what ``precompute`` runs over)."""
        TextDataModule.setup(self, stage)

    def setup(self, stage: str | None = None) -> None:
        if self.readers or (self.train_set is not None and isinstance(self.train_set, CachedBlockDataset)):
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.source_specs is None:
            if module is None:
                raise RuntimeError("CachedTextDataModule needs the FusionModule: call `datamodule.bind(module)` first.")
            self.bind(module)
        self.setup_blocks(stage)
        if not self.source_specs:
            log.warning("the module declares no sources: CachedTextDataModule reads no cache")
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else None  # where sources would run
        identities = {s.name: source_identity(s, self.tokenizer, device) for s in self.source_specs}
        self.train_set = self._attach("train", self.train_set, identities)
        if self.offline:
            self.val_set = self._attach("val", self.val_set, identities)

    def _global_rank(self) -> int:
        trainer = self.trainer
        return int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0

    def _attach(self, split: str, blocks: Dataset, identities: dict[str, dict[str, Any]]) -> CachedBlockDataset:
        root = split_root(self.cache_root, split)
        if not (root / "manifest.json").exists():
            why = " (`model.offline: true` validates on cached outputs)" if split == "val" else ""
            raise CacheIncompleteError(
                f"no {split} cache at {root}{why}: run `lightning-fuse precompute --config <your config>` first"
                + (" (without `--val false`)" if split == "val" else "")
                + ", or point `--data.init_args.cache_dir` to the cache"
            )
        expect = expected_identities(self.source_specs, blocks, identities)
        reader = CacheReader(root, expect=expect, seq_len=self.block_size, vocab_size=self.vocab_size)
        k = self.distill_top_k
        if k is not None and reader.top_k < k:
            raise CacheMismatchError(
                f"cache at {root} keeps the top {reader.top_k} ids per token but `--model.distill_top_k` is {k}: "
                f"rerun `lightning-fuse precompute --top_k {k} --overwrite true`, or lower `distill_top_k`"
            )
        if self.verify and self._global_rank() == 0:  # the other ranks check sizes only (CacheReader)
            reader.verify(remember=True)
        self.readers[split] = reader
        names = [s.name for s in self.source_specs]
        log.info("%s: cached outputs of %s from %s (top-%d)", split, ", ".join(names), root, reader.top_k)
        return CachedBlockDataset(blocks, CachedSourcesDataset(reader, names), k if k != reader.top_k else None)
