"""Cross-tokenizer token alignment: which source next-token distribution to use at which target position.

FuseLLM (METHOD.md §2) aligns the source and target tokenisations of the same text with a DTW whose cost is
the edit distance between token strings, then carries the source distribution over wherever a target token is
aligned one-to-one. That DTW is quadratic in the block length and, in the reference code, compares raw token
strings, so GPT-2 'Ġthe' never equals SentencePiece '▁the'. Here:

1. every token is normalised to the exact text (bytes) it stands for (`normalize_token`);
2. concatenating the normalised tokens reproduces the block's text, so each token covers a byte span
   ``[start, end)`` of it; a target token and a source token are aligned 1:1 iff their spans are equal: a
   linear merge instead of a quadratic DP, and never a misalignment (same span = same text = same context);
3. when spans cannot be derived that way (the source tokenizer changes the text: lowercasing, NFKC, '<unk>'),
   the tokenizer's offset mapping anchors the alignment and the edit-distance DTW only runs in the windows
   between anchors; a 1:1 DTW pair only counts when both normalised strings are equal;
4. source vocabulary ids are mapped to target ids once per tokenizer pair ("exact" or "min_ed"), cached on disk.

Conventions: ``tgt_ids`` has length L; position ``t`` predicts token ``t + 1``; ``src_pos[t] = j`` means the
source's next-token distribution at source position ``j`` is used at target position ``t`` (target token
``t + 1`` is the same text as source token ``j + 1``); -1 means no aligned source distribution (one-hot on the
gold token downstream).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

# Bumped whenever aligned source outputs change for the same tokenizers (part of an offline cache's identity).
# 2: role-paired special tokens are read in the source's spelling.
ALIGNMENT_VERSION = 2

__all__ = [
    "AlignedBatch",
    "AlignedBlock",
    "TokenAligner",
    "alignment_rate",
    "build_vocab_map",
    "dtw_align",
    "tokenizer_kind",
    "normalize_token",
]

_VOCAB_MAP_VERSION = 1  # bump when normalisation or tie-breaking changes: it is part of the cache key
_MAX_WINDOW_CELLS = 16_384  # windowed DTW (offset-anchored fallback) skips windows bigger than this
_MAX_DTW_CELLS = 1 << 20  # the full-DTW fallback (about 1 s per 1M cells) leaves bigger blocks unaligned


# ---------------------------------------------------------------------------------------------------------------
# Token normalisation
# ---------------------------------------------------------------------------------------------------------------
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


def _to_bytes(normalized: str) -> bytes:
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


def _vocab_strings(tokenizer) -> list[str | None]:
    """id -> token string for ids ``0 .. max(len(tokenizer), max id + 1) - 1``; None for unused ids."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    strings: list[str | None] = [None] * size
    for tok, i in vocab.items():
        strings[i] = tok
    return strings


# ---------------------------------------------------------------------------------------------------------------
# Reference DTW (FuseLLM), edit-distance cost on normalised strings
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 18)
def _levenshtein(a: str, b: str) -> int:
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _dtw_groups(tgt: Sequence[str], src: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """DTW of two (already normalised) string sequences, as FuseLLM's ``dtw``: O(len(tgt) * len(src))."""
    n, m = len(tgt), len(src)
    if n == 0 or m == 0:
        return [] if n == m == 0 else [(list(range(n)), list(range(m)))]
    inf = float("inf")
    rows = []
    prev = [0.0] + [inf] * m
    for i in range(n):
        a = tgt[i]
        cur = [inf] * (m + 1)
        for j in range(m):
            best = prev[j] if prev[j] < prev[j + 1] else prev[j + 1]
            if cur[j] < best:
                best = cur[j]
            cur[j + 1] = best + _levenshtein(a, src[j])
        rows.append(cur)
        prev = cur
    # Backtrack from the end; on ties prefer the diagonal, then i - 1, then j - 1 (np.argmin order in FuseLLM).
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = rows[i - 1][j] if i > 0 and j > 0 else inf
        up = rows[i - 1][j + 1] if i > 0 else inf
        left = rows[i][j] if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    # A diagonal step starts a new group; horizontal/vertical steps extend the current one.
    groups: list[tuple[list[int], list[int]]] = [([0], [0])]
    for (pi, pj), (ci, cj) in zip(path, path[1:]):
        if ci != pi and cj != pj:
            groups.append(([ci], [cj]))
        elif ci != pi:
            groups[-1][0].append(ci)
        else:
            groups[-1][1].append(cj)
    return groups


def dtw_align(
    tgt_tokens: Sequence[str], src_tokens: Sequence[str], *, normalize: bool = True
) -> list[tuple[list[int], list[int]]]:
    """Align two token sequences with FuseLLM's DTW (cost: edit distance between normalised strings).

    Reference implementation, quadratic in time and memory; `TokenAligner` is the fast path.

    Args:
        tgt_tokens: target token strings (e.g. ``convert_ids_to_tokens``).
        src_tokens: source token strings.
        normalize: apply `normalize_token` first, the tokenizer kind guessed per sequence (byte-level when a token
            has a remapped GPT-2 char such as 'Ġ' and none has '▁'); pass False for already normalised strings.

    Returns:
        The warping path cut into groups ``(target indices, source indices)``, in order, covering both sequences.
        A group with one index on each side is a 1:1 alignment; ``[([0, 1], [0])]`` is many-to-one.
    """
    if normalize:
        tgt_tokens, src_tokens = (_normalize_sequence(s) for s in (tgt_tokens, src_tokens))
    return _dtw_groups(list(tgt_tokens), list(src_tokens))


def _normalize_sequence(tokens: Sequence[str]) -> list[str]:
    byte_level = not any("▁" in t for t in tokens) and any(c in _REMAPPED_CHARS for t in tokens for c in t)
    return [normalize_token(t, kind="byte_level" if byte_level else None) for t in tokens]


def _exact_pairs(groups, tgt: Sequence[str], src: Sequence[str]) -> list[tuple[int, int]]:
    """(i, k) for the 1:1 groups whose normalised strings are equal."""
    return [
        (g[0][0], g[1][0]) for g in groups if len(g[0]) == len(g[1]) == 1 and tgt[g[0][0]] == src[g[1][0]]
    ]


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary map: source id -> target id
# ---------------------------------------------------------------------------------------------------------------
def _levenshtein_matrix_torch(queries: list[str], targets: list[str]) -> np.ndarray:
    """[Q, K] edit distances by the plain DP, rows vectorised; all queries one length, all targets one length."""
    m, n = len(queries[0]), len(targets[0])
    a = torch.tensor([[ord(c) for c in q] for q in queries], dtype=torch.int32)  # [Q, m]
    b = torch.tensor([[ord(c) for c in t] for t in targets], dtype=torch.int32)  # [K, n]
    ar = torch.arange(n + 1, dtype=torch.int32)
    out = np.empty((len(queries), len(targets)), dtype=np.int64)
    chunk = max(1, 2_000_000 // (len(targets) * (n + 1)))
    for q0 in range(0, len(queries), chunk):
        aq = a[q0 : q0 + chunk]
        prev = ar.expand(aq.shape[0], len(targets), n + 1)  # distances from the empty query prefix
        for i in range(m):
            sub = (aq[:, i, None, None] != b[None]).to(torch.int32)  # [q, K, n]
            tmp = torch.cat(
                [prev[..., :1] + 1, torch.minimum(prev[..., 1:] + 1, prev[..., :-1] + sub)], dim=-1
            )
            prev = torch.cummin(tmp - ar, dim=-1).values + ar  # insertions: min_{j' <= j} tmp[j'] + (j - j')
        out[q0 : q0 + chunk] = prev[..., n].numpy()
    return out


def _levenshtein_matrix_myers(patterns: list[str], texts: list[str]) -> np.ndarray:
    """[P, T] edit distances with Myers' bit-parallel algorithm (Hyyrö's Levenshtein form) vectorised over all
    pairs; all patterns one length m <= 64, all texts one length."""
    m, n = len(patterns[0]), len(texts[0])
    alphabet: dict[str, int] = {}
    pidx = np.array([[alphabet.setdefault(c, len(alphabet)) for c in p] for p in patterns], dtype=np.int64)
    # [P, chars + 1] bit i set where pattern char i is that char; last column: a char in no pattern
    peq = np.zeros((len(patterns), len(alphabet) + 1), dtype=np.uint64)
    rows = np.arange(len(patterns))
    for i in range(m):
        peq[rows, pidx[:, i]] |= np.uint64(1 << i)
    tidx = np.array([[alphabet.get(c, len(alphabet)) for c in t] for t in texts], dtype=np.int64)  # [T, n]
    one, top = np.uint64(1), np.uint64(m - 1)
    mask = np.uint64((1 << m) - 1)
    out = np.empty((len(patterns), len(texts)), dtype=np.int64)
    chunk = max(1, 1_000_000 // len(patterns))
    for t0 in range(0, len(texts), chunk):
        ti = tidx[t0 : t0 + chunk]
        pv = np.full((len(patterns), len(ti)), mask, dtype=np.uint64)
        mv = np.zeros_like(pv)
        score = np.full(pv.shape, m, dtype=np.int64)
        for j in range(n):
            eq = peq[:, ti[:, j]]
            xv = eq | mv
            xh = (((eq & pv) + pv) ^ pv) | eq
            ph = mv | ~(xh | pv)
            mh = pv & xh
            score += ((ph >> top) & one).astype(np.int64)
            score -= ((mh >> top) & one).astype(np.int64)
            ph = (ph << one) | one
            pv = ((mh << one) | ~(xv | ph)) & mask
            mv = ph & xv & mask
        out[:, t0 : t0 + chunk] = score
    return out


def _levenshtein_matrix_numpy(queries: list[str], targets: list[str], score_cutoff: int | None) -> np.ndarray:
    """[Q, K] edit distances; all queries one length, all targets one length."""
    del score_cutoff  # exact distances are fine
    m, n = len(queries[0]), len(targets[0])
    if m == 0 or n == 0:
        return np.full((len(queries), len(targets)), max(m, n), dtype=np.int64)
    if m <= 64:
        return _levenshtein_matrix_myers(queries, targets)
    if n <= 64:
        return _levenshtein_matrix_myers(targets, queries).T
    return _levenshtein_matrix_torch(queries, targets)


def _levenshtein_matrix_rapidfuzz(
    queries: list[str], targets: list[str], score_cutoff: int | None
) -> np.ndarray:
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    return cdist(
        queries, targets, scorer=Levenshtein.distance, dtype=np.int32, workers=-1, score_cutoff=score_cutoff
    )


def _default_kernel():
    try:
        import rapidfuzz  # noqa: F401
    except ImportError:
        return _levenshtein_matrix_numpy
    return _levenshtein_matrix_rapidfuzz


def _min_edit_distance_search(queries: list[str], targets: list[str], kernel=None) -> np.ndarray:
    """For each query, the index of the target with minimum edit distance.

    Ties: the smaller length difference, then the lower index. Exact and length-pruned: edit distance >= length
    difference, so target lengths are visited in rings ``|len(t) - len(q)| = 0, 1, 2, ...`` and a query leaves
    the search once its best distance is <= the ring (no farther target can beat it, or tie it with a smaller
    length difference).
    """
    kernel = kernel or _default_kernel()
    by_len: dict[int, list[int]] = {}
    for k, t in enumerate(targets):
        by_len.setdefault(len(t), []).append(k)
    q_by_len: dict[int, list[int]] = {}
    for qi, q in enumerate(queries):
        q_by_len.setdefault(len(q), []).append(qi)
    result = np.full(len(queries), -1, dtype=np.int64)
    max_len = max(by_len, default=0)
    for m, q_idx in q_by_len.items():
        best = np.full(len(q_idx), np.iinfo(np.int64).max, dtype=np.int64)
        best_k = np.full(len(q_idx), -1, dtype=np.int64)
        for r in range(max(m, max_len) + 1):
            active = np.nonzero(best > r)[0]
            if active.size == 0:
                break
            ring_d = np.full(active.size, np.iinfo(np.int64).max, dtype=np.int64)
            ring_k = np.full(active.size, -1, dtype=np.int64)
            for n in sorted({m - r, m + r}):
                if n not in by_len:
                    continue
                t_idx = np.asarray(by_len[n])
                finite = best[active][best[active] < np.iinfo(np.int64).max]
                cutoff = int(finite.max()) if finite.size == active.size and finite.size else None
                d = kernel([queries[q_idx[a]] for a in active], [targets[k] for k in t_idx], cutoff)
                d = np.asarray(d, dtype=np.int64)
                arg = d.argmin(axis=1)  # first minimum = lowest target index in this bucket
                dmin, kmin = d[np.arange(active.size), arg], t_idx[arg]
                better = (dmin < ring_d) | ((dmin == ring_d) & (kmin < ring_k))
                ring_d[better], ring_k[better] = dmin[better], kmin[better]
            improve = ring_d < best[active]
            best[active[improve]] = ring_d[improve]
            best_k[active[improve]] = ring_k[improve]
        result[np.asarray(q_idx)] = best_k
    return result


def _special_role_pairs(src_tokenizer, tgt_tokenizer) -> list[tuple[int, int]]:
    pairs = []
    for role in ("unk_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        s, t = getattr(src_tokenizer, role, None), getattr(tgt_tokenizer, role, None)
        if isinstance(s, int) and isinstance(t, int):
            pairs.append((s, t))
    return pairs


def _target_priority(strings: list[str | None], special_ids: set[int]) -> list[int]:
    """Target ids in preference order for equal strings: regular tokens before byte-fallback/special ones
    (a SentencePiece target spells 'a' as 'a', never as '<0x61>'), then by id."""
    ids = [i for i, s in enumerate(strings) if s is not None]
    return sorted(
        ids, key=lambda i: (i in special_ids or _BYTE_FALLBACK.fullmatch(strings[i]) is not None, i)
    )


def build_vocab_map(
    src_tokenizer,
    tgt_tokenizer,
    mode: Literal["exact", "min_ed"] = "min_ed",
    cache_dir: str | Path | None = None,
) -> torch.LongTensor:
    """Map every source vocabulary id to a target id, by normalised string (see `normalize_token`).

    - ``"exact"``: the target token with the same normalised string, -1 if there is none.
    - ``"min_ed"``: exact where possible, else the target token with minimum edit distance between normalised
      strings (ties: smaller length difference, then lower id; target special tokens are never candidates).

    In both modes tokens with the same special role (unk, pad, bos, eos) map to each other; among target tokens
    with the same normalised string, the one with the same raw string wins (identical tokenizers give the
    identity map), then a regular token over a byte-fallback or special one ('a' over '<0x61>'), then the lower
    id.
    Ids with no token (gaps in the vocabulary) map to -1.

    Args:
        src_tokenizer: source tokenizer (``get_vocab()``, ``len()``).
        tgt_tokenizer: target tokenizer.
        mode: ``"exact"`` or ``"min_ed"``.
        cache_dir: if set, the map is saved there as ``vocab_map-{mode}-{hash}.pt`` (a LongTensor, written to a
            temporary file then renamed) and loaded on later calls; the hash covers both vocabularies, the mode
            and the normalisation version.

    Returns:
        LongTensor ``[len(src vocab)]``.

    Edit distances use ``rapidfuzz`` when it is installed (about 7x faster on 50k vocabularies), else Myers'
    bit-parallel algorithm vectorised in numpy; both give the same map.
    """
    if mode not in ("exact", "min_ed"):
        raise ValueError(f"`mode` can be 'exact' or 'min_ed', got {mode!r}")
    src_strings, tgt_strings = _vocab_strings(src_tokenizer), _vocab_strings(tgt_tokenizer)
    src_kind, tgt_kind = tokenizer_kind(src_tokenizer), tokenizer_kind(tgt_tokenizer)
    role_pairs = _special_role_pairs(src_tokenizer, tgt_tokenizer)
    path = None
    if cache_dir is not None:
        key = json.dumps([_VOCAB_MAP_VERSION, mode, src_strings, tgt_strings, src_kind, tgt_kind, role_pairs])
        digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()[:24]
        path = Path(cache_dir).expanduser() / f"vocab_map-{mode}-{digest}.pt"
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # a truncated or foreign file: rebuild it
                log.warning("Ignoring unreadable vocab map cache %s (%s); rebuilding it.", path, err)
            else:
                if (
                    isinstance(cached, torch.Tensor)
                    and cached.dtype == torch.long
                    and cached.shape == (len(src_strings),)
                ):
                    return cached
                log.warning("Ignoring vocab map cache %s of unexpected shape/dtype; rebuilding it.", path)

    t0 = time.perf_counter()
    src_norm = [None if s is None else normalize_token(s, kind=src_kind) for s in src_strings]
    tgt_norm = [None if s is None else normalize_token(s, kind=tgt_kind) for s in tgt_strings]
    tgt_special = set(getattr(tgt_tokenizer, "all_special_ids", []))
    order = _target_priority(tgt_strings, tgt_special)
    exact: dict[str, int] = {}
    for i in order:
        exact.setdefault(tgt_norm[i], i)
    raw = {s: i for i, s in enumerate(tgt_strings) if s is not None}  # same token string first: identity map
    vocab_map = np.array(
        [
            -1 if s is None else raw[r] if r in raw and tgt_norm[raw[r]] == s else exact.get(s, -1)
            for r, s in zip(src_strings, src_norm)
        ],
        dtype=np.int64,
    )
    for s, t in role_pairs:
        if 0 <= s < len(vocab_map) and 0 <= t < len(tgt_strings):
            vocab_map[s] = t
    n_exact = int((vocab_map >= 0).sum())
    cand_ids = [i for i in order if i not in tgt_special]
    if mode == "min_ed" and cand_ids:
        unmatched = [i for i, s in enumerate(src_norm) if s is not None and vocab_map[i] < 0]
        seen: set[str] = set()
        cand_ids = [i for i in cand_ids if not (tgt_norm[i] in seen or seen.add(tgt_norm[i]))]
        # ties by index = by preference order, i.e. regular tokens first, then id
        best = _min_edit_distance_search([src_norm[i] for i in unmatched], [tgt_norm[i] for i in cand_ids])
        vocab_map[unmatched] = np.asarray(cand_ids, dtype=np.int64)[best]
    out = torch.from_numpy(vocab_map)
    log.info(
        "vocab map (%s): %d source ids, %d exact, built in %.2fs",
        mode,
        len(vocab_map),
        n_exact,
        time.perf_counter() - t0,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(out, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fast aligner
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AlignedBlock:
    """Alignment of one target block.

    Attributes:
        src_ids: source-tokenizer ids of the block's text (no special tokens added).
        src_pos: ``[L]``; ``src_pos[t] = j >= 0``: use the source distribution at source position ``j`` at target
            position ``t`` (target token ``t + 1`` is the same text as source token ``j + 1``, and both contexts
            cover the same text); -1 elsewhere, always at ``t = L - 1``.
        method: how it was aligned: ``"spans"`` (normalised tokens spell the text: exact byte spans, the usual
            case), ``"offsets"`` (spans from a tokenizer's offset mapping + windowed DTW), ``"dtw"`` (full DTW
            on the normalised token strings, when there are no offsets either), ``"none"`` (no method applied:
            too long for the DTW fallback; all -1).
    """

    src_ids: list[int]
    src_pos: list[int]
    method: str = field(default="spans")


@dataclass
class AlignedBatch:
    """Alignment of a batch of target blocks ``[B, L]``.

    Attributes:
        src_ids: ``[B, M]`` source ids, right-padded with the source pad id (eos, or 0, if it has none).
        src_mask: ``[B, M]`` True on real source tokens.
        src_pos: ``[B, L]`` as `AlignedBlock.src_pos`, -1 = no aligned source distribution.
    """

    src_ids: torch.Tensor
    src_mask: torch.Tensor
    src_pos: torch.Tensor


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


def _spans(pieces: list[bytes], text: bytes) -> tuple[np.ndarray, np.ndarray] | None:
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
    """

    def __init__(
        self,
        src_tokenizer,
        tgt_tokenizer,
        mode: Literal["exact", "min_ed"] = "min_ed",
        cache_dir: str | Path | None = None,
    ) -> None:
        self.src_tokenizer, self.tgt_tokenizer, self.mode = src_tokenizer, tgt_tokenizer, mode
        self.vocab_map = build_vocab_map(src_tokenizer, tgt_tokenizer, mode=mode, cache_dir=cache_dir)
        self._src_norm, self._src_bytes = self._tables(src_tokenizer)
        self._tgt_norm, self._tgt_bytes = self._tables(tgt_tokenizer)
        # The source reads a target special token (e.g. the EOS that joins packed documents) as its own special
        # token of the same role, not as the characters of the target's string ('</s>' -> '<|endoftext|>').
        self._special_text: dict[str, str] = {}
        self._special_ids: set[int] = set()
        for s_id, t_id in _special_role_pairs(src_tokenizer, tgt_tokenizer):  # eos last: it wins shared ids
            t_str, s_str = tgt_tokenizer.convert_ids_to_tokens(t_id), src_tokenizer.convert_ids_to_tokens(s_id)
            if not (isinstance(t_str, str) and isinstance(s_str, str)) or t_str == s_str:
                continue
            self._special_text[t_str] = s_str
            self._special_ids.add(t_id)
            self._tgt_norm[t_id], self._tgt_bytes[t_id] = self._src_norm[s_id], self._src_bytes[s_id]
        self._special_pattern = (
            re.compile("|".join(re.escape(t) for t in sorted(self._special_text, key=len, reverse=True)))
            if self._special_text else None
        )
        pad = getattr(src_tokenizer, "pad_token_id", None)
        if not isinstance(pad, int):
            pad = getattr(src_tokenizer, "eos_token_id", None)
        self.src_pad_id = pad if isinstance(pad, int) else 0

    @staticmethod
    def _tables(tokenizer) -> tuple[list[str], list[bytes]]:
        kind = tokenizer_kind(tokenizer)
        norm = ["" if s is None else normalize_token(s, kind=kind) for s in _vocab_strings(tokenizer)]
        return norm, [_to_bytes(s) for s in norm]

    # -- tokenizer calls ------------------------------------------------------------------------------------------
    def _decode(self, batch: list[list[int]]) -> list[str]:
        """The text the source reads: the target ids decoded, with role-paired special tokens in the source's
        spelling."""
        tok = self.tgt_tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            texts = backend.decode_batch(batch, skip_special_tokens=False)
        else:
            texts = [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in batch]
        if self._special_pattern is None:
            return texts
        swap = self._special_pattern.sub
        return [
            swap(lambda m: self._special_text[m.group()], text) if self._special_ids.intersection(ids) else text
            for ids, text in zip(batch, texts)
        ]

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

    def align_batch(self, tgt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AlignedBatch:
        """Align a batch of target blocks.

        Args:
            tgt_ids: ``[B, L]`` target ids.
            attention_mask: optional ``[B, L]``, True/1 on real tokens (left or right padding): the padded tokens
                are not part of the text and their positions get -1.
        """
        if tgt_ids.dim() != 2:
            raise ValueError(f"`tgt_ids` must be [B, L], got shape {tuple(tgt_ids.shape)}")
        bsz, length = tgt_ids.shape
        rows = tgt_ids.tolist()
        keep = None
        if attention_mask is not None:
            keep = [torch.nonzero(m).flatten() for m in attention_mask.bool()]
            rows = [[r[i] for i in k.tolist()] for r, k in zip(rows, keep)]
        blocks = self._align_many(rows)
        m = max((len(b.src_ids) for b in blocks), default=0)
        src_ids = torch.full((bsz, m), self.src_pad_id, dtype=torch.long)
        src_mask = torch.zeros((bsz, m), dtype=torch.bool)
        src_pos = torch.full((bsz, length), -1, dtype=torch.long)
        for b, blk in enumerate(blocks):
            src_ids[b, : len(blk.src_ids)] = torch.tensor(blk.src_ids, dtype=torch.long)
            src_mask[b, : len(blk.src_ids)] = True
            pos = torch.tensor(blk.src_pos, dtype=torch.long)
            if keep is None:
                src_pos[b, : len(pos)] = pos
            else:
                src_pos[b, keep[b]] = pos
        return AlignedBatch(src_ids=src_ids, src_mask=src_mask, src_pos=src_pos)

    def _align_many(self, rows: list[list[int]], dtw: bool = False) -> list[AlignedBlock]:
        n_tgt = len(self._tgt_bytes)
        for r in rows:
            bad = [i for i in r if not 0 <= i < n_tgt]
            if bad:
                raise ValueError(f"`tgt_ids` must be in [0, {n_tgt}) (target vocabulary), got {bad[:5]}")
        texts = self._decode(rows)
        prepared = [self._target_spans(r, text) for r, text in zip(rows, texts)]
        encoded = _encode(self.src_tokenizer, [text for _, text, _ in prepared])
        return [
            self._align_one(r, t_spans, text, t_strict, src_ids, offsets, dtw)
            for r, (t_spans, text, t_strict), (src_ids, offsets) in zip(rows, prepared, encoded)
        ]

    def _target_spans(
        self, ids: list[int], text: str
    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, str, bool]:
        """Byte spans of the target tokens in the text the source will read, that text, and whether the spans
        come from the tokenizer's offsets (then a 1:1 pair must also have equal normalised strings)."""
        pieces = [self._tgt_bytes[i] for i in ids]
        spans = _spans(pieces, text.encode("utf-8"))
        if spans is not None:
            return spans, text, False
        edge = _edge_spans(pieces, text)
        if edge is not None:
            return edge[0], edge[1], False
        # The normalised tokens do not spell the decoded text (a decoder that rewrites text, as WordPiece's
        # does): use the target tokenizer's offsets if re-encoding the text reproduces the ids, else the DTW.
        ((re_ids, offsets),) = _encode(self.tgt_tokenizer, [text])
        if offsets is not None and list(re_ids) == ids:
            return _offset_spans(offsets, text), text, True
        return None, text, True

    def _align_one(self, tgt_ids, t_spans, text, strict, src_ids, offsets, dtw: bool) -> AlignedBlock:
        length = len(tgt_ids)
        src_pos = np.full(length, -1, dtype=np.int64)
        src_ids = list(src_ids)
        if length == 0 or not src_ids:
            return AlignedBlock(src_ids, src_pos.tolist(), "dtw" if dtw else "spans")
        s_spans = None
        if not dtw and t_spans is not None:
            s_spans = _spans([self._src_bytes[i] for i in src_ids], text.encode("utf-8"))
            if s_spans is None and offsets is not None:
                s_spans, strict = _offset_spans(offsets, text), True
        tgt_norm = [self._tgt_norm[i] for i in tgt_ids]
        src_norm = [self._src_norm[i] for i in src_ids]
        if s_spans is None and not dtw and length * len(src_ids) > _MAX_DTW_CELLS:
            log.warning(
                "A %d-token block could not be aligned by spans or offsets and is too long for the DTW fallback: "
                "left unaligned (one-hot targets).",
                length,
            )
            return AlignedBlock(src_ids, src_pos.tolist(), "none")
        if s_spans is None:
            pairs = np.asarray(
                _exact_pairs(_dtw_groups(tgt_norm, src_norm), tgt_norm, src_norm), dtype=np.int64
            )
            method = "dtw"
        elif not strict:
            # Equal non-empty byte spans = the same text: 1:1. Spans are sorted, so one binary search each.
            (t_start, t_end), (s_start, s_end) = t_spans, s_spans
            k = np.minimum(np.searchsorted(s_end, t_end, side="left"), len(src_ids) - 1)
            hit = (t_end > t_start) & (t_start >= 0) & (s_end[k] == t_end) & (s_start[k] == t_start)
            i = np.nonzero(hit)[0]
            pairs = np.stack([i, k[i]], axis=1)
            method = "spans"
        else:
            pairs = _anchored_pairs(tgt_norm, src_norm, t_spans, s_spans)
            method = "offsets"
        if len(pairs):
            pairs = pairs[(pairs[:, 0] >= 1) & (pairs[:, 1] >= 1)]
            src_pos[pairs[:, 0] - 1] = pairs[:, 1] - 1
        return AlignedBlock(src_ids, src_pos.tolist(), method)


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
    """(ids, character offsets) per text, no special tokens; offsets None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [(tokenizer(t, add_special_tokens=False)["input_ids"], None) for t in texts]


def _offset_spans(offsets, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Character offsets -> byte spans in ``text.encode()``."""
    char_to_byte = np.zeros(len(text) + 1, dtype=np.int64)
    char_to_byte[1:] = np.cumsum([len(c.encode("utf-8", errors="surrogatepass")) for c in text])
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, len(text))
    return char_to_byte[off[:, 0]], char_to_byte[off[:, 1]]


def _edge_spans(pieces: list[bytes], text: str) -> tuple[tuple[np.ndarray, np.ndarray], str] | None:
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


def _anchored_pairs(tgt_norm, src_norm, t_spans, s_spans) -> np.ndarray:
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
        if n > 0 and m > 0 and n * m <= _MAX_WINDOW_CELLS:
            tw, sw = tgt_norm[i0 + 1 : i1], src_norm[k0 + 1 : k1]
            pairs += [(i0 + 1 + a, k0 + 1 + b) for a, b in _exact_pairs(_dtw_groups(tw, sw), tw, sw)]
    return np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)
