"""Tokenise once, stream always: packed blocks stored on disk per tokenizer and data version, read memory-mapped.

A store is a folder of Hugging Face ``datasets`` (Arrow files, memory-mapped when read)::

    <tokenized_dir>/<key>/store.json          what it was built from (tokenizer, block size, inputs), per part: rows, sha256
    <tokenized_dir>/<key>/<domain>/           a DatasetDict: "train" and "val" (the domain's train.* / val.* files),
                                              or "all" (held out by the data module); columns input_ids
                                              int32 [block_size] (chat data: also labels, piece and conv,
                                              int32 [block_size] each, see CHAT_COLUMNS)
    <tokenized_dir>/<key>/_conversations/<domain>/   chat data: the conversations (column messages, JSON text)

``<key>`` hashes everything the blocks depend on (the tokenizer's full definition, the block size, the fields read,
each input file's path, size and modification time, or a Hugging Face dataset's fingerprint), so a change in any of
them builds a new store and an unchanged corpus is never tokenised again. Read one with the library's own tools::

    import datasets
    blocks = datasets.load_from_disk("<tokenized_dir>/<key>/<domain>")["train"]   # blocks[0]["input_ids"]

Building: documents stream from the files into Arrow (``Dataset.from_generator``, a .txt file in pieces), are
tokenised in ``num_proc`` processes (``Dataset.map``, with its progress bar), then packed in order (documents joined
by EOS, cut into blocks, the tail dropped: what ``pack`` gives in memory). Every step streams through Arrow files,
so memory does not grow with the corpus. One process builds (a file lock), the others wait and read; the store
appears atomically (built in a temporary folder, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lightning_fuse.data.chat import encode_chat
from lightning_fuse.data.texts import PIECE_CHARS, iter_records, split_text

log = logging.getLogger(__name__)

STORE_VERSION = 1
META = "store.json"
CONVERSATIONS = "_conversations"  # chat stores: <root>/_conversations/<domain>/<part>, one conversation per row
_BATCH = 64  # rows per map call (a row holds about PIECE_CHARS characters)
_TEXT_BATCH = 128  # dataset rows (one document each) per map call
CALL_CHARS = 1 << 20  # characters per tokenizer call
# chat stores: per token its labels (-100 outside the replies), its piece (chat.py) and its conversation's row
CHAT_COLUMNS = ("input_ids", "labels", "piece", "conv")
CHAT_VERSION = 2  # 2: piece and conv columns, conversations kept


@dataclass
class PartInput:
    """One packed stream to build: a domain's ``train``, ``val`` or ``all`` documents.

    ``docs(cache_dir)`` returns a ``datasets.Dataset`` of documents with a column ``texts`` + ``eos`` (pieces,
    EOS after those flagged), ``text`` (one document per row) or ``messages`` (one conversation per row);
    ``signature`` is what identifies its content (enters the store key).
    """

    domain: str
    part: str
    docs: Callable[[Path], Any]
    signature: Any
    num_bytes: int = 0


def _list_column(rows: list[np.ndarray]) -> Any:
    """Variable-length int32 rows as one Arrow list column (no Python ints in between)."""
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(pa.list_(pa.int32()))


@dataclass
class Encoder:
    """Tokenises a batch of document rows (picklable: it runs in ``Dataset.map``'s processes)."""

    tokenizer: PreTrainedTokenizerBase
    column: str
    where: str = "messages"

    def __call__(self, batch: dict[str, list], indices: list[int]) -> Any:
        import pyarrow as pa

        if self.column == "messages":
            ids, labels, pieces = encode_chat(self.tokenizer, batch["messages"], self.where, pieces=True)
            convs = [np.full(len(r), i, dtype=np.int32) for r, i in zip(ids, indices)]
            return pa.table({"input_ids": _list_column(ids), "labels": _list_column(labels),
                             "piece": _list_column(pieces), "conv": _list_column(convs)})
        tok = self.tokenizer
        eos = np.asarray([tok.eos_token_id] if tok.eos_token_id is not None else [], dtype=np.int32)
        if self.column == "text":  # one document per row: long ones in pieces
            texts = [split_text(t if t is not None else "") for t in batch["text"]]
            flags = [[i == len(row) - 1 for i in range(len(row))] for row in texts]
        else:
            texts, flags = batch["texts"], batch["eos"]
        flat = [t for row in texts for t in row]
        enc = iter(_tokenize(tok, flat))
        out = []
        for row_flags in flags:
            parts = []
            for last in row_flags:
                parts.append(np.asarray(next(enc), dtype=np.int32))
                if last:
                    parts.append(eos)
            out.append(np.concatenate(parts) if parts else np.zeros(0, np.int32))
        return pa.table({"input_ids": _list_column(out)})


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Iterator[list[int]]:
    """Token ids of each text, tokenised ``CALL_CHARS`` characters at a time (the tokenizer's encodings cost ~150
    bytes per token while they live)."""
    start = 0
    while start < len(texts):
        stop, size = start, 0
        while stop < len(texts) and (stop == start or size + len(texts[stop]) <= CALL_CHARS):
            size += len(texts[stop])
            stop += 1
        # verbose=False: documents longer than the model's max length are expected (they are cut into blocks);
        # split_special_tokens: data text is literal, '<eos>' in a document is characters, not a control token
        yield from tokenizer(texts[start:stop], add_special_tokens=False, verbose=False,
                             split_special_tokens=True)["input_ids"]
        start = stop


@dataclass
class Packer:
    """Joins tokenised rows in order and cuts them into blocks (run in one process: it carries the remainder)."""

    block_size: int
    labels: bool
    rows: int = 0
    carry: dict[str, np.ndarray] = field(default_factory=dict)
    digest: Any = field(default_factory=hashlib.sha256)

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        cols = CHAT_COLUMNS if self.labels else ("input_ids",)
        flat = {c: np.concatenate([self.carry.get(c, np.zeros(0, np.int32)),
                                   table.column(c).combine_chunks().flatten().to_numpy()]) for c in cols}
        n = len(flat["input_ids"]) // self.block_size
        cut = n * self.block_size
        self.carry = {c: v[cut:].copy() for c, v in flat.items()}
        out = {}
        for c in cols:
            block = np.ascontiguousarray(flat[c][:cut], dtype="<i4")
            self.digest.update(block.tobytes())
            out[c] = pa.FixedSizeListArray.from_arrays(pa.array(block), self.block_size)
        self.rows += n
        return pa.table(out)


def tokenizer_definition_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of everything that decides the token ids: the fast tokenizer's full JSON (normalizer, pre-tokenizer,
    model, added tokens) or the vocabulary, plus EOS and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


@contextmanager
def _progress(show: bool) -> Iterator[None]:
    """``datasets``' progress bars on a terminal only (a log file would get every carriage-return update)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not show:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    from filelock import FileLock

    with FileLock(str(path)):
        yield


def _features(block_size: int | None, labels: bool) -> Any:
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List
    column = List(Value("int32"), length=block_size) if block_size else List(Value("int32"))
    return Features({c: column for c in (CHAT_COLUMNS if labels else ("input_ids",))})


class BlockStore:
    """A built store: its parts as memory-mapped ``datasets.Dataset`` objects."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta: dict[str, Any] = json.loads((self.root / META).read_text())
        self.block_size: int = self.meta["block_size"]
        self.has_labels: bool = self.meta["labels"]
        self.has_pieces: bool = self.meta.get("chat", 0) >= 2  # chat blocks with piece / conv columns
        self._open: dict[tuple[str, str], Any] = {}

    def rows(self, domain: str, part: str) -> int:
        return self.meta["parts"][domain][part]["rows"]

    def digest(self, domain: str, part: str) -> str:
        return self.meta["parts"][domain][part]["sha256"]

    def parts(self, domain: str) -> list[str]:
        return list(self.meta["parts"][domain])

    def dataset(self, domain: str, part: str) -> Any:
        if (domain, part) not in self._open:
            from datasets import load_from_disk

            self._open[(domain, part)] = load_from_disk(str(self.root / domain / part))
        return self._open[(domain, part)]

    def conversations(self, domain: str, part: str) -> Any:
        """The conversations of a chat store's part (column ``messages``, JSON text), row ``i`` = ``conv`` ``i``."""
        if ("conversations", domain, part) not in self._open:
            from datasets import load_from_disk

            self._open[("conversations", domain, part)] = load_from_disk(str(self.root / CONVERSATIONS / domain / part))
        return self._open[("conversations", domain, part)]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the memory maps
        return {**self.__dict__, "_open": {}}

    @staticmethod
    def exists(tokenized_dir: Path, inputs: list[PartInput], tokenizer: PreTrainedTokenizerBase, block_size: int,
               column: str, settings: dict[str, Any] | None = None) -> bool:
        """Whether the store of these inputs is built already."""
        return (Path(tokenized_dir) / _key(inputs, tokenizer, block_size, column, settings)[1] / META).is_file()

    @classmethod
    def build_or_open(
        cls,
        tokenized_dir: Path,
        inputs: list[PartInput],
        tokenizer: PreTrainedTokenizerBase,
        block_size: int,
        column: str,
        num_proc: int | None = None,
        settings: dict[str, Any] | None = None,
    ) -> BlockStore:
        """The store of ``inputs`` tokenised with ``tokenizer`` in blocks of ``block_size``: opened when it exists,
        else built (by one process; concurrent callers wait for it)."""
        key_source, key = _key(inputs, tokenizer, block_size, column, settings)
        tokenized_dir = Path(tokenized_dir)
        root = tokenized_dir / key
        if (root / META).is_file():
            return cls(root)
        tokenized_dir.mkdir(parents=True, exist_ok=True)
        with _lock(tokenized_dir / f"{key}.lock"):
            if not (root / META).is_file():
                _build(root, key_source, inputs, tokenizer, block_size, column, num_proc)
        return cls(root)


def _key(inputs: list[PartInput], tokenizer: PreTrainedTokenizerBase, block_size: int, column: str,
         settings: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    key_source = {
        "version": STORE_VERSION, "tokenizer": tokenizer_definition_hash(tokenizer), "block_size": block_size,
        "column": column, "settings": settings or {}, "inputs": [[p.domain, p.part, p.signature] for p in inputs],
        **({"chat": CHAT_VERSION} if column == "messages" else {}),
    }
    return key_source, hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _auto_num_proc(inputs: list[PartInput], tokenizer: PreTrainedTokenizerBase) -> int:
    """Processes for tokenisation: one for a fast tokenizer (its Rust encoder already spreads each batch over the
    cores; measured in benchmarks/scale.py) or a small corpus, else one per core (at most 8)."""
    total = sum(p.num_bytes for p in inputs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if getattr(tokenizer, "is_fast", False) or total < 8 << 20:
        return 1
    return max(1, min(8, cores))


def _build(
    root: Path, key_source: dict[str, Any], inputs: list[PartInput], tokenizer: PreTrainedTokenizerBase,
    block_size: int, column: str, num_proc: int | None,
) -> None:
    from datasets import DatasetDict

    tmp = root.parent / f"{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    work = tmp / "_work"
    work.mkdir(parents=True)
    procs = num_proc or _auto_num_proc(inputs, tokenizer)
    labels = column == "messages"
    start = time.perf_counter()
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    built: dict[str, dict[str, Any]] = {}
    conversations: dict[str, dict[str, Any]] = {}
    try:
        with _progress(sys.stderr.isatty()):
            for p in inputs:
                docs = _unwrap_generation_error(lambda p=p: p.docs(work / f"{p.domain}-{p.part}-docs"))
                n_docs = len(docs)
                encode = Encoder(tokenizer, column, where=f"{p.domain}/{p.part}")
                cols = [c for c in docs.column_names]
                tok = docs.map(
                    encode, batched=True, with_indices=True, batch_size=_TEXT_BATCH if column == "text" else _BATCH,
                    writer_batch_size=_BATCH, remove_columns=cols,
                    num_proc=procs if procs > 1 and n_docs > 1 else None, features=_features(None, labels),
                    new_fingerprint=uuid.uuid4().hex, cache_file_name=str(work / f"{p.domain}-{p.part}-tok.arrow"),
                    desc=f"tokenising {p.domain}/{p.part}",
                )
                packer = Packer(block_size, labels)
                blocks = tok.with_format("arrow").map(
                    packer, batched=True, batch_size=16, remove_columns=tok.column_names,
                    features=_features(block_size, labels), new_fingerprint=uuid.uuid4().hex,
                    cache_file_name=str(work / f"{p.domain}-{p.part}-blocks.arrow"), desc=f"packing {p.domain}/{p.part}",
                )
                built.setdefault(p.domain, {})[p.part] = blocks.with_format(None)
                if labels:  # the conversations, for sources that render them with their own chat template
                    conversations.setdefault(p.domain, {})[p.part] = docs
                parts.setdefault(p.domain, {})[p.part] = {
                    "rows": packer.rows, "sha256": packer.digest.hexdigest(), "documents": n_docs,
                }
            for domain, splits in built.items():
                DatasetDict(splits).save_to_disk(str(tmp / domain))
            for domain, splits in conversations.items():
                DatasetDict(splits).save_to_disk(str(tmp / CONVERSATIONS / domain))
        shutil.rmtree(work)
        meta = {**key_source, "block_size": block_size, "labels": labels, "parts": parts, "num_proc": procs,
                "seconds": round(time.perf_counter() - start, 2)}
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rows = sum(v["rows"] for d in parts.values() for v in d.values())
    log.info("tokenised %d domain(s) into %d blocks of %d tokens in %.1f s (%d process%s): %s", len(parts), rows,
             block_size, time.perf_counter() - start, procs, "es" if procs > 1 else "", root)


def _unwrap_generation_error(make: Callable[[], Any]) -> Any:
    """``Dataset.from_generator`` wraps the reader's error (a bad file) in ``DatasetGenerationError``: raise the
    reader's own one-line error instead."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return make()
    except DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ValueError):
            raise cause from None
        raise


def file_rows(paths: list[str], field: str, messages: bool) -> Iterator[dict[str, Any]]:
    """Rows of documents from files for ``Dataset.from_generator``: pieces grouped up to ``PIECE_CHARS``
    characters per row (``texts`` + ``eos``), or one conversation per row (``messages``, as JSON text)."""
    if messages:
        empty = True
        for path in paths:
            for value, _ in iter_records(Path(path), field):
                empty = False
                yield {"messages": json.dumps(value)}
        if empty:  # files without a document: one empty row (then "too little text"), not a datasets error
            yield {"messages": "[]"}
        return
    texts: list[str] = []
    flags: list[bool] = []
    size, yielded = 0, False
    for path in paths:
        for piece, last in iter_records(Path(path), field):
            if not isinstance(piece, str):
                raise ValueError(f"{path}: the {field!r} field must be text, got {type(piece).__name__}.")
            texts.append(piece)
            flags.append(last)
            size += len(piece)
            if size >= PIECE_CHARS:
                yield {"texts": texts, "eos": flags}
                texts, flags, size, yielded = [], [], 0, True
    if texts or not yielded:
        yield {"texts": texts, "eos": flags}


def files_input(domain: str, part: str, paths: list[Path], field: str, messages: bool) -> PartInput:
    """A ``PartInput`` over local .txt/.jsonl files (signature: each file's path, size and modification time)."""

    def docs(cache_dir: Path) -> Any:
        from datasets import Dataset, Features, Value

        features = (Features({"messages": Value("string")}) if messages else
                    Features({"texts": [Value("string")], "eos": [Value("bool")]}))
        return Dataset.from_generator(
            file_rows, gen_kwargs={"paths": [str(p) for p in paths], "field": field, "messages": messages},
            cache_dir=str(cache_dir), features=features, writer_batch_size=_BATCH,
        )

    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return PartInput(domain, part, docs, stats, sum(s for _, s, _ in stats))
