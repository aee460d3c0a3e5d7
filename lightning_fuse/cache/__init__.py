"""On-disk cache of the source LLMs' sparse next-token distributions (offline mode).

Each source is run once over the training corpus (S blocks of L tokens, all the same L); per token we keep its
top-k next-token log-probs (full-vocabulary normalised, sorted descending) and their ids in the *target*
vocabulary, plus the log-prob of the gold next token; per sequence its mean cross-entropy on the gold tokens.

Layout (json + .npy only, no pickle anywhere)::

    <root>/manifest.json                       format, L, k, vocab size, dtypes, per source: identity + shards
    <root>/<source>/journal.jsonl              while a source is written: its new shard records, one JSON line each
    <root>/<source>/shard-00000.ids.npy        uint16 [n, L, k]    low 16 bits of the token ids
    <root>/<source>/shard-00000.ids_hi.npy     uint8  [n, L, m]    high bits, packed (only when vocab > 65536)
    <root>/<source>/shard-00000.logprobs.npy   float16 [n, L, k]   top-k log-probs, sorted descending
    <root>/<source>/shard-00000.gold.npy       float16 [n, L]      log P(gold next token); 0 at position L-1
    <root>/<source>/shard-00000.ce.npy         float32 [n]         mean CE on the gold tokens

Ids take 16 bits plus ``b = bit_length(vocab_size - 1) - 16`` packed bits each (b = 0 below 65537 tokens,
1 for Llama-3's 128k, 2 for Gemma's 256k), so at k = 10 a token costs 42 / 44 / 45 bytes per source instead of
FuseLLM's ~100 (fp16 values + int64 ids). fp16 log-probs are exact to half an ulp: |error| <= |x| * 2**-11
(0.002 at x = -4, 0.008 at x = -16); values below -65504 become -inf (probability 0).

Writes are atomic: each file goes to a temporary name, is fsynced and ``os.replace``-d; the shard is recorded
only after all its files are in place, by one line appended (and fsynced) to the source's journal, under a file lock
so several processes or ranks can write shards of the same cache: O(1) per shard, however many shards there are.
``finalize`` folds the journal into the manifest (itself replaced atomically) and removes it; a complete cache is
``manifest.json`` plus the .npy files. An interruption leaves either the whole shard recorded or nothing (a torn
journal line counts as nothing), and ``SourceWriter.pending_shards()`` tells a restarted job what is left.

Example::

    writer = CacheWriter("cache/", seq_len=2048, top_k=10, vocab_size=32000, shard_size=512)
    src = writer.source("llama", {"path": "meta-llama/Llama-2-7b-hf"}, tok_hash, data_fingerprint(tokens),
                        num_sequences=len(tokens))
    for i in src.pending_shards():
        rows = src.shard_range(i)                       # sequence indices of shard i
        src.write_shard(i, ids, logprobs, gold_logprob, ce)
    src.finalize()

    reader = CacheReader("cache/", expect={"llama": {"model_id": {...}, "data_id": ...}})
    batch = reader.get("llama", [3, 17, 5])             # ids [3, L, k] int64, logprobs float32, ...
"""

from lightning_fuse.cache.format import (
    FORMAT,
    MANIFEST,
    VERSION,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
)
from lightning_fuse.cache.hashing import data_fingerprint
from lightning_fuse.cache.reader import CachedSourcesDataset, CacheReader
from lightning_fuse.cache.writer import CacheWriter, SourceWriter

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheReader",
    "CacheWriter",
    "CachedSourcesDataset",
    "SourceWriter",
    "data_fingerprint",
]
