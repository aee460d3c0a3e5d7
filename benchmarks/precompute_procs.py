"""``lightning-fuse precompute`` with 1 vs 2 processes on CPU, and its peak memory at two corpus sizes (issue 14).

Uses the corpora, tokenised stores and model of ``benchmarks/scale.py`` (run that first, or this builds them: the
tokenising takes minutes): a random 2-layer hidden-64 Llama (vocabulary 4096) as target and source, blocks of 128.
Each run is the CLI in its own process tree over the first ``--blocks`` training blocks per domain and ``--blocks /
2`` validation blocks (shards of 256; the store, the identities and the writers cover the whole corpus), with
``--overwrite true``, one torch thread per process in both settings (``--num_threads 1``, ``OMP_NUM_THREADS=1``):

- ``work``: from the first line of rank 0 (all processes joined) to ``done`` (sources loaded, forwards, writes,
  manifest): the part that processes share; ``wall``: the whole command, start-up of every process included
  (a second process starts after the first has set up: Lightning's launcher re-runs the command);
- CPU: user + system seconds of all the processes (what the run costs, whatever the other load on the machine);
- memory: peak PSS and its anonymous part (the memory that grows with in-memory data; the rest is pages of
  memory-mapped files), summed over the process tree, sampled every 20 ms.

Rounds interleave the settings (``--rounds``, median and min-max).

    nice -n 10 python benchmarks/precompute_procs.py                 # 1 vs 2 processes on 50 MB, memory at 50 + 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import BLOCK, ROOT, _descendants, _status, make_corpus, make_models  # noqa: E402

SHARD = 256


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process so far."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TreePeak:
    """Peak PSS / anonymous PSS of process ``pid`` and its descendants, and their CPU seconds (the last value seen
    of each process: up to 20 ms short), sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.pss, self.anon = pid, 0, 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [self.pid, *_descendants(self.pid)]
            stats = [_status(p) for p in pids]
            self.pss = max(self.pss, sum(s.get("Pss", 0) for s in stats))
            self.anon = max(self.anon, sum(s.get("Pss_Anon", 0) for s in stats))
            for p in pids:
                if (t := _cpu_seconds(p)) is not None:
                    self.cpu[p] = max(self.cpu.get(p, 0.0), t)
            self._stop.wait(0.02)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_pss": self.pss, "peak_anon": self.anon, "cpu_s": sum(self.cpu.values())}


def run(config: Path, procs: int, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "lightning_fuse", "precompute", "--config", str(config), "--cache_dir", str(cache),
           "--shard_size", str(SHARD), "--device", "cpu", "--devices", str(procs), "--num_threads", "1",
           "--overwrite", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = TreePeak(proc.pid)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    first = done = None
    for line in proc.stdout:
        if line.startswith("precompute: cache dir"):
            first = time.perf_counter()
        elif line.startswith("precompute: done"):
            done = time.perf_counter()
    proc.wait()
    drain.join()
    wall = time.perf_counter() - start
    mem = peak.stop()
    if proc.returncode != 0 or first is None or done is None:
        raise RuntimeError(f"precompute --devices {procs} failed:\n{''.join(err)[-3000:]}")
    return {"procs": procs, "wall_s": wall, "work_s": done - first, **mem, "load_before": load,
            "load_after": os.getloadavg()[0]}


def write_config(work: Path, corpus: Path, store: Path, model: str, blocks: int) -> Path:
    config = work / f"procs-{corpus.name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": model, "sources": [{"name": "src", "path": model, "load_in_8bit": False}]}},
        "data": {"class_path": "lightning_fuse.TextDataModule", "init_args": {
            "data_dir": str(corpus), "block_size": BLOCK, "batch_size": 8, "tokenized_dir": str(store),
            "max_blocks_per_domain": blocks, "max_val_blocks_per_domain": blocks // 2}},
    }))
    return config


def _store(work: Path, size: int) -> Path:
    for name in (f"store-{size}-2", f"store-{size}-1"):
        if (work / name).is_dir():
            return work / name
    return work / f"store-{size}-1"  # built by the first run


def _summary(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    scale = 2**20 if key.startswith("peak") else 1
    return f"{statistics.median(values) / scale:.1f} ({min(values) / scale:.1f}-{max(values) / scale:.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="corpus sizes in MB (procs: the first)")
    p.add_argument("--blocks", type=int, default=256, help="training blocks per domain precomputed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="/tmp/lf_scale")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_models(work)["target"]
    configs = {s: write_config(work, make_corpus(work, s), _store(work, s), model, args.blocks) for s in args.sizes}
    settings = [(args.sizes[0], 1), (args.sizes[0], 2)] + [(s, 1) for s in args.sizes[1:]]
    results: dict[str, list[dict]] = {f"{s}mb-{n}": [] for s, n in settings}
    for r in range(args.rounds):
        for size, procs in settings:
            res = run(configs[size], procs, work / f"procs-cache-{size}-{procs}")
            results[f"{size}mb-{procs}"].append(res)
            print(f"round {r}: {size} MB, {procs} process(es): {json.dumps(res)}", flush=True)
    (work / "precompute_procs.json").write_text(json.dumps(results, indent=1))
    tokens = (2 * args.blocks + args.blocks) * BLOCK
    print(f"\n{tokens / 1e3:.0f}k tokens (first {args.blocks} train + {args.blocks // 2} val blocks per domain, 2 domains), "
          f"shards of {SHARD}, 1 torch thread per process, {os.cpu_count()} cores; median (min-max) of {args.rounds}")
    print("| corpus | processes | work s | wall s | CPU s (all processes) | peak PSS MiB | peak anon MiB |\n"
          "|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        size, procs = key.split("-")
        print(f"| {size[:-2]} MB | {procs} | {_summary(runs, 'work_s')} | {_summary(runs, 'wall_s')} | "
              f"{_summary(runs, 'cpu_s')} | "
              f"{_summary(runs, 'peak_pss')} | {_summary(runs, 'peak_anon')} |")
    one, two = (statistics.median(r["work_s"] for r in results[f"{args.sizes[0]}mb-{n}"]) for n in (1, 2))
    walls = [statistics.median(r["wall_s"] for r in results[f"{args.sizes[0]}mb-{n}"]) for n in (1, 2)]
    loads = [r[k] for runs in results.values() for r in runs for k in ("load_before", "load_after")]
    print(f"load average (1 min) around the runs: {min(loads):.1f}-{max(loads):.1f}")
    print(f"\nspeed-up of 2 processes: {one / two:.2f}x on the shared work, {walls[0] / walls[1]:.2f}x end to end")


if __name__ == "__main__":
    main()
