"""Datasets of fixed-length blocks with a domain tag per block: in memory (``BlockDataset``) or memory-mapped from a
tokenised store (``StoredBlockDataset``). Both give the same samples and expose ``blocks`` (indexable like an
``[S, L]`` tensor), ``domains`` and ``fingerprint`` (the ``data_id`` an offline cache records)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_fuse.cache import data_fingerprint
from lightning_fuse.data.store import BlockStore


def _sample(ids: torch.Tensor, labels: torch.Tensor, domain: Any, index: int) -> dict[str, Any]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "domain": domain,
            "index": int(index)}


class BlockDataset(Dataset):
    """Fixed-length blocks ``[S, L]`` with a domain index per block, in memory (optional ``labels``, -100 = no loss)."""

    def __init__(self, blocks: torch.Tensor, domains: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.blocks = blocks
        self.domains = domains
        self.labels = labels

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        ids = self.blocks[idx]
        return _sample(ids, ids if self.labels is None else self.labels[idx], self.domains[idx], idx)

    @property
    def label_blocks(self) -> torch.Tensor | None:
        return self.labels

    @cached_property
    def fingerprint(self) -> str:
        return data_fingerprint(self.blocks if self.labels is None else torch.cat([self.blocks, self.labels], 1))


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one stored part, tagged with domain index ``domain``."""

    domain_name: str
    part: str
    start: int
    stop: int
    domain: int

    def __len__(self) -> int:
        return self.stop - self.start


class _Rows:
    """Zero-copy numpy views ``[n, L]`` of a stored column's Arrow chunks (memory-mapped), and row lookup."""

    def __init__(self, dataset: Any, column: str, block_size: int) -> None:
        arrow = dataset.data.column(column)
        self.chunks = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, block_size) for c in arrow.chunks]
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks])

    def take(self, rows: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        if len(self.chunks) == 1:
            return self.chunks[0][rows]
        out = np.empty((len(rows), self.chunks[0].shape[1]), dtype=self.chunks[0].dtype)
        for c in np.unique(which):
            sel = which == c
            out[sel] = self.chunks[c][rows[sel] - self.offsets[c]]
        return out


class StoredBlockDataset(Dataset):
    """Blocks read lazily from a :class:`BlockStore`: the concatenation of ``segments`` (in that order), optionally
    reordered by ``order`` (positions into the concatenation). Nothing is loaded up front: a sample reads one row of
    a memory-mapped Arrow file."""

    def __init__(self, store: BlockStore, segments: Sequence[Segment], order: np.ndarray | None = None) -> None:
        self.store = store
        self.segments = list(segments)
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        self.offsets = np.cumsum([0] + [len(s) for s in self.segments])
        self._rows: dict[tuple[str, str, str], _Rows] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.order is None else len(self.order)

    @property
    def block_size(self) -> int:
        return self.store.block_size

    def _view(self, seg: Segment, column: str) -> _Rows:
        key = (seg.domain_name, seg.part, column)
        if key not in self._rows:
            self._rows[key] = _Rows(self.store.dataset(seg.domain_name, seg.part), column, self.block_size)
        return self._rows[key]

    def gather(self, indices: np.ndarray, column: str = "input_ids") -> np.ndarray:
        """Rows at dataset positions ``indices`` ``[n, L]`` int32 (one vectorised lookup per segment)."""
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(pos) and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"block index out of range for {len(self)} blocks")
        pos = np.where(pos < 0, pos + len(self), pos)
        if self.order is not None:
            pos = self.order[pos]
        which = np.searchsorted(self.offsets, pos, side="right") - 1
        out = np.empty((len(pos), self.block_size), dtype=np.int32)
        for s in np.unique(which):
            sel = which == s
            seg = self.segments[s]
            out[sel] = self._view(seg, column).take(pos[sel] - self.offsets[s] + seg.start)
        return out

    def _segments_of(self, indices: np.ndarray) -> np.ndarray:
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        pos = np.where(pos < 0, pos + len(self), pos)
        if self.order is not None:
            pos = self.order[pos]
        return np.searchsorted(self.offsets, pos, side="right") - 1

    @property
    def has_pieces(self) -> bool:
        """Whether the blocks are chat blocks with pieces (`chat_rows`)."""
        return self.store.has_pieces

    def chat_rows(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> list[Any] | None:
        """The `lightning_fuse.alignment.ChatRow` of the blocks at dataset positions ``indices`` (each token's piece
        and conversation, and the conversations' messages), for sources that read chat data with their own
        template; None when the blocks are not chat blocks."""
        if not self.has_pieces:
            return None
        from lightning_fuse.alignment.chat import ChatRow

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        pieces, conv = self.gather(idx, "piece"), self.gather(idx, "conv")
        rows = []
        for j, s in enumerate(self._segments_of(idx)):
            seg = self.segments[s]
            rows.append(ChatRow(pieces[j], conv[j], _Messages(self.store, seg.domain_name, seg.part)))
        return rows

    def domain_of(self, indices: np.ndarray) -> np.ndarray:
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.order is not None:
            pos = self.order[pos]
        which = np.searchsorted(self.offsets, pos, side="right") - 1
        return np.asarray([s.domain for s in self.segments], dtype=np.int64)[which]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = np.asarray([int(i) for i in indices], dtype=np.int64)
        ids = torch.from_numpy(self.gather(idx).astype(np.int64))
        labels = torch.from_numpy(self.gather(idx, "labels").astype(np.int64)) if self.store.has_labels else ids
        domains = torch.from_numpy(self.domain_of(idx))
        return [_sample(ids[j], labels[j], domains[j], int(i)) for j, i in enumerate(idx)]

    @property
    def blocks(self) -> BlockView:
        return BlockView(self)

    @property
    def label_blocks(self) -> BlockView | None:
        """The labels like ``blocks`` (chat data: -100 outside the assistant replies); None when labels = ids."""
        return BlockView(self, "labels") if self.store.has_labels else None

    @property
    def domains(self) -> torch.Tensor:
        """Domain index per block ``[S]`` (built on demand: 8 bytes per block)."""
        return torch.from_numpy(self.domain_of(np.arange(len(self))))

    @property
    def fingerprint(self) -> str:
        """The ``data_id`` of these blocks, from the store's content digests (sha256 of every stored block, taken
        when it was built): no pass over the data."""
        h = hashlib.sha256(json.dumps({
            "block_size": self.block_size,
            "segments": [[self.store.digest(s.domain_name, s.part), s.start, s.stop] for s in self.segments],
        }).encode())
        if self.order is not None:
            h.update(np.ascontiguousarray(self.order, dtype="<i8").tobytes())
        return "sha256:" + h.hexdigest()

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the memory maps
        return {**self.__dict__, "_rows": {}}


@dataclass(frozen=True)
class _Messages:
    """Conversation ``conv`` of a stored part -> its messages."""

    store: BlockStore
    domain: str
    part: str

    def __call__(self, conv: int) -> list[dict[str, Any]]:
        return json.loads(self.store.conversations(self.domain, self.part)[int(conv)]["messages"])


class BlockView:
    """``dataset.blocks`` of a ``StoredBlockDataset``: indexable like an ``[S, L]`` int64 tensor (an int, a slice,
    index or boolean tensors/arrays), reading only the rows asked for."""

    def __init__(self, dataset: StoredBlockDataset, column: str = "input_ids") -> None:
        self.dataset = dataset
        self.column = column

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.dataset), self.dataset.block_size))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> torch.Tensor:
        n = len(self.dataset)
        if isinstance(key, int):
            return self[np.asarray([key])][0]
        if isinstance(key, slice):
            pos = np.arange(*key.indices(n))
        else:
            arr = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
            pos = np.flatnonzero(arr) if arr.dtype == bool else arr.astype(np.int64)
        return torch.from_numpy(self.dataset.gather(pos, self.column).astype(np.int64))

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self[start : start + 4096]


def interleave_order(lengths: Sequence[int]) -> np.ndarray:
    """Positions into the concatenation of segments of ``lengths``, round-robin over them (row i of every segment,
    then row i + 1, ...)."""
    offsets = np.cumsum([0, *lengths])
    rank = np.concatenate([np.arange(n) for n in lengths]) if lengths else np.zeros(0, np.int64)
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]) if lengths else np.zeros(0, np.int64)
    order = np.lexsort((seg, rank))
    return (np.arange(offsets[-1])[order]).astype(np.int64)
