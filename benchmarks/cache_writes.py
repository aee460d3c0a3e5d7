"""Cost of one ``SourceWriter.write_shard`` as the number of shards grows (issue 14, sharded precompute).

Writes ``--shards`` tiny shards (1 sequence of 8 tokens, k = 2: the cost is the bookkeeping, not the data) and prints
the median time of one write among the first and the last 100, and of ``finalize``. Each write fsyncs its files and
directory (a few ms on any disk); what must not grow with the shard count is the recording of the shard. Run with
``PYTHONPATH`` at another checkout to compare (e.g. before the journal: the manifest rewritten at every shard).

    nice -n 10 python benchmarks/cache_writes.py --shards 2000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from lightning_fuse.cache import CacheWriter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--dir", default=None, help="where the temporary cache goes (default: the system's temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        src = CacheWriter(root, seq_len=8, top_k=2, vocab_size=100, shard_size=1).source(
            "a", {"path": "bench"}, "tok", "data", num_sequences=args.shards)
        ids = np.tile(np.array([0, 1]), (1, 8, 1))
        logprobs = np.tile(np.array([-1.0, -2.0], dtype=np.float32), (1, 8, 1))
        gold, ce = np.full((1, 8), -1.0, dtype=np.float32), np.ones(1, dtype=np.float32)
        times = []
        for i in range(args.shards):
            start = time.perf_counter()
            src.write_shard(i, ids, logprobs, gold, ce)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.finalize()
        final = time.perf_counter() - start
    first, last = (statistics.median(t) * 1e3 for t in (times[:100], times[-100:]))
    print(f"{args.shards} shards: one write {first:.1f} ms (median of the first 100), {last:.1f} ms (of the last 100); "
          f"finalize {final * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
