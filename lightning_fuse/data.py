"""Text data for fusion: local .txt/.jsonl files, tokenised with the target tokenizer, packed into blocks.

Layout of ``data_dir``: one sub-folder per domain (``<data_dir>/<domain>/*.txt|*.jsonl``); files directly in
``data_dir`` belong to the domain ``default``. A domain folder holding ``train.*`` and ``val.*`` files uses them as
the split; otherwise the last ``val_fraction`` of its blocks is held out. Every block comes from one domain, so
validation reports per-domain perplexity.

A batch is a dict: ``input_ids`` ``[B, L]`` int64, ``attention_mask`` ``[B, L]``, ``labels`` ``[B, L]`` (= input ids),
``domain`` ``[B]`` int64 index into ``datamodule.domains``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
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

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[idx]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "domain": self.domains[idx]}


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """Documents of one .txt (one document) or .jsonl (one per line, ``text_field``) file."""
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 (invalid byte at offset {err.start}). Convert it, e.g. `iconv -f latin1 -t utf-8`."
        ) from err
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
    """Tokenise, join documents with EOS and cut into ``[n, block_size]`` blocks (the tail is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
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
        text_field: JSON field holding the text in .jsonl files.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
    """

    def __init__(
        self,
        data_dir: str,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        max_blocks_per_domain: int | None = None,
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
        self.val_set = _concat(val)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=gen, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _concat(parts: list[tuple[torch.Tensor, int]]) -> BlockDataset:
    blocks = torch.cat([b for b, _ in parts])
    domains = torch.cat([torch.full((len(b),), d, dtype=torch.long) for b, d in parts])
    return BlockDataset(blocks, domains)
