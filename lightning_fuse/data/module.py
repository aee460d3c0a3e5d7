"""``TextDataModule`` / ``ChatDataModule``: text or conversations, tokenised once with the target tokenizer into
packed blocks on disk (``lightning_fuse.data.store``), read memory-mapped, with a domain tag per block.

Inputs: a folder ``data_dir`` with one sub-folder per domain (``<data_dir>/<domain>/*.txt|*.jsonl``; files directly
in ``data_dir`` belong to the domain ``default``), or Hugging Face datasets (``dataset``: a local file, a
``save_to_disk`` folder or a hub id; one, or one per domain; ``domain_field`` takes the domain from a column). A
domain with ``train.*`` and ``val.*`` files (a dataset with a ``validation`` split) uses them as the split; otherwise
the last ``val_fraction`` of its blocks is held out. Every block comes from one domain, so validation reports
per-domain perplexity.

A batch is a dict: ``input_ids`` ``[B, L]`` int64, ``attention_mask`` ``[B, L]``, ``labels`` ``[B, L]`` (= input ids;
for chat data -100 outside the assistant replies), ``domain`` ``[B]`` int64 index into ``datamodule.domains``,
``index`` ``[B]`` int64 the blocks' positions in the split, and, when the module has sources with another tokenizer,
``aligned`` = ``{source name: AlignedBatch.as_dict()}``: their alignment, computed by the DataLoader (in its
workers when ``num_workers > 0``), off the training step.

The training order is a seeded shuffle per data epoch (``seed + epoch``), sharded over data-parallel ranks, that
resumes exactly: its position is the number of batches trained so far (Lightning's progress, saved in checkpoints), so
a fit resumed with ``ckpt_path`` continues with the very next batch, never repeating or skipping a block.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_fuse.data.blocks import Segment, StoredBlockDataset, interleave_order
from lightning_fuse.data.chat import check_chat_tokenizer
from lightning_fuse.data.collate import AlignCollate
from lightning_fuse.data.hf import hf_inputs
from lightning_fuse.data.sampler import ResumableLoader, ResumableSampler
from lightning_fuse.data.store import BlockStore, PartInput, files_input
from lightning_fuse.data.texts import domain_files, iter_records
from lightning_fuse.paths import resolve_path

log = logging.getLogger(__name__)

CACHE_ENV = "LIGHTNING_FUSE_CACHE"


def default_tokenized_dir() -> Path:
    """``$LIGHTNING_FUSE_CACHE/blocks``, by default ``~/.cache/lightning_fuse/blocks`` (for Hugging Face inputs)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_fuse") / "blocks"


class TextDataModule(pl.LightningDataModule):
    """Text (or conversations) packed into blocks of the target tokenizer, tokenised once to disk, domain-tagged.

    Args:
        data_dir: folder with one sub-folder per domain (``demo://corpus`` for the embedded demo's data).
        block_size: tokens per block; must not exceed the target's maximum positions.
        batch_size: blocks per batch (per device).
        val_fraction: share of each domain's blocks held out when it has no ``val.*`` file / validation split.
        max_blocks_per_domain: cap on training blocks per domain (None = all), to keep domains balanced.
        max_val_blocks_per_domain: cap on validation blocks per domain (None = all). Validation blocks are
            interleaved across domains, so ``limit_val_batches`` also keeps every domain.
        text_field: JSON field (.jsonl files) or dataset column holding the text.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle (epoch ``e`` is shuffled with ``seed + e``).
        dataset: Hugging Face dataset(s) instead of ``data_dir``: a local .parquet/.json/.jsonl/.arrow/.csv/.txt
            file, a folder saved with ``save_to_disk`` or of such files, or a hub id; a mapping ``{domain: dataset}``
            for one dataset per domain.
        domain_field: column holding each row's domain (datasets only; default: one domain per dataset).
        messages_field: field / column holding conversations (a list of ``{"role", "content"}``): chat data,
            rendered with the target's chat template, the loss on the assistant replies only.
        train_split: the datasets' training split.
        val_split: the datasets' validation split (default ``validation`` / ``val`` / ``valid`` if present, else
            ``val_fraction`` of the blocks is held out).
        tokenized_dir: where the tokenised blocks are stored (default ``<data_dir>/.fuse_cache/blocks``, or
            ``$LIGHTNING_FUSE_CACHE/blocks`` for datasets).
        num_proc: processes that tokenise (default: 1 for a fast tokenizer, whose Rust encoder already uses
            every core, or a small corpus; else one per core up to 8).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        max_blocks_per_domain: int | None = None,
        max_val_blocks_per_domain: int | None = None,
        text_field: str = "text",
        num_workers: int = 0,
        seed: int = 0,
        dataset: str | dict[str, str] | None = None,
        domain_field: str | None = None,
        messages_field: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        tokenized_dir: str | None = None,
        num_proc: int | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if block_size < 2:
            problems.append(f"`--data.block_size` must be >= 2, got {block_size}.")
        if batch_size < 1:
            problems.append(f"`--data.batch_size` must be >= 1, got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            problems.append(f"`--data.val_fraction` must be between 0 and 1, got {val_fraction}.")
        if (data_dir is None) == (dataset is None):
            problems.append("Give exactly one of `--data.data_dir` (a folder of .txt/.jsonl files) and "
                            "`--data.dataset` (Hugging Face datasets).")
        if domain_field is not None and dataset is None:
            problems.append("`--data.domain_field` needs `--data.dataset` (a data_dir's domains are its sub-folders).")
        if num_proc is not None and num_proc < 1:
            problems.append(f"`--data.num_proc` must be >= 1, got {num_proc}.")
        if problems:
            raise ValueError(" ".join(problems))
        self.data_dir = data_dir
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_blocks_per_domain = max_blocks_per_domain
        self.max_val_blocks_per_domain = max_val_blocks_per_domain
        self.text_field = text_field
        self.num_workers = num_workers
        self.seed = seed
        self.dataset = dataset
        self.domain_field = domain_field
        self.messages_field = messages_field
        self.train_split = train_split
        self.val_split = val_split
        self.tokenized_dir = tokenized_dir
        self.num_proc = num_proc
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.domains: list[str] = []
        self.store: BlockStore | None = None
        self.train_set: StoredBlockDataset | None = None
        self.val_set: StoredBlockDataset | None = None

    def connect(self, tokenizer: PreTrainedTokenizerBase, max_seq_length: int | None = None) -> None:
        """Late binding of the target tokenizer (and its position limit), done by the module/CLI."""
        if max_seq_length is not None and self.block_size > max_seq_length:
            raise ValueError(
                f"`--data.block_size` is {self.block_size} but the target model supports {max_seq_length} positions. "
                f"Set `--data.block_size` to at most {max_seq_length}."
            )
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------------------------------- inputs

    @property
    def column(self) -> str:
        """What a document row holds: ``messages`` (chat), else ``texts`` (file pieces) or ``text`` (datasets)."""
        return "messages" if self.messages_field else ("text" if self.dataset is not None else "texts")

    def _root(self) -> Path:
        root = Path(resolve_path(self.data_dir))
        if not root.is_dir():
            raise FileNotFoundError(f"`--data.data_dir` {str(root)!r} is not a folder. Point it to your text files.")
        return root

    def _domain_files(self) -> dict[str, list[Path]]:
        root = self._root()
        found = domain_files(root)
        if not found:
            raise ValueError(
                f"`--data.data_dir` {str(root)!r} holds no .txt or .jsonl files. Add files (one sub-folder per domain)."
            )
        return found

    def _inputs(self) -> tuple[dict[str, dict[str, PartInput]], list[Path]]:
        """``{domain: {part: PartInput}}`` and the files found but not used (checked when tokenising)."""
        field = self.messages_field or self.text_field
        if self.dataset is not None:
            datasets = self.dataset if isinstance(self.dataset, dict) else {"default": self.dataset}
            return hf_inputs(datasets, field, self.column, self.domain_field, self.train_split, self.val_split), []
        messages = self.messages_field is not None
        inputs: dict[str, dict[str, PartInput]] = {}
        unused: list[Path] = []
        for domain, files in self._domain_files().items():
            if messages and (txt := [p for p in files if p.suffix != ".jsonl"]):
                raise ValueError(f"{txt[0]}: chat data (`--data.messages_field`) reads .jsonl files only (one "
                                 "conversation per line). Convert it, or move it out of the data folder.")
            train = [p for p in files if p.stem == "train"]
            val = [p for p in files if p.stem == "val"]
            if train and val:
                others = [p for p in files if p.stem not in ("train", "val")]
                if others:
                    log.warning("domain %r has train.* and val.* files, so %s %s not used (rename to train.*/val.* "
                                "to use them)", domain, ", ".join(str(p) for p in others),
                                "is" if len(others) == 1 else "are")
                unused += others
                inputs[domain] = {"train": files_input(domain, "train", train, field, messages),
                                  "val": files_input(domain, "val", val, field, messages)}
            else:
                inputs[domain] = {"all": files_input(domain, "all", files, field, messages)}
        return inputs, unused

    def _tokenized_dir(self) -> Path:
        if self.tokenized_dir is not None:
            return Path(self.tokenized_dir).expanduser()
        if self.data_dir is not None:
            return self._root() / ".fuse_cache" / "blocks"
        return default_tokenized_dir()

    def open_store(self) -> BlockStore:
        """The tokenised blocks of the inputs, built once (in ``num_proc`` processes) and then only opened."""
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule has no tokenizer: call `datamodule.connect(tokenizer)` first.")
        if self.messages_field:
            check_chat_tokenizer(self.tokenizer)
        inputs, unused = self._inputs()
        flat = [p for parts in inputs.values() for p in parts.values()]
        unused_sig = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in unused]

        def check_unused() -> None:  # not used, but a broken file is an error, not silently skipped
            for p in unused:
                for _ in iter_records(p, self.messages_field or self.text_field):
                    pass

        if unused and not BlockStore.exists(self._tokenized_dir(), flat, self.tokenizer, self.block_size, self.column,
                                            {"unused": unused_sig}):
            check_unused()
        return BlockStore.build_or_open(self._tokenized_dir(), flat, self.tokenizer, self.block_size, self.column,
                                        self.num_proc, {"unused": unused_sig})

    # ------------------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.tokenizer is None and module is not None and hasattr(module, "tokenizer"):
            self.connect(module.tokenizer, getattr(module, "max_seq_length", None))
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule has no tokenizer: call `datamodule.connect(tokenizer)` first.")
        store = self.open_store()
        self.store = store
        self.domains = sorted(store.meta["parts"])
        train, val = [], []
        for d, domain in enumerate(self.domains):
            parts = store.parts(domain)
            if "all" in parts:
                n = store.rows(domain, "all")
                n_val = max(1, int(round(n * self.val_fraction))) if n else 0
                tr, va = Segment(domain, "all", 0, n - n_val, d), Segment(domain, "all", n - n_val, n, d)
            else:
                tr = Segment(domain, "train", 0, store.rows(domain, "train"), d)
                va = Segment(domain, "val", 0, store.rows(domain, "val"), d)
            if len(tr) <= 0 or len(va) <= 0:
                raise ValueError(
                    f"Domain {domain!r} has too little text for one training and one validation block of "
                    f"{self.block_size} tokens. Add text or lower `--data.block_size`."
                )
            if self.max_blocks_per_domain is not None:
                tr = Segment(domain, tr.part, tr.start, min(tr.stop, tr.start + self.max_blocks_per_domain), d)
            if self.max_val_blocks_per_domain is not None:
                va = Segment(domain, va.part, va.start, min(va.stop, va.start + self.max_val_blocks_per_domain), d)
            if len(tr) < self.batch_size:
                log.warning("domain %r has %d training blocks, fewer than batch_size=%d", domain, len(tr), self.batch_size)
            train.append(tr)
            val.append(va)
            log.info("domain %r: %d train / %d val blocks of %d tokens", domain, len(tr), len(va), self.block_size)
        self.train_set = StoredBlockDataset(store, train)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"Only {len(self.train_set)} training blocks for `--data.batch_size` {self.batch_size}. "
                "Add text, or lower the batch size or the block size."
            )
        self.val_set = StoredBlockDataset(store, val, interleave_order([len(s) for s in val]))

    # ------------------------------------------------------------------------------------------- loaders

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._data_parallel()
        sampler = ResumableSampler(
            self.train_set, self.batch_size, self.seed, num_replicas=replicas, rank=rank, position=self._batches_trained
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"Only {len(sampler)} training blocks per process ({len(self.train_set)} over {replicas} processes) "
                f"for `--data.batch_size` {self.batch_size}. Add text, or lower the batch size or the block size."
            )
        return ResumableLoader(
            self.train_set, self.batch_size, sampler=sampler, num_workers=self.num_workers, drop_last=True,
            generator=self._generator(), collate_fn=self._collate(self.train_set),
        )

    def _collate(self, dataset: Any) -> AlignCollate | None:
        """`AlignCollate` for the module's cross-tokenizer sources (None: the default collate)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        aligners = {s.name: s.aligner for s in getattr(module, "sources", None) or [] if s.aligner is not None}
        return AlignCollate(aligners, dataset) if aligners else None

    def _data_parallel(self) -> tuple[int, int]:
        """(number of data-parallel processes, this process' rank) from the trainer's strategy; (1, 0) without."""
        trainer = self.trainer
        if trainer is None or not getattr(trainer._accelerator_connector, "use_distributed_sampler", True):
            return 1, 0
        kwargs = trainer.distributed_sampler_kwargs or {}
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _batches_trained(self) -> int | None:
        """Training batches of this fit so far, resumed ones included (Lightning's progress, saved in checkpoints)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers,
                          generator=self._generator(), collate_fn=self._collate(self.val_set))

    def _generator(self) -> torch.Generator:
        """The loaders' own generator: iterating a loader then draws its worker seed from it, not from the global
        RNG, so that data loading never shifts the random numbers of training (a resumed fit draws the same ones)."""
        return torch.Generator().manual_seed(self.seed)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ChatDataModule(TextDataModule):
    """``TextDataModule`` for conversations: ``messages_field`` (default ``messages``) of each .jsonl line or dataset
    row is rendered with the target's chat template; the loss (CLM and distillation) is on the assistant replies only.

    What the sources read: a source with the target's tokenizer reads the very same tokens (the target's rendering).
    A source with another tokenizer *and a chat template* reads each conversation rendered with its own template:
    the same message contents, inside its own markers (``<start_of_turn>model`` where the target wrote
    ``<|im_start|>assistant``), aligned onto the target's tokens by the contents (``lightning_fuse.alignment.chat``;
    its end-of-turn marker maps onto the target's). A source with another tokenizer and no chat template reads the
    target's rendering re-tokenised: the markers that are the target's BOS / EOS / PAD / UNK become the source's own,
    other target control tokens (e.g. ``<|im_start|>``) are not read, the rest (role names, newlines) is text.
    """

    def __init__(self, data_dir: str | None = None, block_size: int = 128, batch_size: int = 8,
                 val_fraction: float = 0.1, max_blocks_per_domain: int | None = None,
                 max_val_blocks_per_domain: int | None = None, messages_field: str = "messages",
                 num_workers: int = 0, seed: int = 0, dataset: str | dict[str, str] | None = None,
                 domain_field: str | None = None, train_split: str = "train", val_split: str | None = None,
                 tokenized_dir: str | None = None, num_proc: int | None = None) -> None:
        super().__init__(
            data_dir, block_size=block_size, batch_size=batch_size, val_fraction=val_fraction,
            max_blocks_per_domain=max_blocks_per_domain, max_val_blocks_per_domain=max_val_blocks_per_domain,
            num_workers=num_workers, seed=seed, dataset=dataset, domain_field=domain_field,
            messages_field=messages_field, train_split=train_split, val_split=val_split,
            tokenized_dir=tokenized_dir, num_proc=num_proc,
        )
