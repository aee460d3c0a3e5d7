"""Local text files: finding them (``<data_dir>/<domain>/*.txt|*.jsonl``), reading them whole or in pieces, packing."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

SUFFIXES = (".txt", ".jsonl")
PIECE_CHARS = 1 << 16  # a .txt document is tokenised in pieces of about this many characters, cut after a newline


def _not_utf8(path: Path, offset: int) -> ValueError:
    return ValueError(
        f"{path} is not UTF-8 (invalid byte at offset {offset}). Convert it, e.g. `iconv -f latin1 -t utf-8`."
    )


def _has_nul(path: Path, offset: int) -> ValueError:
    return ValueError(
        f"{path} holds NUL bytes (first at offset {offset}): it is binary, not text. Remove it from "
        "the data folder, or convert it to UTF-8 text."
    )


def _bad_line(path: Path, lineno: int, field: str, err: Exception) -> ValueError:
    return ValueError(f"{path}:{lineno}: expected a JSON object with a {field!r} field ({err}).")


def split_text(text: str, size: int | None = None) -> list[str]:
    """``text`` in pieces of at most ``size`` characters (default ``PIECE_CHARS``), each cut after its last newline
    when it has one: a long document is tokenised piece by piece, in bounded memory. Short texts stay whole."""
    size = size or PIECE_CHARS
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        cut = cut if cut > start else start + size
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """Documents of one .txt (one document) or .jsonl (one per line, ``text_field``) file, read whole."""
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start) from err
    if "\x00" in content:
        raise _has_nul(path, content.index(chr(0)))
    if path.suffix == ".txt":
        return [content]
    docs = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)[text_field])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise _bad_line(path, lineno, text_field, err) from err
    return docs


def iter_records(path: Path, field: str = "text") -> Iterator[tuple[object, bool]]:
    """``(piece, last)`` of one file, streamed (memory bounded by ``PIECE_CHARS``, not by the file's size).

    A .txt file is one document, given in pieces of about ``PIECE_CHARS`` characters cut after a newline (``last``
    marks its final piece; the EOS follows only that one); a .jsonl file gives ``field`` of each line (one document
    each, a long text in pieces the same way; a non-text value, e.g. a conversation, whole). The errors are ``read_texts``'s: not UTF-8, NUL bytes, a malformed line.
    """
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, f.tell() - len(raw) + err.start) from err
                if "\x00" in line:
                    raise _has_nul(path, f.tell() - len(raw) + line.index(chr(0)))
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise _bad_line(path, lineno, field, err) from err
                if not isinstance(value, str):
                    yield value, True
                    continue
                pieces = split_text(value, PIECE_CHARS)
                for i, piece in enumerate(pieces):
                    yield piece, i == len(pieces) - 1
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, buf = 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(PIECE_CHARS)
            start = offset - len(decoder.getstate()[0])  # file offset of the bytes decoded now
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, start + err.start) from err
            if "\x00" in text:
                raise _has_nul(path, start + len(text[: text.index(chr(0))].encode()))
            offset += len(raw)
            buf += text
            if not raw:
                break
            cut = buf.rfind("\n", 0, len(buf) - 1) + 1  # keep the newline with the piece it ends
            if len(buf) >= PIECE_CHARS and cut > 0:
                yield buf[:cut], False
                buf = buf[cut:]
    yield buf, True


def domain_files(root: Path) -> dict[str, list[Path]]:
    """``{domain: files}`` of a data folder: ``<root>/<domain>/**/*.txt|*.jsonl``, files at the top in ``default``.

    Hidden folders (``.fuse_cache`` with the tokenised blocks and the offline cache) are never data.
    """
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.suffix in SUFFIXES:
            found.setdefault(rel.parts[0] if len(rel.parts) > 1 else "default", []).append(path)
    return found


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """Tokenise, join documents with EOS and cut into ``[n, block_size]`` blocks (the tail is dropped), in memory.

    Data text is read literally: characters such as ``<eos>`` or ``<|endoftext|>`` in a document are text, never a
    control token (``split_special_tokens``); the only control tokens in a block are the EOS placed between
    documents. ``TextDataModule`` gives the same blocks, tokenised once to disk (see ``lightning_fuse.data.store``).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    # verbose=False: documents longer than the model's max length are expected here (they are cut into blocks)
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False, split_special_tokens=True)["input_ids"]:
        ids.extend(enc + eos)
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
