"""Token normalisation: the exact text (bytes) each vocabulary token stands for, whatever the tokenizer's markers."""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["TokenizerKind", "normalize_token", "tokenizer_kind", "to_bytes", "vocab_strings", "special_ids"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char table (printable latin-1 maps to itself, the rest to U+0100+)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}
_REMAPPED_CHARS = frozenset(c for b, c in _BYTE_ENCODER.items() if ord(c) != b)  # 'Ġ' (space), 'Ċ' (\n), ...
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decode_bytes(data: bytes) -> str:
    # A byte that is not part of a complete UTF-8 character becomes the lone surrogate U+DC80+byte
    # ("surrogateescape"), so a partial character is represented the same way whichever tokenizer cut it.
    return data.decode("utf-8", errors="surrogateescape")


TokenizerKind = Literal["byte_level", "metaspace", "wordpiece", "plain"]


def normalize_token(token: str, *, kind: TokenizerKind | None = None) -> str:
    """The text a vocabulary token stands for, with tokenizer-specific markers removed.

    - byte-level BPE (GPT-2, Llama-3, Qwen): each char is a byte ('Ġ' = space, 'Ċ' = newline, 'Ã©' = 'é');
    - SentencePiece / Metaspace: '▁' -> ' ' ('Ġthe' and '▁the' both give ' the');
    - byte fallback (any kind): '<0x0A>' -> '\\n';
    - WordPiece: continuation prefix '##' removed.

    A byte that does not complete a UTF-8 character (a multibyte char split over tokens) becomes the lone
    surrogate ``chr(0xDC00 + byte)``, both for byte-level chars and for byte-fallback tokens, so both spell it
    the same. ``normalize_token(t).encode("utf-8", "surrogateescape")`` is the exact byte string of the token.

    Args:
        token: a vocabulary string, as from ``tokenizer.convert_ids_to_tokens``.
        kind: the tokenizer's convention (see `tokenizer_kind`); ``"plain"`` only decodes byte fallback. ``None``
            guesses from the token alone: '▁' -> ' ', '##' stripped, and the GPT-2 byte alphabet decoded when the
            token has one of its remapped chars (such as 'Ġ') or decodes to valid multibyte UTF-8. Guessing gets
            '####' (a SentencePiece token) or a lone byte-level 'Ã' wrong: pass ``kind`` when it is known.
    """
    m = _BYTE_FALLBACK.fullmatch(token)
    if m is not None:
        return _decode_bytes(bytes([int(m.group(1), 16)]))
    if kind == "metaspace" or (kind is None and "▁" in token):
        return token.replace("▁", " ")
    if kind == "wordpiece" or kind is None:
        if token.startswith("##") and len(token) > 2:
            return token[2:]
        if kind == "wordpiece":
            return token
    if kind == "plain" or not token or not all(c in _BYTE_DECODER for c in token):
        return token
    data = bytes(_BYTE_DECODER[c] for c in token)
    if kind is None and not any(c in _REMAPPED_CHARS for c in token):
        if data.isascii():
            return token
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return token
    return _decode_bytes(data)


def to_bytes(normalized: str) -> bytes:
    return normalized.encode("utf-8", errors="surrogateescape")


def tokenizer_kind(tokenizer) -> TokenizerKind:
    """How ``tokenizer`` spells text in its vocabulary: ``"byte_level"`` ('Ġ' for space), ``"metaspace"`` ('▁'),
    ``"wordpiece"`` ('##' continuations) or ``"plain"``.

    Looks at a fast tokenizer's model, pre-tokenizer and decoder, then at a slow GPT-2 tokenizer's
    ``byte_encoder``, then counts markers in the vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        desc = f"{backend.pre_tokenizer!r} {backend.decoder!r} {type(backend.model).__name__}"
        if "ByteLevel" in desc:
            return "byte_level"
        if "Metaspace" in desc or "▁" in desc:
            return "metaspace"
        if "WordPiece" in desc:
            return "wordpiece"
    if hasattr(tokenizer, "byte_encoder"):
        return "byte_level"
    vocab = tokenizer.get_vocab()
    counts = {
        "byte_level": sum("Ġ" in t for t in vocab),
        "metaspace": sum("▁" in t for t in vocab),
        "wordpiece": sum(t.startswith("##") for t in vocab),
    }
    kind = max(counts, key=counts.get)
    return kind if counts[kind] > len(vocab) // 100 else "plain"


def vocab_strings(tokenizer) -> list[str | None]:
    """id -> token string for ids ``0 .. max(len(tokenizer), max id + 1) - 1``; None for unused ids."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    strings: list[str | None] = [None] * size
    for tok, i in vocab.items():
        strings[i] = tok
    return strings



def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's control tokens: its special tokens and the added tokens flagged special."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids
