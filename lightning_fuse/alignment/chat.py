"""Chat data for a source with its own chat template: each conversation as *that* template renders it.

The target's chat blocks tag every token with its piece (``lightning_fuse.data.chat``): the contents of the
messages, and the template's scaffolds around them (``<|im_start|>assistant\\n``, ``<|im_end|>\\n``, ...). A source
whose tokenizer has a chat template reads, per block, each content piece as the target's text of it (the same
characters, so its tokens align 1:1 by byte spans, as in plain text) and each scaffold piece as its own template's
scaffold at that place (``<start_of_turn>model\\n`` where the target wrote ``<|im_start|>assistant\\n``). Scaffold
tokens have no 1:1 counterpart, with one exception: the first token after a content (the end-of-turn marker), which
both models predict at the content's last token. There the source's distribution is used when its marker maps onto
the target's: ``template_pairs`` finds these marker pairs from the two templates and the aligner adds them to the
vocabulary map, so the source's end-of-turn probability becomes the target's.

A conversation that a template fails on (a role it refuses) or whose contents it does not write verbatim is read
as the target's rendering re-tokenised, as for a source without a chat template.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_fuse.data.chat import chat_scaffolds

__all__ = ["ChatRow", "chat_segments", "has_chat_template", "template_id", "template_pairs"]

# A conversation to read the templates' markers from: two turns each way, contents no template rewrites.
_PROBE = [
    {"role": "user", "content": "probe one"},
    {"role": "assistant", "content": "probe two"},
    {"role": "user", "content": "probe three"},
    {"role": "assistant", "content": "probe four"},
]


@dataclass
class ChatRow:
    """The chat structure of one target block (from a chat store, see ``StoredBlockDataset.chat_rows``).

    Attributes:
        pieces: ``[L]`` the piece of each target token (``2k``: scaffold ``k``, ``2k + 1``: content of message
            ``k``, -1: the conversation has no pieces).
        conv: ``[L]`` the conversation of each target token (a key of ``messages``).
        messages: a conversation's messages (``[{"role", "content"}, ...]``) from its ``conv``.
    """

    pieces: Sequence[int]
    conv: Sequence[int]
    messages: Callable[[int], list[dict[str, Any]]]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_id(tokenizer: Any) -> str | None:
    """A short hash of the tokenizer's chat template (None without one): part of an aligned cache's identity."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else repr(sorted(template.items()) if isinstance(template, dict)
                                                           else template)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chat_segments(row: ChatRow, n: int) -> list[tuple[int, int, int, int]]:
    """``(start, stop, conv, piece)`` of each run of equal (conversation, piece) over the row's first ``n``
    tokens."""
    if n == 0:
        return []
    pieces = np.asarray(row.pieces[:n], dtype=np.int64)
    conv = np.asarray(row.conv[:n], dtype=np.int64)
    cuts = np.flatnonzero((pieces[1:] != pieces[:-1]) | (conv[1:] != conv[:-1])) + 1
    bounds = [0, *cuts.tolist(), n]
    return [(a, b, int(conv[a]), int(pieces[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _first_ids(tokenizer: Any, scaffolds: list[str]) -> list[int | None]:
    """The first token id of each scaffold (markers parsed as control tokens), None for an empty one."""
    out = []
    for text in scaffolds:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        out.append(int(ids[0]) if ids else None)
    return out


def template_pairs(src_tokenizer: Any, tgt_tokenizer: Any) -> list[tuple[int, int]]:
    """(source id, target id) of the control tokens the two chat templates write at the same place right after a
    message (end-of-turn markers such as ``<end_of_turn>`` and ``<|im_end|>``); [] if either has no template."""
    if not (has_chat_template(src_tokenizer) and has_chat_template(tgt_tokenizer)):
        return []
    src, tgt = chat_scaffolds(src_tokenizer, _PROBE), chat_scaffolds(tgt_tokenizer, _PROBE)
    if src is None or tgt is None:
        return []
    src_special, tgt_special = set(src_tokenizer.all_special_ids), set(tgt_tokenizer.all_special_ids)
    src_special |= {i for i, t in getattr(src_tokenizer, "added_tokens_decoder", {}).items() if t.special}
    tgt_special |= {i for i, t in getattr(tgt_tokenizer, "added_tokens_decoder", {}).items() if t.special}
    pairs: dict[int, int] = {}
    conflicting: set[int] = set()
    for s, t in zip(_first_ids(src_tokenizer, src[1:]), _first_ids(tgt_tokenizer, tgt[1:])):
        if s is None or t is None or s not in src_special or t not in tgt_special:
            continue
        if pairs.get(s, t) != t:
            conflicting.add(s)
        pairs[s] = t
    return sorted((s, t) for s, t in pairs.items() if s not in conflicting)
