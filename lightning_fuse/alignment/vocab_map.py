"""Vocabulary map: each source vocabulary id -> a target id ("exact" string, or nearest by edit distance)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist
from tqdm.auto import tqdm

from lightning_fuse.alignment.normalize import (
    _BYTE_FALLBACK,
    normalize_token,
    special_ids,
    tokenizer_kind,
    vocab_strings,
)

log = logging.getLogger(__name__)

__all__ = ["DROPPED", "EXACT", "MAX_DISTANCE", "MIN_ED", "build_vocab_map", "special_role_pairs"]

VOCAB_MAP_VERSION = 2  # bump when normalisation, cutoff or tie-breaking changes: it is part of the cache key
MAX_DISTANCE = 0.5
"""Default cutoff of ``min_ed``: normalised edit distance ``d / max(len(a), len(b))`` of an accepted pair."""
DROPPED, EXACT, MIN_ED = 0, 1, 2
"""Mapping kinds (`build_vocab_map` with ``with_kind=True``): no target token, same string, nearest string."""
_CHUNK = 1024  # queries per edit-distance matrix (1024 x 50k int32 = 200 MB at most)


def special_role_pairs(src_tokenizer, tgt_tokenizer) -> list[tuple[int, int]]:
    """(source id, target id) of the special tokens with the same role (unk, pad, bos, eos; eos last)."""
    pairs = []
    for role in ("unk_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        s, t = getattr(src_tokenizer, role, None), getattr(tgt_tokenizer, role, None)
        if isinstance(s, int) and isinstance(t, int):
            pairs.append((s, t))
    return pairs


def _target_priority(strings: list[str | None], specials: set[int]) -> list[int]:
    """Target ids in preference order for equal strings: regular tokens before byte-fallback/special ones
    (a SentencePiece target spells 'a' as 'a', never as '<0x61>'), then by id."""
    ids = [i for i, s in enumerate(strings) if s is not None]
    return sorted(ids, key=lambda i: (i in specials or _BYTE_FALLBACK.fullmatch(strings[i]) is not None, i))


def build_vocab_map(
    src_tokenizer,
    tgt_tokenizer,
    mode: Literal["exact", "min_ed"] = "min_ed",
    cache_dir: str | Path | None = None,
    max_distance: float = MAX_DISTANCE,
    with_kind: bool = False,
    progress: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Map every source vocabulary id to a target id, by normalised string (see `normalize_token`).

    - ``"exact"``: the target token with the same normalised string, -1 if there is none.
    - ``"min_ed"``: exact where possible, else the target token with minimum edit distance between normalised
      strings, if that distance is at most ``max_distance`` of the longer string (ties: smaller length
      difference, then lower id), else -1. '東京都' never maps to 'ing' (no shared character): its probability
      mass goes to the "other" bucket instead of onto an unrelated token.

    Special tokens: tokens with the same role (unk, pad, bos, eos) map to each other; any other source special
    token maps only to a target special token with the same string, never to a regular token; target special
    tokens are never edit-distance candidates. Among target tokens with the same normalised string, the one with
    the same raw string wins (identical tokenizers give the identity map), then a regular token over a
    byte-fallback or special one ('a' over '<0x61>'), then the lower id. Ids with no token map to -1.

    Args:
        src_tokenizer: source tokenizer (``get_vocab()``, ``len()``).
        tgt_tokenizer: target tokenizer.
        mode: ``"exact"`` or ``"min_ed"``.
        cache_dir: if set, the map is saved there as ``vocab_map-{mode}-{hash}.pt`` (readable by others as the
            umask allows; written to a temporary file then renamed) and loaded on later calls; the hash covers
            both vocabularies, the mode, the cutoff and the normalisation version.
        max_distance: ``min_ed`` cutoff on the normalised edit distance, in [0, 1].
        with_kind: also return the kind of each mapping (`EXACT`, `MIN_ED` or `DROPPED`), int8 ``[V_src]``.
        progress: show a progress bar while searching nearest strings (the slow part: ~2 min for 262k x 49k).

    Returns:
        LongTensor ``[len(src vocab)]`` (and the kinds when ``with_kind``).
    """
    if mode not in ("exact", "min_ed"):
        raise ValueError(f"`mode` can be 'exact' or 'min_ed', got {mode!r}")
    if not 0.0 <= max_distance <= 1.0:
        raise ValueError(f"`max_distance` must be in [0, 1] (a normalised edit distance), got {max_distance}")
    src_strings, tgt_strings = vocab_strings(src_tokenizer), vocab_strings(tgt_tokenizer)
    src_kind, tgt_kind = tokenizer_kind(src_tokenizer), tokenizer_kind(tgt_tokenizer)
    role_pairs = special_role_pairs(src_tokenizer, tgt_tokenizer)
    src_special, tgt_special = special_ids(src_tokenizer), special_ids(tgt_tokenizer)
    path = None
    if cache_dir is not None:
        key = json.dumps([VOCAB_MAP_VERSION, mode, max_distance if mode == "min_ed" else None, src_strings,
                          tgt_strings, src_kind, tgt_kind, role_pairs, sorted(src_special), sorted(tgt_special)])
        digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()[:24]
        path = Path(cache_dir).expanduser() / f"vocab_map-{mode}-{digest}.pt"
        cached = _load(path, len(src_strings))
        if cached is not None:
            return cached if with_kind else cached[0]

    t0 = time.perf_counter()
    src_norm = [None if s is None else normalize_token(s, kind=src_kind) for s in src_strings]
    tgt_norm = [None if s is None else normalize_token(s, kind=tgt_kind) for s in tgt_strings]
    order = _target_priority(tgt_strings, tgt_special)
    exact: dict[str, int] = {}
    for i in order:
        if i not in tgt_special:
            exact.setdefault(tgt_norm[i], i)
    raw = {s: i for i, s in enumerate(tgt_strings) if s is not None}  # same token string first: identity map
    vocab_map = np.full(len(src_strings), -1, dtype=np.int64)
    for i, (r, s) in enumerate(zip(src_strings, src_norm)):
        if s is None:
            continue
        t = raw.get(r)
        if t is not None and tgt_norm[t] == s and ((i in src_special) == (t in tgt_special)):
            vocab_map[i] = t
        elif i not in src_special:
            vocab_map[i] = exact.get(s, -1)
    for s, t in role_pairs:
        if 0 <= s < len(vocab_map) and 0 <= t < len(tgt_strings):
            vocab_map[s] = t
    kind = np.where(vocab_map >= 0, EXACT, DROPPED).astype(np.int8)
    cand_ids = [i for i in order if i not in tgt_special]
    if mode == "min_ed" and cand_ids:
        unmatched = [i for i, s in enumerate(src_norm) if s and vocab_map[i] < 0 and i not in src_special]
        seen: set[str] = set()
        cand_ids = [i for i in cand_ids if tgt_norm[i] and not (tgt_norm[i] in seen or seen.add(tgt_norm[i]))]
        # ties by index = by preference order, i.e. regular tokens first, then id
        best = nearest_strings([src_norm[i] for i in unmatched], [tgt_norm[i] for i in cand_ids], max_distance,
                               progress=progress)
        found = best >= 0
        hit = np.asarray(unmatched, dtype=np.int64)[found]
        vocab_map[hit] = np.asarray(cand_ids, dtype=np.int64)[best[found]]
        kind[hit] = MIN_ED
    out, kinds = torch.from_numpy(vocab_map), torch.from_numpy(kind)
    log.info(
        "vocab map (%s): %d source ids, %d exact, %d by edit distance, %d unmapped, built in %.2fs", mode,
        len(vocab_map), int((kind == EXACT).sum()), int((kind == MIN_ED).sum()), int((kind == DROPPED).sum()),
        time.perf_counter() - t0,
    )
    if path is not None:
        _save(path, {"map": out, "kind": kinds})
    return (out, kinds) if with_kind else out


def nearest_strings(
    queries: list[str], targets: list[str], max_distance: float = 1.0, progress: bool = False
) -> np.ndarray:
    """For each query, the index of the target with minimum edit distance, -1 if even that one is farther than
    ``max_distance * max(len(query), len(target))``.

    Ties: the smaller length difference, then the lower index. Exact and length-pruned: edit distance >= length
    difference, so target lengths are visited in rings ``|len(t) - len(q)| = 0, 1, 2, ...`` and a query leaves
    the search once its best distance is <= the ring (no farther target can beat it, or tie it with a smaller
    length difference) or once the ring is beyond the cutoff. Each ring is one ``rapidfuzz.process.cdist`` with
    a ``score_cutoff``.
    """
    by_len: dict[int, list[int]] = {}
    for k, t in enumerate(targets):
        by_len.setdefault(len(t), []).append(k)
    q_by_len: dict[int, list[int]] = {}
    for qi, q in enumerate(queries):
        if q:
            q_by_len.setdefault(len(q), []).append(qi)
    result = np.full(len(queries), -1, dtype=np.int64)
    max_len = max(by_len, default=0)
    big = np.iinfo(np.int64).max
    with tqdm(total=len(queries), desc="min_ed vocabulary map", unit="tok", disable=not progress or len(queries) < 1000,
              dynamic_ncols=True) as bar:
        for m, all_idx in sorted(q_by_len.items()):
            r_max = max(m, max_len) if max_distance >= 1 else int(max_distance * m / (1 - max_distance))
            for c0 in range(0, len(all_idx), _CHUNK):
                q_idx = all_idx[c0 : c0 + _CHUNK]
                best = np.full(len(q_idx), big, dtype=np.int64)
                best_k = np.full(len(q_idx), -1, dtype=np.int64)
                for r in range(r_max + 1):
                    active = np.nonzero(best > r)[0]
                    if active.size == 0:
                        break
                    ring_d = np.full(active.size, big, dtype=np.int64)
                    ring_k = np.full(active.size, -1, dtype=np.int64)
                    for n in sorted({m - r, m + r}):
                        if n not in by_len:
                            continue
                        cut = int(max_distance * max(m, n))
                        if cut < r:
                            continue
                        cut = min(cut, int(best[active].max()) if (best[active] < big).all() else cut)
                        t_idx = np.asarray(by_len[n])
                        d = cdist([queries[q_idx[a]] for a in active], [targets[k] for k in t_idx],
                                  scorer=Levenshtein.distance, dtype=np.int32, workers=-1, score_cutoff=cut)
                        d = np.where(d > cut, big, d.astype(np.int64))
                        arg = d.argmin(axis=1)  # first minimum = lowest target index in this bucket
                        dmin, kmin = d[np.arange(active.size), arg], t_idx[arg]
                        better = (dmin < big) & ((dmin < ring_d) | ((dmin == ring_d) & (kmin < ring_k)))
                        ring_d[better], ring_k[better] = dmin[better], kmin[better]
                    improve = ring_d < best[active]
                    best[active[improve]] = ring_d[improve]
                    best_k[active[improve]] = ring_k[improve]
                result[np.asarray(q_idx)] = best_k
                bar.update(len(q_idx))
    return result


def _load(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: rebuild it
        log.warning("Ignoring unreadable vocab map cache %s (%s); rebuilding it.", path, err)
        return None
    if (
        isinstance(cached, dict)
        and isinstance(cached.get("map"), torch.Tensor)
        and isinstance(cached.get("kind"), torch.Tensor)
        and cached["map"].dtype == torch.long
        and cached["map"].shape == cached["kind"].shape == (size,)
    ):
        return cached["map"], cached["kind"]
    log.warning("Ignoring vocab map cache %s of unexpected content; rebuilding it.", path)
    return None


def _save(path: Path, obj: dict[str, torch.Tensor]) -> None:
    """Atomic write, with the mode a plain ``open()`` would give (0666 minus the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
