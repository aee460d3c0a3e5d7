"""FuseLLM's DTW over two token sequences, the edit distance between normalised token strings as the cost.

Quadratic: the reference path and the fallback for text whose tokens do not spell it byte for byte (see
`spans`). Edit distances come from ``rapidfuzz`` (one ``cdist`` per alignment).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from lightning_fuse.alignment.normalize import _REMAPPED_CHARS, normalize_token

__all__ = ["dtw_align", "dtw_groups", "exact_pairs"]


def dtw_groups(tgt: Sequence[str], src: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """DTW of two (already normalised) string sequences, as FuseLLM's ``dtw``: O(len(tgt) * len(src))."""
    n, m = len(tgt), len(src)
    if n == 0 or m == 0:
        return [] if n == m == 0 else [(list(range(n)), list(range(m)))]
    cost = cdist(list(tgt), list(src), scorer=Levenshtein.distance, dtype=np.int32).tolist()
    inf = float("inf")
    rows = []
    prev = [0.0] + [inf] * m
    for i in range(n):
        c = cost[i]
        cur = [inf] * (m + 1)
        for j in range(m):
            best = prev[j] if prev[j] < prev[j + 1] else prev[j + 1]
            if cur[j] < best:
                best = cur[j]
            cur[j + 1] = best + c[j]
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
    return dtw_groups(list(tgt_tokens), list(src_tokens))


def _normalize_sequence(tokens: Sequence[str]) -> list[str]:
    byte_level = not any("▁" in t for t in tokens) and any(c in _REMAPPED_CHARS for t in tokens for c in t)
    return [normalize_token(t, kind="byte_level" if byte_level else None) for t in tokens]


def exact_pairs(groups, tgt: Sequence[str], src: Sequence[str]) -> list[tuple[int, int]]:
    """(i, k) for the 1:1 groups whose normalised strings are equal."""
    return [
        (g[0][0], g[1][0]) for g in groups if len(g[0]) == len(g[1]) == 1 and tgt[g[0][0]] == src[g[1][0]]
    ]

