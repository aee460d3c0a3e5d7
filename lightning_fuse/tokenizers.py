"""Small BPE tokenizers trained in seconds on text every machine has (the Python stdlib sources).

Tests, benchmarks and the demo need two tokenizers with *different* conventions (GPT-2 style byte-level 'Ġ' vs
SentencePiece style '▁' with byte fallback) without downloading anything.

Example::

    texts = stdlib_texts(2_000_000)
    gpt2_like = train_bpe_tokenizer(texts, 2000, "byte_level")
    llama_like = train_bpe_tokenizer(texts, 3000, "metaspace")
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BYTE_FALLBACK_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def stdlib_texts(max_chars: int, skip_chars: int = 0) -> list[str]:
    """Python stdlib source files (``sysconfig.get_paths()["stdlib"]``, site-packages excluded), sorted by path.

    Args:
        max_chars: stop once this many characters are collected (files are kept whole).
        skip_chars: skip the files that start before this many characters: ``stdlib_texts(k, skip_chars=n)`` is
            disjoint from ``stdlib_texts(n)`` (held-out text).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, seen = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        start, seen = seen, seen + len(text)
        if start < skip_chars:
            continue
        texts.append(text)
        if sum(map(len, texts)) >= max_chars:
            break
    if not texts:
        raise RuntimeError(f"No readable *.py files under {root} (skip_chars={skip_chars}).")
    return texts


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    style: Literal["byte_level", "metaspace"],
    limit_alphabet: int = 200,
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer with the `tokenizers` library and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training text.
        vocab_size: total vocabulary size (special tokens, and for ``"metaspace"`` the 256 byte tokens, included).
        style: ``"byte_level"``: GPT-2 style, bytes mapped to printable chars (space -> 'Ġ', newline -> 'Ċ'), no
            unknown tokens. ``"metaspace"``: SentencePiece/Llama style, space -> '▁' (prepended to the first word),
            characters outside the learned alphabet encoded as byte-fallback tokens '<0x0A>'.
        limit_alphabet: ``"metaspace"`` only: at most this many distinct characters in the base alphabet, so that
            rare characters exercise byte fallback.
    """
    if style not in ("byte_level", "metaspace"):
        raise ValueError(f"`style` can be 'byte_level' or 'metaspace', got {style!r}")
    texts = list(texts)
    if style == "byte_level":
        specials = ["<|endoftext|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0], unk_token=specials[0]
        )

    specials = ["<unk>", "<s>", "</s>"]
    n_fixed = len(specials) + len(BYTE_FALLBACK_TOKENS)
    if vocab_size <= n_fixed + limit_alphabet:
        raise ValueError(
            f"`vocab_size` must be > {n_fixed + limit_alphabet} for 'metaspace', got {vocab_size}"
        )
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_fixed, limit_alphabet=limit_alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer cannot reserve byte tokens without making them special (matched literally in text), so rebuild
    # the model: specials, then the 256 byte tokens, then the learned vocabulary, as SentencePiece lays it out.
    learned = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + BYTE_FALLBACK_TOKENS)}
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = metaspace
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bpe.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
