"""Text data for fusion: local .txt/.jsonl files, tokenised with the target tokenizer, packed into blocks.

Layout of ``data_dir``: one sub-folder per domain (``<data_dir>/<domain>/*.txt|*.jsonl``); files directly in
``data_dir`` belong to the domain ``default``. A domain folder holding ``train.*`` and ``val.*`` files uses them as
the split; otherwise the last ``val_fraction`` of its blocks is held out. Every block comes from one domain, so
validation reports per-domain perplexity.

A batch is a dict: ``input_ids`` ``[B, L]`` int64, ``attention_mask`` ``[B, L]``, ``labels`` ``[B, L]`` (= input ids),
``domain`` ``[B]`` int64 index into ``datamodule.domains``, ``index`` ``[B]`` int64 the blocks' positions in the split,
and, when the module has sources with another tokenizer, ``aligned`` = ``{source name: AlignedBatch.as_dict()}``:
their alignment, computed by the DataLoader (in its workers when ``num_workers > 0``), off the training step.

The training order is a seeded shuffle per data epoch (``seed + epoch``), sharded over data-parallel ranks, that
resumes exactly: its position is the number of batches trained so far (Lightning's progress, saved in checkpoints), so
a fit resumed with ``ckpt_path`` continues with the very next batch, never repeating or skipping a block.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data.distributed import DistributedSampler
from transformers import PreTrainedTokenizerBase

from lightning_fuse.sources import resolve_path

log = logging.getLogger(__name__)
_SUFFIXES = (".txt", ".jsonl")


class BlockDataset(Dataset):
    """Fixed-length blocks ``[S, L]`` with a domain index per block."""

    def __init__(self, blocks: torch.Tensor, domains: torch.Tensor) -> None:
        self.blocks = blocks
        self.domains = domains

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        ids = self.blocks[idx]
        return {
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "domain": self.domains[idx],
            "index": int(idx),
        }


class ResumableSampler(DistributedSampler):
    """Seeded shuffle per data epoch (``seed + epoch``), sharded over ``num_replicas`` ranks, that resumes exactly.

    The training data is one stream: data epoch 0's permutation, then epoch 1's, ... Each ``__iter__`` starts where
    the stream stands: ``position()`` (the number of batches already trained on, from the trainer's progress, which
    checkpoints restore) gives the data epoch and the offset in it, so a resumed fit continues with the very next
    batch whatever Lightning's own epoch count says. Without ``position`` (no trainer), ``set_epoch`` picks the epoch.

    A ``DistributedSampler`` (so Lightning does not wrap it under DDP/FSDP), always with ``drop_last``: every rank gets
    ``len(dataset) // num_replicas`` samples and no sample is repeated within a data epoch. ``__len__`` stays the full
    epoch's, as Lightning expects from a resumed loader.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        position: Callable[[], int | None] | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.position = position

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The global order of data epoch ``epoch`` (before sharding), cut to a multiple of ``num_replicas``."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        return order[: self.total_size]

    def where(self) -> tuple[int, int]:
        """(data epoch, batches of it already trained on) where the next ``__iter__`` starts."""
        trained = self.position() if self.position is not None else None
        if trained is None:
            return self.epoch, 0
        return divmod(int(trained), self.batches_per_epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, done = self.where()
        self.epoch = epoch
        start = done * self.batch_size * self.num_replicas
        return iter(self.order(epoch)[start + self.rank :: self.num_replicas])


class AlignCollate:
    """``default_collate``, then each cross-tokenizer source's alignment of the batch (``batch["aligned"][name]``),
    so that the CPU work of alignment runs in the DataLoader (its workers) instead of inside the training step.

    Deterministic: a resumed fit gets the same batches. Sources are aligned in the step when a batch has none.
    """

    def __init__(self, aligners: dict) -> None:
        self.aligners = aligners

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        batch["aligned"] = {name: aligner(batch) for name, aligner in self.aligners.items()}
        return batch


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning recognises as resumable (it has ``state_dict`` / ``load_state_dict``).

    The position itself needs no state of its own: it comes from the trainer's progress (see ``ResumableSampler``).
    The state records the order's parameters, to warn when a checkpoint is resumed on other data.
    """

    def state_dict(self) -> dict[str, int | None]:
        return {"seed": getattr(self.sampler, "seed", None), "blocks": len(self.dataset), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        now = self.state_dict()
        if any(state.get(k, v) != v for k, v in now.items()):
            log.warning(
                "the training data changed since the checkpoint (%s then, %s now): the resumed fit does not continue "
                "the original order of batches", state, now,
            )


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """Documents of one .txt (one document) or .jsonl (one per line, ``text_field``) file."""
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 (invalid byte at offset {err.start}). Convert it, e.g. `iconv -f latin1 -t utf-8`."
        ) from err
    if "\x00" in content:
        raise ValueError(
            f"{path} holds NUL bytes (first at offset {content.index(chr(0))}): it is binary, not text. Remove it from "
            "the data folder, or convert it to UTF-8 text."
        )
    if path.suffix == ".txt":
        return [content]
    docs = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)[text_field])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} field ({err}).") from err
    return docs


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """Tokenise, join documents with EOS and cut into ``[n, block_size]`` blocks (the tail is dropped).

    Data text is read literally: characters such as ``<eos>`` or ``<|endoftext|>`` in a document are text, never a
    control token (``split_special_tokens``); the only control tokens in a block are the EOS placed between
    documents.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    # verbose=False: documents longer than the model's max length are expected here (they are cut into blocks)
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False, split_special_tokens=True)["input_ids"]:
        ids.extend(enc + eos)
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


class TextDataModule(pl.LightningDataModule):
    """Local text files, packed into blocks of the target tokenizer, with a domain tag per block.

    Args:
        data_dir: folder with one sub-folder per domain (``demo://corpus`` for the embedded demo's data).
        block_size: tokens per block; must not exceed the target's maximum positions.
        batch_size: blocks per batch (per device).
        val_fraction: share of each domain's blocks held out when it has no ``val.*`` file.
        max_blocks_per_domain: cap on training blocks per domain (None = all), to keep domains balanced.
        max_val_blocks_per_domain: cap on validation blocks per domain (None = all). Validation blocks are
            interleaved across domains, so ``limit_val_batches`` also keeps every domain.
        text_field: JSON field holding the text in .jsonl files.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle (epoch ``e`` is shuffled with ``seed + e``).
    """

    def __init__(
        self,
        data_dir: str,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        max_blocks_per_domain: int | None = None,
        max_val_blocks_per_domain: int | None = None,
        text_field: str = "text",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if block_size < 2:
            problems.append(f"`--data.block_size` must be >= 2, got {block_size}.")
        if batch_size < 1:
            problems.append(f"`--data.batch_size` must be >= 1, got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            problems.append(f"`--data.val_fraction` must be between 0 and 1, got {val_fraction}.")
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
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.domains: list[str] = []
        self.train_set: BlockDataset | None = None
        self.val_set: BlockDataset | None = None

    def connect(self, tokenizer: PreTrainedTokenizerBase, max_seq_length: int | None = None) -> None:
        """Late binding of the target tokenizer (and its position limit), done by the module/CLI."""
        if max_seq_length is not None and self.block_size > max_seq_length:
            raise ValueError(
                f"`--data.block_size` is {self.block_size} but the target model supports {max_seq_length} positions. "
                f"Set `--data.block_size` to at most {max_seq_length}."
            )
        self.tokenizer = tokenizer

    def _domain_files(self) -> dict[str, list[Path]]:
        root = Path(resolve_path(self.data_dir))
        if not root.is_dir():
            raise FileNotFoundError(f"`--data.data_dir` {str(root)!r} is not a folder. Point it to your text files.")
        found: dict[str, list[Path]] = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in _SUFFIXES:
                rel = path.relative_to(root)
                found.setdefault(rel.parts[0] if len(rel.parts) > 1 else "default", []).append(path)
        if not found:
            raise ValueError(
                f"`--data.data_dir` {str(root)!r} holds no .txt or .jsonl files. Add files (one sub-folder per domain)."
            )
        return found

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.tokenizer is None and module is not None and hasattr(module, "tokenizer"):
            self.connect(module.tokenizer, getattr(module, "max_seq_length", None))
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule has no tokenizer: call `datamodule.connect(tokenizer)` first.")
        files = self._domain_files()
        self.domains = sorted(files)
        train, val = [], []
        for d, domain in enumerate(self.domains):
            split = {"train": [p for p in files[domain] if p.stem == "train"], "val": [p for p in files[domain] if p.stem == "val"]}
            if split["train"] and split["val"]:
                others = [p for p in files[domain] if p.stem not in ("train", "val")]
                for p in others:  # not used, but a broken file is an error, not silently skipped
                    read_texts(p, self.text_field)
                if others:
                    log.warning("domain %r has train.* and val.* files, so %s %s not used (rename to train.*/val.* "
                                "to use them)", domain, ", ".join(str(p) for p in others),
                                "is" if len(others) == 1 else "are")
                tr = pack([t for p in split["train"] for t in read_texts(p, self.text_field)], self.tokenizer, self.block_size)
                va = pack([t for p in split["val"] for t in read_texts(p, self.text_field)], self.tokenizer, self.block_size)
            else:
                blocks = pack([t for p in files[domain] for t in read_texts(p, self.text_field)], self.tokenizer, self.block_size)
                n_val = max(1, int(round(len(blocks) * self.val_fraction)))
                tr, va = blocks[:-n_val], blocks[-n_val:]
            if len(tr) == 0 or len(va) == 0:
                raise ValueError(
                    f"Domain {domain!r} has too little text for one training and one validation block of "
                    f"{self.block_size} tokens. Add text or lower `--data.block_size`."
                )
            if self.max_blocks_per_domain is not None:
                tr = tr[: self.max_blocks_per_domain]
            if self.max_val_blocks_per_domain is not None:
                va = va[: self.max_val_blocks_per_domain]
            if len(tr) < self.batch_size:
                log.warning("domain %r has %d training blocks, fewer than batch_size=%d", domain, len(tr), self.batch_size)
            train.append((tr, d))
            val.append((va, d))
            log.info("domain %r: %d train / %d val blocks of %d tokens", domain, len(tr), len(va), self.block_size)
        self.train_set = _concat(train)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"Only {len(self.train_set)} training blocks for `--data.batch_size` {self.batch_size}. "
                "Add text, or lower the batch size or the block size."
            )
        self.val_set = _interleave(_concat(val))

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
            generator=self._generator(), collate_fn=self._collate(),
        )

    def _collate(self) -> AlignCollate | None:
        """`AlignCollate` for the module's cross-tokenizer sources (None: the default collate)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        aligners = {s.name: s.aligner for s in getattr(module, "sources", None) or [] if s.aligner is not None}
        return AlignCollate(aligners) if aligners else None

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
                          generator=self._generator(), collate_fn=self._collate())

    def _generator(self) -> torch.Generator:
        """The loaders' own generator: iterating a loader then draws its worker seed from it, not from the global
        RNG, so that data loading never shifts the random numbers of training (a resumed fit draws the same ones)."""
        return torch.Generator().manual_seed(self.seed)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _interleave(data: BlockDataset) -> BlockDataset:
    """Round-robin order over domains (block i of every domain, then block i + 1, ...)."""
    rank = torch.zeros(len(data.domains), dtype=torch.long)
    for d in data.domains.unique():
        where = (data.domains == d).nonzero().squeeze(-1)
        rank[where] = torch.arange(len(where))
    order = sorted(range(len(rank)), key=lambda i: (int(rank[i]), int(data.domains[i])))
    return BlockDataset(data.blocks[order], data.domains[order])


def _concat(parts: list[tuple[torch.Tensor, int]]) -> BlockDataset:
    blocks = torch.cat([b for b, _ in parts])
    domains = torch.cat([torch.full((len(b),), d, dtype=torch.long) for b, d in parts])
    return BlockDataset(blocks, domains)
