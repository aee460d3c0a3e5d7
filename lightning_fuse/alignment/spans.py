"""Byte spans of tokens in a block's text, and what they give: 1:1 pairs and the credit of each source token.

Concatenating a block's normalised tokens reproduces its text, so each token covers a byte span ``[start, end)``;
a target token and a source token are aligned 1:1 iff their spans are equal (same text after the same text).
When spans cannot be derived that way (a tokenizer that rewrites text), a tokenizer's offset mapping anchors the
alignment and the DTW runs only in the windows between anchors.
"""

from __future__ import annotations

import numpy as np

from lightning_fuse.alignment.dtw import dtw_groups, exact_pairs

__all__ = ["Spans", "anchored_pairs", "credit", "edge_spans", "offset_spans", "span_pairs", "token_spans"]

Spans = tuple[np.ndarray, np.ndarray]
MAX_WINDOW_CELLS = 16_384  # windowed DTW (offset-anchored fallback) skips windows bigger than this


def token_spans(pieces: list[bytes], text: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Byte spans of tokens whose bytes concatenate to ``text`` (allowing one dummy-prefix space on the first
    non-empty token, as SentencePiece adds); None if they do not spell it."""
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    joined = b"".join(pieces)
    if joined != text:
        first = int(np.argmax(lengths > 0)) if lengths.any() else -1
        if first < 0 or not pieces[first].startswith(b" ") or joined[1:] != text:
            return None
        lengths[first] -= 1
    ends = np.cumsum(lengths)
    return ends - lengths, ends


def _utf8_core(data: bytes) -> tuple[int, int]:
    """[lo, hi) of the longest span of ``data`` that is valid UTF-8 after dropping partial chars at both ends."""
    lo, hi = 0, len(data)
    while lo < hi and lo < 3 and (data[lo] & 0xC0) == 0x80:  # continuation bytes of a char cut at the start
        lo += 1
    for cut in range(4):
        try:
            data[lo : hi - cut].decode("utf-8")
            return lo, hi - cut
        except UnicodeDecodeError:
            continue
    return lo, lo  # invalid bytes inside too (ids that are not a tokenisation of text): no edge case



def offset_spans(offsets, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Character offsets -> byte spans in ``text.encode()``."""
    char_to_byte = np.zeros(len(text) + 1, dtype=np.int64)
    char_to_byte[1:] = np.cumsum([len(c.encode("utf-8", errors="surrogatepass")) for c in text])
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, len(text))
    return char_to_byte[off[:, 0]], char_to_byte[off[:, 1]]


def edge_spans(pieces: list[bytes], text: str) -> tuple[tuple[np.ndarray, np.ndarray], str] | None:
    """Spans when the block starts or ends inside a character. decode() shows the partial character, and with
    byte fallback the whole run of byte tokens around it, as U+FFFD; the source reads the tokens' own bytes
    minus the partial characters instead, and tokens holding partial bytes get span -1 (never aligned).
    None if decode() differs in some other way."""
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    joined = b"".join(pieces)
    lo, hi = _utf8_core(joined)
    if (lo, hi) == (0, len(joined)):
        return None
    core, shift = joined[lo:hi].decode("utf-8"), lo
    if lo == 0 and core.startswith(" ") and not text.startswith(" "):  # SentencePiece dummy prefix
        core, shift = core[1:], 1
    if text.strip("\ufffd") not in core:
        return None
    ends = np.cumsum(lengths)
    starts = ends - lengths
    inside = (starts >= lo) & (ends <= hi)
    return (np.where(inside, np.maximum(starts - shift, 0), -1), np.where(inside, ends - shift, -1)), core


def anchored_pairs(tgt_norm, src_norm, t_spans, s_spans) -> np.ndarray:
    """Anchors: equal non-empty byte spans, unique on both sides, with equal normalised strings; then the DTW
    inside each window between anchors, keeping 1:1 groups with equal strings."""

    def unique(spans):
        keys = list(zip(spans[0].tolist(), spans[1].tolist()))
        count: dict[tuple[int, int], int] = {}
        for key in keys:
            count[key] = count.get(key, 0) + 1
        return keys, count

    t_keys, t_count = unique(t_spans)
    s_keys, s_count = unique(s_spans)
    where = {key: k for k, key in enumerate(s_keys) if s_count[key] == 1}
    anchors: list[tuple[int, int]] = []
    for i, key in enumerate(t_keys):
        k = where.get(key)
        if k is None or t_count[key] != 1 or key[1] <= key[0] or tgt_norm[i] != src_norm[k]:
            continue
        if not anchors or k > anchors[-1][1]:
            anchors.append((i, k))
    pairs = list(anchors)
    bounds = [(-1, -1), *anchors, (len(tgt_norm), len(src_norm))]
    for (i0, k0), (i1, k1) in zip(bounds, bounds[1:]):
        n, m = i1 - i0 - 1, k1 - k0 - 1
        if n > 0 and m > 0 and n * m <= MAX_WINDOW_CELLS:
            tw, sw = tgt_norm[i0 + 1 : i1], src_norm[k0 + 1 : k1]
            pairs += [(i0 + 1 + a, k0 + 1 + b) for a, b in exact_pairs(dtw_groups(tw, sw), tw, sw)]
    return np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def span_pairs(t_spans: Spans, s_spans: Spans) -> np.ndarray:
    """``[P, 2]`` (target index, source index) of the tokens with equal non-empty spans (spans sorted)."""
    (t_start, t_end), (s_start, s_end) = t_spans, s_spans
    if len(s_end) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    k = np.minimum(np.searchsorted(s_end, t_end, side="left"), len(s_end) - 1)
    hit = (t_end > t_start) & (t_start >= 0) & (s_end[k] == t_end) & (s_start[k] == t_start)
    i = np.nonzero(hit)[0]
    return np.stack([i, k[i]], axis=1).astype(np.int64)


def credit(t_spans: Spans, s_spans: Spans) -> np.ndarray:
    """``[M]``: the target token whose span holds each source token's last byte (-1: none).

    The source's log-likelihood of its token is credited to that target token, so that summing over a target
    range gives the source's log-likelihood of the same text. An empty source token (a lone dummy-prefix '▁')
    is credited to the target token holding the byte after it.
    """
    (t_start, t_end), (s_start, s_end) = t_spans, s_spans
    out = np.full(len(s_end), -1, dtype=np.int64)
    valid_t = (t_start >= 0) & (t_end > t_start)
    if not valid_t.any() or len(s_end) == 0:
        return out
    order = np.nonzero(valid_t)[0]
    ends, starts = t_end[order], t_start[order]
    key = np.where(s_end > s_start, s_end, s_start + 1)
    at = np.searchsorted(ends, key, side="left")
    ok = (s_start >= 0) & (at < len(order))
    at = np.minimum(at, len(order) - 1)
    ok &= (starts[at] < key) & (key <= ends[at])
    out[ok] = order[at[ok]]
    return out


def group_credit(groups: list[tuple[list[int], list[int]]], n_src: int) -> np.ndarray:
    """``[M]`` credit from DTW groups: each source token to the last target token of its group."""
    out = np.full(n_src, -1, dtype=np.int64)
    for tgt, src in groups:
        if tgt:
            out[src] = tgt[-1]
    return out
