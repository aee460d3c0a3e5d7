"""`TokenAligner`: which source next-token distribution to use at which target position, for a batch of blocks.

Conventions: ``tgt_ids`` has length L; position ``t`` predicts token ``t + 1``; ``src_pos[t] = j`` means the
source's next-token distribution at source position ``j`` is used at target position ``t`` (target token
``t + 1`` is the same text as source token ``j + 1``); -1 means no aligned source distribution (one-hot on the
gold token downstream).

What the source reads: the block's text as its own tokenizer reads a document by default, i.e. with the
special tokens it adds in front (Gemma's and Llama's BOS; none for GPT-2), the target's control tokens that
have a role in the source too (the EOS joining packed documents) as the source's own, and every piece of data
text literally: the characters ``<eos>`` in a document are never a control token on either side. On chat data
(``chat=``), a source with a chat template reads each conversation inside its own template's markers
(``lightning_fuse.alignment.chat``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lightning_fuse.alignment.chat import ChatRow, chat_segments, has_chat_template, template_pairs
from lightning_fuse.alignment.dtw import dtw_groups, exact_pairs
from lightning_fuse.alignment.normalize import (
    normalize_token,
    special_ids,
    to_bytes,
    tokenizer_kind,
    vocab_strings,
)
from lightning_fuse.alignment.spans import (
    anchored_pairs,
    credit,
    edge_spans,
    group_credit,
    offset_spans,
    span_pairs,
    token_spans,
)
from lightning_fuse.alignment.vocab_map import EXACT, MAX_DISTANCE, build_vocab_map, special_role_pairs

log = logging.getLogger(__name__)

__all__ = ["AlignedBatch", "AlignedBlock", "ChatRow", "TokenAligner", "alignment_rate", "default_prefix"]

MAX_DTW_CELLS = 1 << 20  # the full-DTW fallback (about 1 s per 1M cells) leaves bigger runs unaligned
_METHOD_RANK = {"spans": 0, "offsets": 1, "dtw": 2, "none": 3}


@dataclass
class AlignedBlock:
    """Alignment of one target block.

    Attributes:
        src_ids: source-tokenizer ids of the block's text, with the source's default prefix (its BOS).
        src_pos: ``[L]``; ``src_pos[t] = j >= 0``: use the source distribution at source position ``j`` at target
            position ``t`` (target token ``t + 1`` is the same text as source token ``j + 1``, and both contexts
            cover the same text); -1 elsewhere, always at ``t = L - 1``.
        method: how it was aligned (the least exact over the block's runs of text): ``"spans"`` (normalised
            tokens spell the text: exact byte spans, the usual case), ``"offsets"`` (spans from a tokenizer's
            offset mapping + windowed DTW), ``"dtw"`` (full DTW on the normalised token strings, when there are no
            offsets either), ``"none"`` (too long for the DTW fallback: no 1:1 position).
        src_credit: ``[M]``; ``src_credit[j] = t >= 0``: the log-prob the source gives its token ``j`` (at
            position ``j - 1``) counts towards target position ``t``, whose gold token holds the token's last
            byte; summed, a target range gets the source's log-likelihood of the same text. -1: not counted
            (the prefix, text inside target token 0, bytes the target never spells).
        covered: ``[L]``; target positions whose gold token's text the source read (False at ``L - 1``, on a
            target control token the source has no counterpart for, on a character cut at the block's edge).
    """

    src_ids: list[int]
    src_pos: list[int]
    method: str = "spans"
    src_credit: list[int] = field(default_factory=list)
    covered: list[bool] = field(default_factory=list)


@dataclass
class AlignedBatch:
    """Alignment of a batch of target blocks ``[B, L]`` (a batch may carry it as a dict, see `as_dict`).

    Attributes:
        src_ids: ``[B, M]`` source ids, right-padded with the source pad id (eos, or 0, if it has none).
        src_mask: ``[B, M]`` True on real source tokens.
        src_pos: ``[B, L]`` as `AlignedBlock.src_pos`, -1 = no aligned source distribution.
        src_credit: ``[B, M]`` as `AlignedBlock.src_credit` (-1 on padding).
        covered: ``[B, L]`` as `AlignedBlock.covered`.
    """

    src_ids: torch.Tensor
    src_mask: torch.Tensor
    src_pos: torch.Tensor
    src_credit: torch.Tensor
    covered: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> AlignedBatch:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def to(self, device: torch.device | str) -> AlignedBatch:
        return AlignedBatch(**{k: v.to(device) for k, v in self.as_dict().items()})

    def rows(self, idx: torch.Tensor) -> AlignedBatch:
        """The alignment of rows ``idx`` only (source padding trimmed to the longest of them)."""
        d = {k: v[idx.to(v.device)] for k, v in self.as_dict().items()}
        m = int(d["src_mask"].sum(-1).max()) if d["src_mask"].numel() else 0
        for k in ("src_ids", "src_mask", "src_credit"):
            d[k] = d[k][:, :m]
        return AlignedBatch(**d)


def alignment_rate(src_pos, mask=None) -> float:
    """Fraction of target positions ``t < L - 1`` with ``src_pos[..., t] >= 0``.

    Args:
        src_pos: ``[L]`` or ``[B, L]`` (list, tensor or array; an `AlignedBlock`/`AlignedBatch` is read).
        mask: optional ``[..., L]``, True on real target tokens; position ``t`` counts only if token ``t + 1`` is
            real.

    Returns 0.0 when there is no position to align (L <= 1).
    """
    if isinstance(src_pos, (AlignedBlock, AlignedBatch)):
        src_pos = src_pos.src_pos
    pos = torch.as_tensor(src_pos)
    if pos.numel() == 0 or pos.shape[-1] <= 1:
        return 0.0
    valid = torch.ones_like(pos[..., 1:], dtype=torch.bool)
    if mask is not None:
        valid = torch.as_tensor(mask, dtype=torch.bool)[..., 1:].expand_as(valid)
    n = int(valid.sum())
    return float(((pos[..., :-1] >= 0) & valid).sum()) / n if n else 0.0


def default_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts in front of a text by default (``[bos]`` for Gemma or Llama, ``[]`` for GPT-2)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    return []


def _block(src_ids: np.ndarray, pairs: np.ndarray, credit_of: np.ndarray, covered: np.ndarray, n_tgt: int,
           method: str) -> AlignedBlock:
    """An `AlignedBlock` from token-level results over a block's ``n_tgt`` target tokens and its source ids:
    ``pairs`` ``[P, 2]`` (target token, source token) of the same text, ``credit_of`` (per source token: the target
    token holding its last byte, -1 none) and ``covered`` (per target token: its text was read). Shifted here to
    the positions that predict them (`AlignedBlock`'s conventions)."""
    src_pos = np.full(n_tgt, -1, dtype=np.int64)
    keep = (pairs[:, 0] >= 1) & (pairs[:, 1] >= 1)
    src_pos[pairs[keep, 0] - 1] = pairs[keep, 1] - 1
    src_credit = np.where((np.arange(len(credit_of)) >= 1) & (credit_of >= 1), credit_of - 1, -1)
    cov = np.append(covered[1:], False) if n_tgt else covered
    return AlignedBlock(src_ids.tolist(), src_pos.tolist(), method, src_credit.tolist(), cov.tolist())


class _LiteralEncoder:
    """Encodes data text with no special token parsed out of it (``'<eos>'`` stays characters), no ids added."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())  # a copy: the user's tokenizer is left as it is
            self.backend.encode_special_tokens = True

    def __call__(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
        """(ids, character offsets) per text; offsets None for a slow tokenizer."""
        if self.backend is not None:
            return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        tok = self.tokenizer
        return [(tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"], None) for t in texts]


class TokenAligner:
    """Align target blocks to a source tokenizer and map source ids to target ids.

    Example::

        aligner = TokenAligner(src_tok, tgt_tok, mode="min_ed", cache_dir="~/.cache/lightning_fuse")
        batch = aligner.align_batch(input_ids)            # [B, L] target ids
        src_logits = source(batch.src_ids, attention_mask=batch.src_mask).logits  # [B, M, V_src]
        # at target position t use src_logits[b, batch.src_pos[b, t]] where src_pos >= 0,
        # with source ids mapped by aligner.vocab_map  # [V_src] -> target id or -1

    Args:
        src_tokenizer: source tokenizer (fast tokenizers give offsets for the fallback path).
        tgt_tokenizer: target tokenizer.
        mode: vocabulary map, see `build_vocab_map`.
        cache_dir: where to cache the vocabulary map; None: no cache.
        max_distance: ``min_ed`` cutoff (normalised edit distance), see `build_vocab_map`.
        progress: progress bar while a ``min_ed`` map is built.
    """

    def __init__(
        self,
        src_tokenizer,
        tgt_tokenizer,
        mode: Literal["exact", "min_ed"] = "min_ed",
        cache_dir: str | Path | None = None,
        max_distance: float = MAX_DISTANCE,
        progress: bool = True,
    ) -> None:
        self.src_tokenizer, self.tgt_tokenizer, self.mode = src_tokenizer, tgt_tokenizer, mode
        self.vocab_map, self.vocab_kind = build_vocab_map(
            src_tokenizer, tgt_tokenizer, mode=mode, cache_dir=cache_dir, max_distance=max_distance,
            with_kind=True, progress=progress,
        )
        # Chat templates: the control tokens both write right after a message (end-of-turn markers) map onto each
        # other, and on chat data the source reads its own template's markers (`align_batch(chat=...)`).
        self.reads_own_template = has_chat_template(src_tokenizer)
        self.template_pairs = template_pairs(src_tokenizer, tgt_tokenizer)
        if self.template_pairs:
            self.vocab_map, self.vocab_kind = self.vocab_map.clone(), self.vocab_kind.clone()
            for s, t in self.template_pairs:
                self.vocab_map[s], self.vocab_kind[s] = t, EXACT
        self._src_norm, self._src_bytes = self._tables(src_tokenizer)
        self._tgt_norm, self._tgt_bytes = self._tables(tgt_tokenizer)
        self._tgt_special = special_ids(tgt_tokenizer)
        self._tgt_special_arr = np.asarray(sorted(self._tgt_special), dtype=np.int64)
        # A target control token with a role in the source too (the EOS that joins packed documents) is read as
        # the source's own token of that role; eos comes last in the pairs, so it wins ids shared by roles.
        self._role = {t: s for s, t in special_role_pairs(src_tokenizer, tgt_tokenizer)}
        self.src_prefix = default_prefix(src_tokenizer)
        self._src_encode = _LiteralEncoder(src_tokenizer)
        self._tgt_encode = _LiteralEncoder(tgt_tokenizer)
        pad = getattr(src_tokenizer, "pad_token_id", None)
        if not isinstance(pad, int):
            pad = getattr(src_tokenizer, "eos_token_id", None)
        self.src_pad_id = pad if isinstance(pad, int) else 0

    @staticmethod
    def _tables(tokenizer) -> tuple[list[str], list[bytes]]:
        kind = tokenizer_kind(tokenizer)
        norm = ["" if s is None else normalize_token(s, kind=kind) for s in vocab_strings(tokenizer)]
        return norm, [to_bytes(s) for s in norm]

    def __call__(self, batch: dict, chat: Sequence[ChatRow | None] | None = None) -> dict[str, torch.Tensor]:
        """`align_batch` of a data batch (``input_ids``, ``attention_mask``), as a dict of tensors."""
        return self.align_batch(batch["input_ids"], batch.get("attention_mask"), chat).as_dict()

    # -- tokenizer calls ------------------------------------------------------------------------------------------
    def _decode(self, runs: list[list[int]]) -> list[str]:
        """The text of runs of regular target tokens (no control token inside)."""
        tok = self.tgt_tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            return backend.decode_batch(runs, skip_special_tokens=False)
        return [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in runs]

    # -- alignment ------------------------------------------------------------------------------------------------
    def align(self, tgt_ids: Sequence[int], method: Literal["fast", "dtw"] = "fast") -> AlignedBlock:
        """Align one block of target ids ``[L]`` (see `AlignedBlock`).

        Args:
            tgt_ids: target ids.
            method: ``"fast"``: byte spans (linear); ``"dtw"``: FuseLLM's full DTW on the normalised token
                strings (quadratic, for reference), a 1:1 group counting when both strings are equal.
        """
        if method not in ("fast", "dtw"):
            raise ValueError(f"`method` can be 'fast' or 'dtw', got {method!r}")
        ids = [int(i) for i in tgt_ids]
        return self._align_many([ids], dtw=method == "dtw")[0]

    def align_batch(
        self, tgt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        chat: Sequence[ChatRow | None] | None = None,
    ) -> AlignedBatch:
        """Align a batch of target blocks.

        Args:
            tgt_ids: ``[B, L]`` target ids.
            attention_mask: optional ``[B, L]``, True/1 on real tokens (left or right padding): the padded tokens
                are not part of the text and their positions get -1.
            chat: chat data: each row's `ChatRow` (from ``StoredBlockDataset.chat_rows``). A source with a chat
                template then reads every conversation with its own template's markers; None (or a source
                without a template): the target's rendering, re-tokenised.
        """
        if tgt_ids.dim() != 2:
            raise ValueError(f"`tgt_ids` must be [B, L], got shape {tuple(tgt_ids.shape)}")
        bsz, length = tgt_ids.shape
        rows = tgt_ids.tolist()
        keep = None
        if attention_mask is not None:
            keep = [torch.nonzero(m).flatten() for m in attention_mask.bool()]
            rows = [[r[i] for i in k.tolist()] for r, k in zip(rows, keep)]
        if chat is not None and keep is not None and any(c is not None for c in chat):
            if any(len(k) != length for k in keep):
                raise ValueError("`chat` rows need unpadded blocks (an attention mask of ones)")
        blocks = self._align_many(rows, chat=chat)
        m = max((len(b.src_ids) for b in blocks), default=0)
        src_ids = torch.full((bsz, m), self.src_pad_id, dtype=torch.long)
        src_mask = torch.zeros((bsz, m), dtype=torch.bool)
        src_credit = torch.full((bsz, m), -1, dtype=torch.long)
        src_pos = torch.full((bsz, length), -1, dtype=torch.long)
        covered = torch.zeros((bsz, length), dtype=torch.bool)
        for b, blk in enumerate(blocks):
            n = len(blk.src_ids)
            src_ids[b, :n] = torch.tensor(blk.src_ids, dtype=torch.long)
            src_mask[b, :n] = True
            pos = torch.tensor(blk.src_pos, dtype=torch.long)
            cov = torch.tensor(blk.covered, dtype=torch.bool)
            cred = torch.tensor(blk.src_credit, dtype=torch.long)
            if keep is None:
                src_pos[b, : len(pos)], covered[b, : len(cov)] = pos, cov
            else:  # target position i of the kept tokens is position keep[i] of the row
                src_pos[b, keep[b]], covered[b, keep[b]] = pos, cov
                cred = torch.where(cred >= 0, keep[b][cred.clamp_min(0)] if len(keep[b]) else cred, cred)
            src_credit[b, :n] = cred
        return AlignedBatch(src_ids, src_mask, src_pos, src_credit, covered)

    def _check_ids(self, rows: list[list[int]]) -> None:
        n_tgt = len(self._tgt_bytes)
        for r in rows:
            bad = [i for i in r if not 0 <= i < n_tgt]
            if bad:
                raise ValueError(f"`tgt_ids` must be in [0, {n_tgt}) (target vocabulary), got {bad[:5]}")

    def _align_many(
        self, rows: list[list[int]], dtw: bool = False, chat: Sequence[ChatRow | None] | None = None
    ) -> list[AlignedBlock]:
        self._check_ids(rows)
        # chat rows, for a source with a chat template: the conversation in the source's own template
        done: list[AlignedBlock | None] = [None] * len(rows)
        if chat is not None and self.reads_own_template and not dtw:
            done = [self._chat_block(r, c) if c is not None else None for r, c in zip(rows, chat)]
        todo = [i for i, blk in enumerate(done) if blk is None]
        if len(todo) < len(rows):
            for i, blk in zip(todo, self._align_many([rows[i] for i in todo], dtw)):
                done[i] = blk
            return done
        # each row: runs of regular tokens, cut at the control tokens the target placed (EOS between documents)
        items = [self._items(r) for r in rows]
        runs = [item[1] for row in items for item in row if item[0] == "run"]
        texts = self._decode(runs)
        prepared = [self._target_spans(r, text) for r, text in zip(runs, texts)]
        encoded = self._src_encode([text for _, text, _ in prepared])
        results = iter(
            self._align_run(r, t_spans, text, strict, src_ids, offsets, dtw)
            for r, (t_spans, text, strict), (src_ids, offsets) in zip(runs, prepared, encoded)
        )
        return [self._assemble(row, results, dtw) for row in items]

    def _items(self, ids: list[int]) -> list[tuple[str, list[int]]]:
        """The row cut into runs of regular tokens and single control tokens."""
        at = np.nonzero(np.isin(np.asarray(ids, dtype=np.int64), self._tgt_special_arr))[0].tolist()
        out: list[tuple[str, list[int]]] = []
        start = 0
        for i in [*at, len(ids)]:
            if i > start:
                out.append(("run", ids[start:i]))
            if i < len(ids):
                out.append(("special", [ids[i]]))
            start = i + 1
        return out

    def _chat_block(self, ids: list[int], row: ChatRow) -> AlignedBlock | None:
        """A chat block as the source reads it with its own template (``lightning_fuse.alignment.chat``): the
        target's text of each content piece and the source's scaffold in place of each target scaffold, tokenised
        as one text the way the source tokenises its own rendering (markers parsed as control tokens). Content
        tokens pair 1:1 by equal byte spans; a scaffold's first target tokens pair with the source's first ones
        there while the vocabulary maps one onto the other (the end-of-turn marker, a newline after both). None
        (then the plain path) when the block holds target control tokens outside its scaffolds, or spans cannot be
        derived."""
        from lightning_fuse.data.chat import chat_scaffolds

        scaffolds: dict[int, list[str] | None] = {}
        parts: list[tuple[int, int, str | None]] = []  # target [start, stop), the source's scaffold (None: text)
        for start, stop, conv, piece in chat_segments(row, len(ids)):
            text = None
            if piece >= 0 and piece % 2 == 0:
                if conv not in scaffolds:
                    scaffolds[conv] = chat_scaffolds(self.src_tokenizer, row.messages(conv))
                if scaffolds[conv] is not None and piece // 2 < len(scaffolds[conv]):
                    text = scaffolds[conv][piece // 2]
            if text is None and np.isin(ids[start:stop], self._tgt_special_arr).any():
                return None  # target markers the source has no place for: the plain path reads them
            parts.append((start, stop, text))
        decoded = iter(self._decode([ids[a:b] for a, b, text in parts if text is None]))
        n = len(ids)
        t_start, t_end = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        pieces, scaffold_at, offset = [], [], 0  # scaffold_at: (target [start, stop), source bytes [start, stop))
        for a, b, part_text in parts:
            text = part_text
            if part_text is None:
                spans, text, _ = self._target_spans(ids[a:b], next(decoded))
                if spans is None:
                    return None
                t_start[a:b] = np.where(spans[0] >= 0, spans[0] + offset, -1)
                t_end[a:b] = np.where(spans[0] >= 0, spans[1] + offset, -1)
            pieces.append(text)
            if part_text is not None:  # the source's scaffold: its target tokens, its bytes in the source's text
                scaffold_at.append(((a, b), offset, offset + len(text.encode("utf-8"))))
            offset += len(text.encode("utf-8"))
        text = "".join(pieces)
        tok = self.src_tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=bool(getattr(tok, "is_fast", False)))
        src_ids = [int(i) for i in enc["input_ids"]]
        strict = False
        s_spans = token_spans([self._src_bytes[i] for i in src_ids], text.encode("utf-8"))
        if s_spans is None and "offset_mapping" in enc:
            s_spans, strict = offset_spans(enc["offset_mapping"], text), True
        if s_spans is None:
            return None
        t_spans = (t_start, t_end)
        if strict:
            pairs = anchored_pairs([self._tgt_norm[i] for i in ids], [self._src_norm[i] for i in src_ids], t_spans,
                                   s_spans)
            pairs = pairs[t_start[pairs[:, 0]] >= 0] if len(pairs) else pairs  # never inside a scaffold
        else:
            pairs = span_pairs(t_spans, s_spans)
        cred = credit(t_spans, s_spans)
        covered = (t_start >= 0) & (t_end > t_start)
        ends = []
        for (a, b), at, stop in scaffold_at:
            # The scaffolds' common start under the vocabulary map: the end-of-turn markers (both predicted at the
            # content's last token), then the tokens that follow both alike ('\n' after '<|im_end|>' and after
            # '<end_of_turn>'): each pair's contexts are the same contents with equivalent markers.
            j = int(np.searchsorted(s_spans[0], at, side="left"))
            while (a > 0 and a < b and j < len(src_ids) and at <= s_spans[0][j] < stop
                   and int(self.vocab_map[src_ids[j]]) == ids[a]):
                ends.append((a, j))
                covered[a], cred[j] = True, a
                a, j = a + 1, j + 1
        pairs = np.concatenate([pairs.reshape(-1, 2), np.asarray(ends, dtype=np.int64).reshape(-1, 2)])
        prefix = [] if src_ids[: len(self.src_prefix)] == self.src_prefix else list(self.src_prefix)
        k = len(prefix)
        return _block(np.asarray(prefix + src_ids, dtype=np.int64), pairs + [0, k],
                      np.concatenate([np.full(k, -1, dtype=np.int64), cred]), covered, n,
                      "offsets" if strict else "spans")

    def _assemble(self, items, results, dtw: bool) -> AlignedBlock:
        prefix = np.asarray(self.src_prefix, dtype=np.int64)
        src, credit_of, pairs, covered = [prefix], [np.full(len(prefix), -1, dtype=np.int64)], [], []
        n_src, n_tgt = len(prefix), 0
        method = "dtw" if dtw else "spans"
        for kind, ids in items:
            if kind == "special":
                s = self._role.get(ids[0])
                covered.append(np.array([s is not None]))
                if s is not None:  # the source's own token of that role, aligned 1:1
                    pairs.append(np.array([[n_tgt, n_src]], dtype=np.int64))
                    credit_of.append(np.array([n_tgt], dtype=np.int64))
                    src.append(np.array([s], dtype=np.int64))
                    n_src += 1
                n_tgt += 1
                continue
            run_src, run_pairs, run_credit, run_covered, run_method = next(results)
            if _METHOD_RANK[run_method] > _METHOD_RANK[method]:
                method = run_method
            pairs.append(np.asarray(run_pairs, dtype=np.int64).reshape(-1, 2) + [n_tgt, n_src])
            run_credit = np.asarray(run_credit, dtype=np.int64)
            credit_of.append(np.where(run_credit >= 0, run_credit + n_tgt, -1))
            covered.append(np.asarray(run_covered, dtype=bool))
            src.append(np.asarray(run_src, dtype=np.int64))
            n_src, n_tgt = n_src + len(run_src), n_tgt + len(ids)
        pairs_arr = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
        cov = np.concatenate(covered) if covered else np.zeros(0, dtype=bool)
        return _block(np.concatenate(src), pairs_arr, np.concatenate(credit_of), cov, n_tgt, method)

    def _target_spans(self, ids: list[int], text: str):
        """Byte spans of the target tokens in the text the source will read, that text, and whether the spans
        come from the tokenizer's offsets (then a 1:1 pair must also have equal normalised strings)."""
        pieces = [self._tgt_bytes[i] for i in ids]
        spans = token_spans(pieces, text.encode("utf-8"))
        if spans is not None:
            return spans, text, False
        edge = edge_spans(pieces, text)
        if edge is not None:
            return edge[0], edge[1], False
        # The normalised tokens do not spell the decoded text (a decoder that rewrites text, as WordPiece's
        # does): use the target tokenizer's offsets if re-encoding the text reproduces the ids, else the DTW.
        ((re_ids, offsets),) = self._tgt_encode([text])
        if offsets is not None and list(re_ids) == ids:
            return offset_spans(offsets, text), text, True
        return None, text, True

    def _align_run(self, tgt_ids, t_spans, text, strict, src_ids, offsets, dtw: bool):
        """One run of text: (source ids, 1:1 pairs, credit per source token, covered per target token, method),
        indices local to the run."""
        n, src_ids = len(tgt_ids), list(src_ids)
        m = len(src_ids)
        none = np.zeros((0, 2), dtype=np.int64)
        if n == 0 or m == 0:
            return src_ids, none, np.full(m, -1), np.zeros(n, dtype=bool), "dtw" if dtw else "spans"
        s_spans = None
        if not dtw and t_spans is not None:
            s_spans = token_spans([self._src_bytes[i] for i in src_ids], text.encode("utf-8"))
            if s_spans is None and offsets is not None:
                s_spans, strict = offset_spans(offsets, text), True
        tgt_norm = [self._tgt_norm[i] for i in tgt_ids]
        src_norm = [self._src_norm[i] for i in src_ids]
        if s_spans is None and not dtw and n * m > MAX_DTW_CELLS:
            log.warning(
                "A %d-token run could not be aligned by spans or offsets and is too long for the DTW fallback: "
                "left unaligned (one-hot targets).", n,
            )
            proportional = np.minimum(np.arange(m) * n // m, n - 1)  # keeps the source's total log-likelihood
            return src_ids, none, proportional, np.ones(n, dtype=bool), "none"
        if s_spans is None:
            groups = dtw_groups(tgt_norm, src_norm)
            pairs = np.asarray(exact_pairs(groups, tgt_norm, src_norm), dtype=np.int64).reshape(-1, 2)
            return src_ids, pairs, group_credit(groups, m), np.ones(n, dtype=bool), "dtw"
        pairs = span_pairs(t_spans, s_spans) if not strict else anchored_pairs(tgt_norm, src_norm, t_spans, s_spans)
        covered = (t_spans[0] >= 0) & (t_spans[1] > t_spans[0])
        return src_ids, pairs, credit(t_spans, s_spans), covered, "offsets" if strict else "spans"
