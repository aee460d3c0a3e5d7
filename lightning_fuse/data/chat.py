"""Chat data: a conversation (``messages``) rendered with the target's chat template, the loss on assistant tokens.

``render_chat`` gives the text the template makes of a conversation and the character spans of the assistant
replies: reply ``i`` spans from the end of the conversation up to it rendered with the generation prompt
(``add_generation_prompt=True``) to the end of the conversation up to and with it. So a span holds the reply and
the template's end-of-turn marker (the model learns to stop), never the prompt or the role header. ``encode_chat``
tokenises the text (the template's markers are control tokens: ``split_special_tokens=False``, no special tokens
added beyond what the template writes) and labels the tokens inside the spans; every other label is -100, which
``FusionModule._step`` excludes from the CLM loss, the distillation and the sources' CE.

For sources with their own chat template, ``encode_chat`` also tags every token with its *piece*: the rendering is
cut at the message contents into ``scaffold 0, content 0, scaffold 1, ..., content n-1, scaffold n`` (what the
template writes around and between the messages); piece ``2k`` is scaffold ``k`` and ``2k + 1`` is the content of
message ``k`` (-1 on every token of a conversation whose contents the template does not write verbatim, in order).
``chat_scaffolds`` gives any template's scaffolds of the same conversation, so a source reads the contents the
target read, inside its own template's markers (``lightning_fuse.alignment.TokenAligner``, ``chat=``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

IGNORE = -100


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    messages = json.loads(value) if isinstance(value, str) else value
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(
            f"{where}: expected a list of messages, each a mapping with 'role' and 'content' (e.g. "
            '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]), got '
            f"{str(value)[:120]!r}."
        )
    return [dict(m) for m in messages]


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Chat data needs a chat template and a fast tokenizer (its offsets place the assistant spans)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "`--data.messages_field` is set but the target tokenizer has no chat template. Use a chat model's "
            "tokenizer, or set `tokenizer.chat_template` (a Jinja string) in its tokenizer_config.json."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chat data needs a fast (Rust) tokenizer for its offsets: load the target with `use_fast=True`.")


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the tokenizer's chat template, and the ``[start, end)`` character spans of its
    assistant replies (with their end-of-turn marker, without the role header)."""
    messages = list(messages)
    if not messages:
        return "", []
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                "the chat template does not render a conversation as the rendering of its first turns followed by the "
                "rest, so the assistant replies cannot be located: use a template without history-dependent changes."
            )
        spans.append((len(before), len(upto)))
    return text, spans


def content_spans(text: str, messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]] | None:
    """The ``[start, end)`` character span of each message's content in a rendering ``text``, searched in order
    (each after the previous one); None when a content is not written verbatim (a template that trims or rewrites
    it)."""
    spans, pos = [], 0
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else None
        if content is None:
            return None
        start = text.find(content, pos)
        if start < 0:
            return None
        spans.append((start, start + len(content)))
        pos = start + len(content)
    return spans


def chat_scaffolds(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]) -> list[str] | None:
    """What ``tokenizer``'s chat template writes around the contents of ``messages``: ``n + 1`` strings (before
    message 0, between messages, after the last); None when its template fails on the conversation or does not
    write the contents verbatim (then the source reads the target's rendering)."""
    messages = list(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse a role (e.g. no system turn): fall back
        return None
    spans = content_spans(text, messages)
    if spans is None:
        return None
    cuts = [0, *(i for span in spans for i in span), len(text)]
    return [text[cuts[2 * k] : cuts[2 * k + 1]] for k in range(len(spans) + 1)]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Any], where: str = "messages", pieces: bool = False
) -> tuple[list[np.ndarray], ...]:
    """Token ids and labels (ids on assistant tokens, -100 elsewhere) of each conversation, as int32 arrays, and
    with ``pieces`` each token's piece (see the module's docstring)."""
    messages = [_messages(c, where) for c in conversations]
    rendered = [render_chat(tokenizer, m) for m in messages]
    texts = [t for t, _ in rendered]
    if not any(texts):  # transformers cannot encode an empty batch
        empty = [np.zeros(0, np.int32) for _ in texts]
        return (empty, list(empty), list(empty)) if pieces else (empty, list(empty))
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    all_ids, all_labels, all_pieces = [], [], []
    for ids, offsets, (text, spans), msgs in zip(enc["input_ids"], enc["offset_mapping"], rendered, messages):
        ids = np.asarray(ids, dtype=np.int32)
        starts = np.asarray([s for s, _ in offsets], dtype=np.int64).reshape(-1)
        keep = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            keep |= (starts >= s) & (starts < e)
        all_ids.append(ids)
        all_labels.append(np.where(keep, ids, IGNORE).astype(np.int32))
        if pieces:
            all_pieces.append(_token_pieces(starts, content_spans(text, msgs)))
    return (all_ids, all_labels, all_pieces) if pieces else (all_ids, all_labels)


def _token_pieces(starts: np.ndarray, spans: list[tuple[int, int]] | None) -> np.ndarray:
    """Piece of each token (by its first character): ``2k + 1`` inside the content of message ``k``, else ``2k``
    with ``k`` the number of contents that end at or before it; all -1 without spans."""
    if spans is None:
        return np.full(len(starts), -1, dtype=np.int32)
    bounds = np.asarray([i for span in spans for i in span], dtype=np.int64)
    # number of span bounds at or before each start: even = in a scaffold, odd = inside a content
    return np.searchsorted(bounds, starts, side="right").astype(np.int32)
