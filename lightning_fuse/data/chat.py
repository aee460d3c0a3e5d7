"""Chat data: a conversation (``messages``) rendered with the target's chat template, the loss on assistant tokens.

``render_chat`` gives the text the template makes of a conversation and the character spans of the assistant
replies: reply ``i`` spans from the end of the conversation up to it rendered with the generation prompt
(``add_generation_prompt=True``) to the end of the conversation up to and with it. So a span holds the reply and
the template's end-of-turn marker (the model learns to stop), never the prompt or the role header. ``encode_chat``
tokenises the text (the template's markers are control tokens: ``split_special_tokens=False``, no special tokens
added beyond what the template writes) and labels the tokens inside the spans; every other label is -100, which
``FusionModule._step`` excludes from the CLM loss, the distillation and the sources' CE.
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


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Any], where: str = "messages"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and labels (ids on assistant tokens, -100 elsewhere) of each conversation, as int32 arrays."""
    rendered = [render_chat(tokenizer, _messages(c, where)) for c in conversations]
    texts = [t for t, _ in rendered]
    if not any(texts):  # transformers cannot encode an empty batch
        return [np.zeros(0, np.int32) for _ in texts], [np.zeros(0, np.int32) for _ in texts]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    all_ids, all_labels = [], []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
        ids = np.asarray(ids, dtype=np.int32)
        starts = np.asarray([s for s, _ in offsets], dtype=np.int64).reshape(-1)
        keep = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            keep |= (starts >= s) & (starts < e)
        all_ids.append(ids)
        all_labels.append(np.where(keep, ids, IGNORE).astype(np.int32))
    return all_ids, all_labels
