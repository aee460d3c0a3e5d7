"""Corpora at scale (issue 14): tokenise-once time, peak memory of fit setup and precompute, data-loading speed.

Corpora of ``--sizes`` MB (default 50 and 200) are generated under ``--work`` (default /tmp/lf_scale, never
committed) from machine text: Python stdlib sources as .txt files (domain ``code``) and /usr/share/doc files as
.jsonl documents (domain ``docs``), repeated with a copy header until the size is reached. The tokenizer (byte-level
BPE, 4096 tokens) is trained on 3 MB of stdlib sources; target and source are the same random tiny Llama (2 layers,
hidden 64). Every measurement runs in its own process:

- ``tokenise``: ``TextDataModule.setup`` into an empty store with ``num_proc`` 1 and 2 (wall time, peak RSS);
- ``fit``: a 50-step ``trainer.fit`` (block 128, batch 8, one source) on the stored blocks: peak memory (PSS,
  which counts the touched pages of memory-mapped files; shared pages split between processes) and its anonymous
  part (the memory that grows with in-memory data), summed over the process and its children, sampled every 20 ms;
- ``precompute``: ``lightning-fuse precompute`` over the corpus, cut to its first 4 shards of 256 blocks per split
  (the setup, identities and writers cover the whole corpus; the source loop is the same for every shard);
- ``load``: steady-state ``train_dataloader`` throughput (blocks/s, batch 32) with 0 and 1 workers, 3 interleaved
  rounds of 300 batches after 20 warm-up batches (median, min-max);
- ``legacy`` (``--legacy``, smallest size only): the former in-memory path (``read_texts`` + ``pack`` per domain).

    python benchmarks/scale.py                         # 50 + 200 MB
    python benchmarks/scale.py --sizes 50 200 1000 --memory_rounds 3   # then: peak memory, 3 rounds per size
    nice -n 10 python benchmarks/scale.py --sizes 1000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK, BATCH = 128, 8


# ----------------------------------------------------------------------------------------------- memory


def _status(pid: int) -> dict[str, int]:
    """``Pss`` and ``Pss_Anon`` (shared pages split between the processes sharing them) of one process."""
    out = {}
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            key, _, value = line.partition(":")
            if key in ("Pss", "Pss_Anon"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


class Peak:
    """Peak memory (PSS: resident pages, shared ones split between their processes) and its anonymous part, of this
    process plus its children (tokenising processes, DataLoader workers), sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.rss = self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            stats = [_status(p) for p in [me, *_descendants(me)]]
            self.rss = max(self.rss, sum(s.get("Pss", 0) for s in stats))
            self.anon = max(self.anon, sum(s.get("Pss_Anon", 0) for s in stats))
            self._stop.wait(0.02)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss": self.rss, "peak_anon": self.anon}


# ----------------------------------------------------------------------------------------------- assets


def _doc_texts() -> list[str]:
    texts = []
    for path in sorted(Path("/usr/share/doc").rglob("*")):
        try:
            if not path.is_file() or path.stat().st_size > 4 << 20:
                continue
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        if "\x00" not in text and text.strip():
            texts.append(text)
    return texts


def make_corpus(work: Path, size_mb: int) -> Path:
    from lightning_fuse.tokenizers import stdlib_texts

    corpus = work / f"corpus-{size_mb}mb"
    if (corpus / "done").exists():
        return corpus
    half = size_mb * 1_000_000 // 2
    for domain, texts in (("code", stdlib_texts(10**9)), ("docs", _doc_texts())):
        (corpus / domain).mkdir(parents=True, exist_ok=True)
        written, copy, part, out = 0, 0, 0, None
        while written < half:
            for text in texts:
                if out is None or out.tell() > 16_000_000:
                    if out is not None:
                        out.close()
                    suffix = ".txt" if domain == "code" else ".jsonl"
                    out = open(corpus / domain / f"part-{part:04d}{suffix}", "w", encoding="utf-8")  # noqa: SIM115
                    part += 1
                doc = f"# copy {copy}\n{text}"
                out.write(doc if domain == "code" else json.dumps({"text": doc}) + "\n")
                written += len(doc.encode())
                if written >= half:
                    break
            copy += 1
        out.close()
    (corpus / "done").touch()
    return corpus


def make_models(work: Path) -> dict[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer

    out = work / "model"
    if not (out / "done").exists():
        tok = train_bpe_tokenizer(stdlib_texts(3_000_000), vocab_size=4096, style="byte_level")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True))
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "done").touch()
    return {"target": str(out), "source": str(out)}


# ----------------------------------------------------------------------------------------------- tasks (child)


def _dm(args, **kwargs):
    from lightning_fuse import TextDataModule

    return TextDataModule(args.corpus, block_size=BLOCK, batch_size=BATCH, tokenized_dir=args.store, **kwargs)


def task_tokenise(args) -> dict:
    from transformers import AutoTokenizer

    dm = _dm(args, num_proc=args.num_proc)
    dm.connect(AutoTokenizer.from_pretrained(args.model))
    start = time.perf_counter()
    dm.setup("fit")
    return {"seconds": time.perf_counter() - start, "blocks": len(dm.train_set) + len(dm.val_set)}


def task_fit(args) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_fuse import FusionModule, SourceSpec

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = FusionModule(target=args.model, sources=[SourceSpec("src", args.model, load_in_8bit=False)],
                          strategy="uniform")
    times = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, *a):
            times.setdefault("first_batch", time.perf_counter())

    trainer = pl.Trainer(max_steps=50, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=2, val_check_interval=50, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.fit(module, _dm(args))
    return {"setup_seconds": times["first_batch"] - start, "seconds": time.perf_counter() - start}


def task_precompute(args) -> dict:
    import yaml

    from lightning_fuse.cache import SourceWriter
    from lightning_fuse.precompute import precompute

    real = SourceWriter.pending_shards
    SourceWriter.pending_shards = lambda self: real(self)[:4]  # the first 4 shards (setup covers the whole corpus)
    SourceWriter.finalize = lambda self: None  # the cut cache stays unfinished
    config = Path(args.out).with_suffix(".yaml")
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": args.model, "sources": [{"name": "src", "path": args.model, "load_in_8bit": False}]}},
        "data": {"class_path": "lightning_fuse.TextDataModule", "init_args": {
            "data_dir": args.corpus, "block_size": BLOCK, "batch_size": BATCH, "tokenized_dir": args.store}},
    }))
    start = time.perf_counter()
    precompute(str(config), cache_dir=str(Path(args.out).with_suffix(".cache")), shard_size=256,
               max_tokens_per_batch=8 * BLOCK,
               device="cpu", num_threads=1, overwrite=True)
    return {"seconds": time.perf_counter() - start}


def task_load(args) -> dict:
    from transformers import AutoTokenizer

    dm = _dm(args)
    dm.batch_size = 32
    dm.connect(AutoTokenizer.from_pretrained(args.model))
    dm.setup("fit")
    rates: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(3):
        for workers in (0, 1):
            dm.num_workers = workers
            it = iter(dm.train_dataloader())
            for _ in range(20):
                next(it)
            start = time.perf_counter()
            for _ in range(300):
                next(it)
            rates[workers].append(300 * 32 / (time.perf_counter() - start))
            del it
    return {f"blocks_per_s_{w}": r for w, r in rates.items()}


def task_legacy(args) -> dict:
    from transformers import AutoTokenizer

    from lightning_fuse.data import pack, read_texts
    from lightning_fuse.data.texts import domain_files

    tok = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    n = 0
    for _, files in sorted(domain_files(Path(args.corpus)).items()):
        n += len(pack([t for p in files for t in read_texts(p)], tok, BLOCK))
    return {"seconds": time.perf_counter() - start, "blocks": n}


TASKS = {"tokenise": task_tokenise, "fit": task_fit, "precompute": task_precompute, "load": task_load,
         "legacy": task_legacy}


def child(args) -> None:
    peak = Peak()
    result = TASKS[args.task](args)
    result.update(peak.stop())
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- driver


def run(task: str, corpus: Path, store: Path, model: str, out: Path, env: dict[str, str] | None = None,
        **extra) -> dict:
    cmd = [sys.executable, __file__, "--task", task, "--corpus", str(corpus), "--store", str(store), "--model", model,
           "--out", str(out)] + [a for k, v in extra.items() for a in (f"--{k}", str(v))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


# glibc raises its mmap threshold after freeing a large block (up to 32 MB), so later tensors of that size come from
# the heap and stay resident after they are freed: peak memory then depends on the order of allocations, by
# hundreds of MB from run to run. A fixed threshold (the default value, 128 KiB, set explicitly) turns that off.
ALLOCATORS = {"glibc default": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def memory_rounds(work: Path, model: str, sizes: list[int], rounds: int) -> None:
    """Peak memory of ``fit`` and ``precompute`` on the stores already built, ``rounds`` interleaved rounds per
    size, under both ``ALLOCATORS``; median (min-max) per size and the ratio of the largest size to the smallest."""
    results: dict[str, list[dict]] = {}
    for r in range(rounds):
        for size in sizes:
            corpus, store = work / f"corpus-{size}mb", work / f"store-{size}-2"
            if not (store.is_dir() and corpus.is_dir()):
                raise SystemExit(f"{store} is not built: run `python benchmarks/scale.py --sizes {size}` first")
            for task in ("fit", "precompute"):
                for alloc, env in ALLOCATORS.items():
                    res = run(task, corpus, store, model, work / f"mem-{task}-{size}.json", env=env)
                    results.setdefault(f"{size}|{task}|{alloc}", []).append(res)
                    print(f"round {r}: {size} MB {task} ({alloc}): {res}", flush=True)
    (work / "memory_rounds.json").write_text(json.dumps(results, indent=1))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_rss", "peak_anon")} for k, v in results.items()}
    print(f"\npeak memory, median (min-max) of {rounds} interleaved rounds, MB (PSS / anonymous part)")
    print("| task | allocator | " + " | ".join(f"{s} MB corpus" for s in sizes) + f" | {sizes[-1]} / {sizes[0]} MB |")
    print("|---|---|" + "---|" * (len(sizes) + 1))
    for task in ("fit", "precompute"):
        for alloc in ALLOCATORS:
            cells = []
            for size in sizes:
                v = results[f"{size}|{task}|{alloc}"]
                cells.append(" / ".join(f"{_mb(med[f'{size}|{task}|{alloc}'][m])} ({_mb(min(x[m] for x in v))}-"
                                        f"{_mb(max(x[m] for x in v))})" for m in ("peak_rss", "peak_anon")))
            lo, hi = med[f"{sizes[0]}|{task}|{alloc}"], med[f"{sizes[-1]}|{task}|{alloc}"]
            ratio = f"{hi['peak_rss'] / lo['peak_rss']:.2f}x / {hi['peak_anon'] / lo['peak_anon']:.2f}x"
            print(f"| {task} | {alloc} | " + " | ".join(cells) + f" | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="corpus sizes in MB")
    p.add_argument("--work", default="/tmp/lf_scale")
    p.add_argument("--legacy", action="store_true", help="also measure the former in-memory path (smallest size)")
    p.add_argument("--task", choices=sorted(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--num_proc", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory_rounds", type=int, default=0,
                   help="only measure the peak memory of fit and precompute on the stores already built, this many "
                        "interleaved rounds, with glibc's default allocator and with a fixed mmap threshold")
    args = p.parse_args()
    if args.task:
        return child(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_models(work)["target"]
    if args.memory_rounds:
        return memory_rounds(work, model, args.sizes, args.memory_rounds)
    rows = []
    for size in args.sizes:
        corpus = make_corpus(work, size)
        nbytes = sum(f.stat().st_size for f in corpus.rglob("*") if f.suffix in (".txt", ".jsonl"))
        row = {"size_mb": size, "bytes": nbytes}
        for procs in (1, 2):
            store = work / f"store-{size}-{procs}"
            subprocess.run(["rm", "-rf", str(store)], check=True)
            row[f"tokenise_{procs}"] = run("tokenise", corpus, store, model, work / f"tok-{size}-{procs}.json",
                                           num_proc=procs)
            print(f"{size} MB: tokenise num_proc={procs}: {row[f'tokenise_{procs}']}", flush=True)
        store = work / f"store-{size}-2"
        for task in ("fit", "precompute", "load") + (("legacy",) if args.legacy and size == min(args.sizes) else ()):
            row[task] = run(task, corpus, store, model, work / f"{task}-{size}.json")
            print(f"{size} MB: {task}: {row[task]}", flush=True)
        rows.append(row)
        (work / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| corpus | tokens (blocks of 128) | tokenise 1 proc | tokenise 2 procs | fit (50 steps) peak RSS / anon "
          "| precompute peak RSS / anon | loading blocks/s, 0 workers | 1 worker |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t1, t2, fit, pre, load = r["tokenise_1"], r["tokenise_2"], r["fit"], r["precompute"], r["load"]
        med = {w: statistics.median(load[f"blocks_per_s_{w}"]) for w in (0, 1)}
        spread = {w: f"{min(load[f'blocks_per_s_{w}']):.0f}-{max(load[f'blocks_per_s_{w}']):.0f}" for w in (0, 1)}
        print(f"| {r['bytes'] / 1e6:.0f} MB | {t1['blocks'] * BLOCK / 1e6:.1f}M | {t1['seconds']:.0f} s, "
              f"{_mb(t1['peak_rss'])} MB | {t2['seconds']:.0f} s, {_mb(t2['peak_rss'])} MB "
              f"| {_mb(fit['peak_rss'])} / {_mb(fit['peak_anon'])} MB | {_mb(pre['peak_rss'])} / {_mb(pre['peak_anon'])} MB "
              f"| {med[0]:.0f} ({spread[0]}) | {med[1]:.0f} ({spread[1]}) |")
    if "legacy" in rows[0]:
        leg = rows[0]["legacy"]
        print(f"\nformer in-memory path, {rows[0]['bytes'] / 1e6:.0f} MB: {leg['seconds']:.0f} s, peak RSS "
              f"{_mb(leg['peak_rss'])} MB (anon {_mb(leg['peak_anon'])} MB)")


if __name__ == "__main__":
    main()
