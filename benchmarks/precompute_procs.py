"""``lightning-fuse precompute`` with 1 vs 2 processes on CPU, and its peak memory at two corpus sizes (issue 14).

Uses the corpora, tokenised stores and model of ``benchmarks/scale.py`` (run that first, or this builds them: the
tokenising takes minutes): a random 2-layer hidden-64 Llama (vocabulary 4096) as target and source, blocks of 128.
Each run is the CLI in its own process tree over the first ``--blocks`` training blocks per domain and ``--blocks /
2`` validation blocks (shards of 256; the store, the identities and the writers cover the whole corpus), with
``--overwrite true``, one torch thread per process in both settings (``--num_threads 1``, ``OMP_NUM_THREADS=1``):

- ``work``: from the first line of rank 0 (all processes joined) to ``done`` (sources loaded, forwards, writes,
  manifest): the part that processes share; ``wall``: the whole command, start-up of every process included
  (a second process starts after the first has set up: Lightning's launcher re-runs the command);
- CPU: user + system seconds of all the processes (what the run costs, whatever the other load on the machine),
  exact (``RUSAGE_CHILDREN`` once every process is waited for), and the benchmark's own (``sampler_cpu_s``);
- work CPU: CPU seconds of each process inside that window (``/proc/PID/stat``, every 50 ms): with a core per
  process and no contention, the 2-process work takes about the largest of them, whatever else runs;
- memory: peak PSS and its anonymous part (the memory that grows with in-memory data; the rest is pages of
  memory-mapped files), summed over the process tree, sampled every ``--mem_interval`` s (0.25; it was 20 ms,
  which cost the 2 processes a third of a core: see ``TreePeak``).

Rounds interleave the settings (``--rounds``, median and min-max). ``--data DIR`` reads the corpora, stores and
model from DIR (read-only: nothing is built or written there) and writes configs, caches and results to ``--work``;
``--code NAME=DIR`` (repeatable) runs every setting with the lightning_fuse of each checkout DIR, interleaved
(e.g. before and after a change).

    nice -n 10 python benchmarks/precompute_procs.py                 # 1 vs 2 processes on 50 MB, memory at 50 + 200
    nice -n 10 python benchmarks/precompute_procs.py --sizes 50 --blocks 2048 --data /tmp/lf_scale --work /tmp/pp \
        --code before=/tmp/old --code after=.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


class TreePeak:
    """Peak PSS / anonymous PSS of process ``pid`` and its descendants, sampled every ``interval`` seconds.

    Reading ``/proc/PID/smaps_rollup`` walks the process' page tables: 5 ms of CPU per 900 MB process here. Sampled
    every 20 ms (as this benchmark did before), that took a third of a core from 2 processes on 2 cores (and
    nothing from 1 process, which leaves a core free): the 2-process run was slowed by its own measurement."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.pss, self.anon, self.interval = pid, 0, 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            stats = [_status(p) for p in [self.pid, *_descendants(self.pid)]]
            self.pss = max(self.pss, sum(s.get("Pss", 0) for s in stats))
            self.anon = max(self.anon, sum(s.get("Pss_Anon", 0) for s in stats))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_pss": self.pss, "peak_anon": self.anon}


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (``/proc/PID/stat``: cheap, unlike smaps)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TreeCPU:
    """The last CPU time seen of each process of the tree (sampled every 50 ms), and snapshots of it."""

    def __init__(self, pid: int) -> None:
        self.pid, self.seen = pid, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(0.05):
                return

    def sample(self) -> dict[int, float]:
        for p in [self.pid, *_descendants(self.pid)]:
            if (t := _proc_cpu(p)) is not None:
                self.seen[p] = t
        return dict(self.seen)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _adopt_orphans() -> None:
    """Become the child subreaper (Linux): a launched rank that outlives rank 0 is reparented to this process,
    which then waits for it, so that its CPU time counts in ``RUSAGE_CHILDREN``."""
    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def run(config: Path, procs: int, cache: Path, code: Path = ROOT, interval: float = 0.25) -> dict:
    cmd = [sys.executable, "-m", "lightning_fuse", "precompute", "--config", str(config), "--cache_dir", str(cache),
           "--shard_size", str(SHARD), "--device", "cpu", "--devices", str(procs), "--num_threads", "1",
           "--overwrite", "true"]
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    children, me = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, tree = TreePeak(proc.pid, interval), TreeCPU(proc.pid)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    first = done = None
    for line in proc.stdout:
        if line.startswith("precompute: cache dir"):
            first, at_first = time.perf_counter(), tree.sample()
        elif line.startswith("precompute: done"):
            done, at_done = time.perf_counter(), tree.sample()
    proc.wait()
    drain.join()
    wall = time.perf_counter() - start
    _reap()  # the other ranks, once orphaned
    tree.stop()
    mem = peak.stop()
    if first is not None and done is not None:  # CPU seconds of each process (rank 0 first) in the shared window
        mem["work_cpu_s"] = [round(at_done[p] - at_first.get(p, 0.0), 2) for p in sorted(at_done, key=lambda q: (
            q != proc.pid, q))]
    # every process of the tree is waited for (rank 0 waits for the ones it launched): their exact CPU time
    mem.update(cpu_s=_cpu(resource.RUSAGE_CHILDREN) - children, sampler_cpu_s=_cpu(resource.RUSAGE_SELF) - me)
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
    p.add_argument("--mem_interval", type=float, default=0.25, help="seconds between memory samples (was 0.02)")
    p.add_argument("--data", help="read the corpora, stores and model from here (read-only; default: --work)")
    p.add_argument("--code", action="append", default=[], metavar="NAME=DIR",
                   help="run each setting with the lightning_fuse of checkout DIR (repeatable; default: this one)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    _adopt_orphans()
    codes = {"": ROOT}
    if args.code:
        codes = {name: Path(path).resolve() for name, _, path in (c.partition("=") for c in args.code)}
        if any(not (path / "lightning_fuse").is_dir() for path in codes.values()):
            p.error(f"--code wants NAME=DIR with DIR a lightning-fuse checkout, got {args.code}")
    if args.data:
        data = Path(args.data)
        model, corpora, stores = str(data / "model"), {s: data / f"corpus-{s}mb" for s in args.sizes}, \
            {s: _store(data, s) for s in args.sizes}
        missing = [str(x) for x in (Path(model), *corpora.values(), *stores.values()) if not x.is_dir()]
        if missing:
            p.error(f"--data {data} lacks {', '.join(missing)}: run benchmarks/scale.py there first, or drop --data")
    else:
        model = make_models(work)["target"]
        corpora = {s: make_corpus(work, s) for s in args.sizes}
        stores = {s: _store(work, s) for s in args.sizes}
    configs = {s: write_config(work, corpora[s], stores[s], model, args.blocks) for s in args.sizes}
    settings = [(args.sizes[0], 1), (args.sizes[0], 2)] + [(s, 1) for s in args.sizes[1:]]
    keys = {(c, s, n): f"{c + ' ' if c else ''}{s}mb-{n}" for c in codes for s, n in settings}
    results: dict[str, list[dict]] = {key: [] for key in keys.values()}
    for r in range(args.rounds):
        for (code, size, procs), key in keys.items():
            res = run(configs[size], procs, work / f"procs-cache-{code + '-' if code else ''}{size}-{procs}", codes[code], args.mem_interval)
            results[key].append(res)
            print(f"round {r}: {key}: {json.dumps(res)}", flush=True)
            (work / "precompute_procs.json").write_text(json.dumps(results, indent=1))
    tokens = (2 * args.blocks + args.blocks) * BLOCK
    print(f"\n{tokens / 1e3:.0f}k tokens (first {args.blocks} train + {args.blocks // 2} val blocks per domain, 2 domains), "
          f"shards of {SHARD}, 1 torch thread per process, {os.cpu_count()} cores; median (min-max) of {args.rounds}")
    print("| corpus | processes | work s | wall s | CPU s (all processes) | peak PSS MiB | peak anon MiB |\n"
          "|---|---|---|---|---|---|---|")
    for (code, size, procs), key in keys.items():
        runs = results[key]
        print(f"| {code + ' ' if code else ''}{size} MB | {procs} | {_summary(runs, 'work_s')} | "
              f"{_summary(runs, 'wall_s')} | {_summary(runs, 'cpu_s')} | "
              f"{_summary(runs, 'peak_pss')} | {_summary(runs, 'peak_anon')} |")
    print("\nCPU seconds of each process inside the shared window (rank 0 first), median over rounds: "
          + "; ".join(f"{key}: " + ", ".join(f"{statistics.median(r['work_cpu_s'][i] for r in runs):.1f}"
                                             for i in range(len(runs[0]['work_cpu_s'])))
                      for key, runs in results.items()))
    loads = [r[k] for runs in results.values() for r in runs for k in ("load_before", "load_after")]
    print(f"load average (1 min) around the runs: {min(loads):.1f}-{max(loads):.1f}")
    for code in codes:
        def median(n: int, key: str, code: str = code) -> float:
            return statistics.median(r[key] for r in results[keys[code, args.sizes[0], n]])

        print(f"\n{code + ': ' if code else ''}speed-up of 2 processes: {median(1, 'work_s') / median(2, 'work_s'):.2f}x "
              f"on the shared work, {median(1, 'wall_s') / median(2, 'wall_s'):.2f}x end to end")


if __name__ == "__main__":
    main()
