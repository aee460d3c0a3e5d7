"""The GPU path, measured: 8-bit vs bf16 sources, a fused online step vs its floor, precompute, memory, big vocabularies.

Usage::

    python benchmarks/gpu.py                                   # CUDA; sources pkg://smollm2 pkg://gemma3-270m
    python benchmarks/gpu.py --sources pkg://smollm2 /models/x  # any source paths (one that cannot be resolved
                                                               # is skipped with the reason)
    python benchmarks/gpu.py --cpu                             # end to end on CPU with tiny random models

Per source (its own tokenizer, text of the Python stdlib): weight memory in bf16 and in 8-bit (bitsandbytes; goal
8-bit <= 0.55x bf16), ``FrozenSource.forward`` tokens/s of both, their peak memory above the weights (also per
token and vocabulary entry: a dense fp32 log-softmax of bf16 logits needs about 10 bytes per entry, a chunked one
about the logits' own 2), how close the 8-bit top-k outputs are to the bf16 ones, and ``precompute`` tokens/s.
Then one fused online training step (target = ``--target``, every source, adaptive, all kept; bf16-mixed on
CUDA) in tokens/s and as a ratio to its floor: the target's fwd+bwd+AdamW step plus each source's forward on its
own tokens, timed alone (goal <= 1.15). The same again with a random-init source and target of a 128k vocabulary
(``--big-vocab``), to show what the log-softmax costs in memory at that size.

A folder holding only a config (e.g. the real architectures' configs and tokenizers, when the weights cannot be
copied to the GPU machine) gets seeded random weights, saved once under ``--work``: speed and memory do not
depend on the weights' values (except through LLM.int8's outlier columns); the table says which were used.
Timings are interleaved rounds (every variant once per round, order rotated), reported as median (min-max).
Prints one markdown table and writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger("benchmarks.gpu")

DEFAULT_SOURCES = ["pkg://smollm2", "pkg://gemma3-270m"]
GOAL_MEMORY = 0.55
GOAL_FLOOR = 1.15
TOP_K = 10
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# ----------------------------------------------------------------------------------------------- measuring
class Clock:
    """Wall-clock timing that waits for the device (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], reps: int) -> float:
        """Seconds per call of ``fn`` over ``reps`` calls."""
        self.sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        return (time.perf_counter() - start) / reps


def interleaved(clock: Clock, fns: dict[str, Callable[[], Any]], rounds: int, reps: int, warmup: int = 2) -> dict:
    """``{name: {"median", "min", "max", "all"}}`` seconds per call; each round runs every fn, order rotated."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, seen = list(fns), {n: [] for n in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seen[name].append(clock.time(fns[name], reps))
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v} for n, v in seen.items()}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


@contextmanager
def peak(device: torch.device, out: dict[str, Any], key: str):
    """``out[key]`` = peak bytes allocated above what was allocated on entry (None on CPU)."""
    if device.type != "cuda":
        out[key] = None
        yield
        return
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    torch.cuda.synchronize(device)
    out[key] = torch.cuda.max_memory_allocated(device) - base


def weights_bytes(model: torch.nn.Module) -> int:
    return int(model.get_memory_footprint())


# ----------------------------------------------------------------------------------------------- models
def resolve(path: str) -> str:
    from lightning_fuse.sources import resolve_path

    return resolve_path(path)


def materialise(path: str, work: Path, seed: int) -> tuple[str, bool]:
    """``(folder, real_weights)``: a folder with weights; a config-only folder gets seeded random weights in its
    config's dtype (float32 for the pkg:// conversions, as their real weights), saved once under ``work``
    (8-bit loading needs weights on disk)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir() or any((folder / f).exists() for f in WEIGHT_FILES):
        return path, True
    out = work / f"random-{folder.name}"
    if not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists():
        config = AutoConfig.from_pretrained(folder)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder).save_pretrained(out)
        del model
    return str(out), False


def load_source(name: str, path: str, device: torch.device, eight_bit: bool):
    from lightning_fuse import FrozenSource, SourceSpec

    spec = SourceSpec(name, path, load_in_8bit=eight_bit, dtype="bfloat16")
    return FrozenSource.load(spec, device).to(device)


def text_blocks(tokenizer, n: int, length: int, skip_chars: int = 0) -> torch.Tensor:
    """``[n, length]`` ids of Python stdlib source text in ``tokenizer``'s tokens (random ids for a word-level
    tokenizer, which reads code as unknown words)."""
    from lightning_fuse.data import pack
    from lightning_fuse.tokenizers import stdlib_texts

    chars = max(20_000, n * length * 6)
    blocks = pack(stdlib_texts(chars, skip_chars=skip_chars), tokenizer, length)
    while len(blocks) < n:  # short stdlib: repeat
        blocks = torch.cat([blocks, blocks])
    blocks = blocks[:n]
    if tokenizer.unk_token_id is not None and (blocks == tokenizer.unk_token_id).float().mean() > 0.5:
        blocks = torch.randint(2, len(tokenizer), blocks.shape, generator=torch.Generator().manual_seed(0))
    return blocks


# ----------------------------------------------------------------------------------------------- per source
def measure_source(name: str, path: str, device: torch.device, args, real: bool) -> dict[str, Any]:
    """Weights memory, forward speed and peak memory of one source in bf16 (fp32 on CPU) and in 8-bit."""
    from lightning_fuse.compare import output_agreement
    from lightning_fuse.fusion import next_token_mask

    clock = Clock(device)
    res: dict[str, Any] = {"source": name, "path": path, "real_weights": real}
    variants = {}
    for variant, eight in (("bf16", False), ("int8", True)):
        free(device)
        before = allocated(device)
        source = load_source(name, path, device, eight)
        after = allocated(device)
        res[f"{variant}_footprint_bytes"] = weights_bytes(source.model)
        res[f"{variant}_allocated_bytes"] = None if before is None else after - before
        variants[variant] = source
    tokenizer = variants["bf16"].tokenizer
    vocab = variants["bf16"].model.get_output_embeddings().weight.shape[0]
    res["vocab"] = int(vocab)
    ids = text_blocks(tokenizer, args.batch, args.block).to(device)
    mask = torch.ones_like(ids)
    calls = {v: (lambda s=s: s.forward(ids, mask, ids, TOP_K, vocab)) for v, s in variants.items()}
    for variant, fn in calls.items():
        fn()  # warm-up, then the peak above the weights
        with peak(device, res, f"{variant}_forward_peak_bytes"):
            fn()
        extra = res[f"{variant}_forward_peak_bytes"]
        res[f"{variant}_forward_peak_bytes_per_entry"] = None if extra is None else extra / (ids.numel() * vocab)
    outs = {v: fn() for v, fn in calls.items()}
    res["int8_vs_bf16"] = output_agreement(outs["int8"], outs["bf16"], next_token_mask(ids)).as_dict()
    times = interleaved(clock, calls, args.rounds, args.reps)
    for variant, t in times.items():
        res[f"{variant}_forward_s"] = t
        res[f"{variant}_forward_tok_s"] = ids.numel() / t["median"]
    mem = "allocated" if device.type == "cuda" else "footprint"
    res["memory_ratio"] = res[f"int8_{mem}_bytes"] / res[f"bf16_{mem}_bytes"]
    res["memory_measure"] = mem
    del variants, calls, outs
    free(device)
    return res


def measure_precompute(name: str, path: str, target: str, corpus: Path, device: torch.device, args, work: Path) -> dict:
    """``lightning-fuse precompute`` of one source over the corpus: the tokens/s it logs (source forwards + writes)."""
    from lightning_fuse.precompute import precompute

    config = work / f"precompute-{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": target, "sources": [{"name": name, "path": path}], "distill_top_k": TOP_K,
            "alignment_cache_dir": str(args.vocab_maps)}},
        "data": {"class_path": "lightning_fuse.TextDataModule", "init_args": {
            "data_dir": str(corpus), "block_size": args.block, "batch_size": args.batch}},
    }))
    records: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if str(record.msg).startswith("source %r [%s]: %d tokens in"):
                records.append(record)

    logger = logging.getLogger("lightning_fuse.precompute")
    handler, level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    out: dict[str, Any] = {}
    try:
        with peak(device, out, "peak_bytes"):
            start = time.perf_counter()
            precompute(str(config), cache_dir=str(work / f"cache-{name}"), max_tokens_per_batch=args.batch * args.block,
                       val=False,
                       overwrite=True, device=str(device))
            out["wall_s"] = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if not records:
        raise RuntimeError("precompute logged no throughput line (its log message changed?)")
    _, _, tokens, seconds, _ = records[-1].args
    out.update(tokens=int(tokens), seconds=float(seconds), tok_s=tokens / max(float(seconds), 1e-9))
    free(device)
    return out


# ----------------------------------------------------------------------------------------------- fused step
def measure_fused(target: str, sources: dict[str, str], device: torch.device, args) -> dict[str, Any]:
    """One fused online training step (all sources run and are kept) vs its floor, timed in interleaved rounds."""
    from lightning_fuse import FusionModule, SourceSpec

    clock = Clock(device)
    mixed = device.type == "cuda" and not args.fp32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if mixed else nullcontext
    torch.manual_seed(0)
    specs = [SourceSpec(n, p) for n, p in sources.items()]  # load_in_8bit="auto": 8-bit on CUDA
    module = FusionModule(target, specs, strategy="adaptive", top_k=len(specs), alignment_cache_dir=str(args.vocab_maps))
    module.to(device)  # the sources load on the module's device
    start = time.perf_counter()
    module.configure_model()
    setup_s = time.perf_counter() - start
    module.to(device)
    opt = torch.optim.AdamW([p for g in module._param_groups() for p in g["params"]], lr=1e-5)
    ids = text_blocks(module.tokenizer, args.batch, args.block).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "domain": torch.zeros(len(ids), dtype=torch.long, device=device)}
    own_ids = {}  # each source's forward in the floor runs on its own tokens of the same text
    for s in module.sources:
        if s.aligner is None:
            own_ids[s.name] = ids
        else:
            aligned = s.aligner.align_batch(ids.cpu(), batch["attention_mask"].cpu())
            own_ids[s.name] = (aligned.src_ids.to(device), aligned.src_mask.long().to(device))

    def fused() -> None:
        with autocast():
            loss = module._step(batch, "train")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def target_step() -> None:
        with autocast():
            loss = module.target(input_ids=ids, attention_mask=batch["attention_mask"], labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def source_forward(source) -> Callable[[], None]:
        x = own_ids[source.name]
        src, m = x if isinstance(x, tuple) else (x, torch.ones_like(x))

        @torch.no_grad()
        def run() -> None:
            with autocast():
                source.model(input_ids=src, attention_mask=m).logits  # noqa: B018

        return run

    fns = {"fused": fused, "target fwd+bwd+step": target_step}
    fns.update({f"source {s.name} fwd": source_forward(s) for s in module.sources})
    res: dict[str, Any] = {"target": target, "sources": list(sources), "tokens_per_step": ids.numel(),
                           "precision": "bf16-mixed" if mixed else "32-true", "setup_s": setup_s,
                           "sources_8bit": [s.quantized for s in module.sources],
                           "aligned": [s.aligner is not None for s in module.sources]}
    for _ in range(2):
        fused()
    with peak(device, res, "fused_peak_bytes"):
        fused()
    times = interleaved(clock, fns, args.rounds, args.reps)
    floor = sum(t["median"] for n, t in times.items() if n != "fused")
    res.update(times=times, floor_s=floor, fused_s=times["fused"]["median"])
    res["fused_tok_s"] = ids.numel() / res["fused_s"]
    res["floor_tok_s"] = ids.numel() / floor
    res["ratio_to_floor"] = res["fused_s"] / floor
    spread = times["fused"]
    res["ratio_range"] = (spread["min"] / floor, spread["max"] / floor)
    if device.type == "cuda":
        res["peak_bytes_total"] = torch.cuda.max_memory_allocated(device)
    return res


# ----------------------------------------------------------------------------------------------- worlds
def write_corpus(root: Path, chars: int) -> Path:
    """``root/code/{train,val}.txt``: Python stdlib source (disjoint files)."""
    from lightning_fuse.tokenizers import stdlib_texts

    (root / "code").mkdir(parents=True, exist_ok=True)
    (root / "code" / "train.txt").write_text("\n".join(stdlib_texts(chars)))
    (root / "code" / "val.txt").write_text("\n".join(stdlib_texts(chars // 10, skip_chars=chars * 2)))
    return root


def word_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` tokens ``t0 .. t{vocab-1}`` (every word one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t1", unk_token="t0")


def llama_config(vocab: int, hidden: int, layers: int, heads: int, positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64 or 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                       max_position_embeddings=positions, tie_word_embeddings=True)


def big_vocab_world(root: Path, vocab: int, dims: tuple[int, int, int], n_tokens: int, block: int) -> dict[str, str]:
    """A same-tokenizer world of ``vocab`` ids: corpus of random words, random-init target and source (weights
    saved: 8-bit loading needs them), all under ``root``."""
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer(vocab)
    paths = {"corpus": str(root / "corpus")}
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", n_tokens), ("val", max(n_tokens // 10, 2 * block))):
        words = torch.randint(2, vocab, (n,), generator=gen).tolist()
        (root / "corpus" / "rand").mkdir(parents=True, exist_ok=True)
        lines = [" ".join(f"t{w}" for w in words[i : i + 64]) for i in range(0, len(words), 64)]
        (root / "corpus" / "rand" / f"{split}.txt").write_text("\n".join(lines))
    hidden, layers, heads = dims
    for i, name in enumerate(("target", "source")):
        out = root / name
        if not (out / "model.safetensors").exists():
            torch.manual_seed(100 + i)
            model = AutoModelForCausalLM.from_config(llama_config(vocab, hidden, layers, heads, 4 * block),
                                                     dtype=torch.bfloat16)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            del model
        paths[name] = str(out)
    return paths


def cpu_world(root: Path, block: int) -> dict[str, str]:
    """--cpu: tiny random models with two real BPE conventions (byte-level target + source, metaspace source)."""
    from transformers import AutoModelForCausalLM

    from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer

    texts = stdlib_texts(300_000)
    paths = {}
    for name, (style, vocab, hidden, layers) in {"target": ("byte_level", 1024, 64, 2), "tiny-bytelevel": ("byte_level", 1024, 96, 2),
                                                 "tiny-metaspace": ("metaspace", 800, 96, 2)}.items():  # fmt: skip
        out = root / name
        if not (out / "model.safetensors").exists():
            tok = train_bpe_tokenizer(texts, vocab_size=vocab, style=style)
            if name == "tiny-bytelevel":  # the target's tokenizer: a same-tokenizer source
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(root / "target")
            torch.manual_seed(len(paths))
            model = AutoModelForCausalLM.from_config(llama_config(len(tok), hidden, layers, 4, 4 * block))
            model.save_pretrained(out)
            tok.save_pretrained(out)
            del model
        paths[name] = str(out)
    return paths


# ----------------------------------------------------------------------------------------------- report
def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f} MB"


def _rate(t: dict, tokens: int) -> str:
    return f"{tokens / t['median']:,.0f} ({tokens / t['max']:,.0f}-{tokens / t['min']:,.0f})"


def _entry(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} B"


def table(results: dict[str, Any]) -> str:
    cpu = results["settings"]["device"] == "cpu"
    verdict = lambda ok: "(tiny models: n/a)" if cpu else ("ok" if ok else "MISSED")  # noqa: E731
    rows = ["| check | setting | value | goal |", "|---|---|---|---|"]
    add = lambda *cells: rows.append("| " + " | ".join(str(c) for c in cells) + " |")  # noqa: E731
    for name, why in results["skipped"].items():
        add("skipped", name, why, "")
    tokens = results["settings"]["batch"] * results["settings"]["block"]
    for r in results["sources"]:
        label = f"{r['source']} ({'real' if r['real_weights'] else 'random'} weights, V={r['vocab']:,})"
        mem = r["memory_measure"]
        ok = verdict(r["memory_ratio"] <= GOAL_MEMORY)
        add("weights memory 8-bit / bf16", label,
            f"{r['memory_ratio']:.2f} ({_mb(r[f'int8_{mem}_bytes'])} / {_mb(r[f'bf16_{mem}_bytes'])}, {mem})",
            f"<= {GOAL_MEMORY} {ok}")
        for v in ("bf16", "int8"):
            add(f"forward tok/s {v}", label, _rate(r[f"{v}_forward_s"], tokens), "")
        for v in ("bf16", "int8"):
            add(f"forward peak above weights {v}", label,
                f"{_mb(r[f'{v}_forward_peak_bytes'])} ({_entry(r[f'{v}_forward_peak_bytes_per_entry'])} per token x vocab)",
                "~2 B chunked, ~10 B dense")
        a = r["int8_vs_bf16"]
        add("8-bit vs bf16 top-k", label, f"top-1 {a['top1']:.3f} (clear {a['top1_clear']:.3f}), top-{TOP_K} overlap "
            f"{a['topk_overlap']:.3f}, max dlogp {a['max_abs_topk_logprob']:.3f}, gold dlogp {a['mean_abs_gold_logprob']:.4f}", "")
        p = r.get("precompute", {})
        if "error" in p:
            add("precompute tok/s", label, f"FAILED: {p['error']}", "")
        elif p:
            add("precompute tok/s", label, f"{p['tok_s']:,.0f} ({p['tokens']:,} tokens, peak {_mb(p['peak_bytes'])})", "")
    for f in results["fused"]:
        if "error" in f:
            add("fused step", f["label"], f"FAILED: {f['error']}", "")
            continue
        ok = verdict(f["ratio_to_floor"] <= GOAL_FLOOR)
        setting = f"{f['label']}: {f['precision']}, sources {', '.join(f['sources'])} (8-bit {f['sources_8bit']})"
        add("fused step tok/s", setting, _rate(f["times"]["fused"], f["tokens_per_step"]), "")
        add("fused step / floor", setting, f"{f['ratio_to_floor']:.2f} ({f['ratio_range'][0]:.2f}-{f['ratio_range'][1]:.2f}); "
            f"floor {f['floor_tok_s']:,.0f} tok/s", f"<= {GOAL_FLOOR} {ok}")
        add("fused step peak above weights", setting, _mb(f["fused_peak_bytes"]), "")
    s = results["settings"]
    head = (f"{s['device_name']}, torch {s['torch']}, transformers {s['transformers']}, bitsandbytes {s['bitsandbytes']}; "
            f"batch {s['batch']} x {s['block']} tokens, top-{TOP_K}, {s['rounds']} rounds x {s['reps']} reps, "
            f"{s['date']}, {results['seconds']:.0f} s")
    return head + "\n\n" + "\n".join(rows)


# ----------------------------------------------------------------------------------------------- main
def guarded(fn: Callable[..., dict], *args: Any) -> dict[str, Any]:
    """``fn(*args)``, or ``{"error": "<type>: <first line>"}`` when the library fails there (reported in the table)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 (a failing check is a result, the others still run)
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("%s failed: %s", fn.__name__, why)
        return {"error": why}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="*", default=None, help=f"source paths (default: {' '.join(DEFAULT_SOURCES)})")
    parser.add_argument("--target", default=None, help="target of the fused step (default: the first source)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU with tiny random models and small sizes")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --cpu 2)")
    parser.add_argument("--block", type=int, default=None, help="tokens per sequence (default 512; --cpu 64)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --cpu 3)")
    parser.add_argument("--reps", type=int, default=None, help="calls per variant and round (default 5; --cpu 1)")
    parser.add_argument("--big-vocab", type=int, default=None, help="vocabulary of the random big-vocab world "
                        "(default 131072; --cpu 8192; 0 = skip)")  # fmt: skip
    parser.add_argument("--precompute-tokens", type=int, default=None, help="tokens per precompute (default 131072)")
    parser.add_argument("--budget-s", type=float, default=420, help="sections not started by then are skipped")
    parser.add_argument("--fp32", action="store_true", help="fused step in fp32 instead of bf16-mixed on CUDA")
    parser.add_argument("--work", default=None, help="folder for random weights, corpora, caches (default: a temp dir)")
    parser.add_argument("--vocab-maps", default=None, help="vocabulary-map cache (default: <work>/vocab_maps)")
    parser.add_argument("--json", default="gpu_benchmark.json", help="where to write every number")
    args = parser.parse_args(argv)
    small = args.cpu
    defaults = {"batch": (8, 2), "block": (512, 64), "rounds": (5, 3), "reps": (5, 1), "big_vocab": (131072, 8192),
                "precompute_tokens": (131072, 2048)}
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cpu if small else gpu)
    if not small and not torch.cuda.is_available():
        parser.error("CUDA is not available: run on a GPU machine, or pass --cpu for the small CPU run")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    device = torch.device("cpu") if small else torch.device("cuda", 0)
    work = Path(args.work or tempfile.mkdtemp(prefix="lf-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    args.vocab_maps = Path(args.vocab_maps) if args.vocab_maps else work / "vocab_maps"
    t0 = time.perf_counter()
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "missing"
    results: dict[str, Any] = {"settings": {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bnb_version,
        "batch": args.batch, "block": args.block, "rounds": args.rounds, "reps": args.reps, "top_k": TOP_K,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:] if argv is None else argv,
    }, "skipped": {}, "sources": [], "fused": []}

    if small:
        world = cpu_world(work / "cpu_world", args.block)
        given = args.sources if args.sources else [world["tiny-bytelevel"], world["tiny-metaspace"]]
        target = args.target or world["target"]
        generated = set(world.values())  # seeded random weights, saved
    else:
        given = args.sources if args.sources is not None else DEFAULT_SOURCES
        target = args.target
        generated = set()
    sources: dict[str, str] = {}
    reals: dict[str, bool] = {}
    for i, path in enumerate(given):
        name = Path(path.removeprefix("pkg://")).name.replace(".", "_") or f"s{i}"
        try:
            folder, real = materialise(resolve(path), work, seed=i)
            from lightning_fuse.sources import load_config

            load_config(folder, f"source {name!r}")
        except Exception as err:  # noqa: BLE001 (any reason a source cannot be used is reported, not fatal)
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            results["skipped"][path] = why
            log.warning("skipping source %s: %s", path, why)
            continue
        sources[name], reals[name] = folder, real and folder not in generated
    if target is None and sources:
        target = next(iter(sources.values()))
    elif target is not None:
        target = materialise(resolve(target), work, seed=99)[0]
    corpus = write_corpus(work / "corpus", chars=max(20_000, args.precompute_tokens * 3))

    def over_budget(what: str) -> bool:
        if time.perf_counter() - t0 <= args.budget_s:
            return False
        results["skipped"][what] = f"--budget-s {args.budget_s:.0f} s spent before it started"
        log.warning("skipping %s: time budget spent", what)
        return True

    for name, path in sources.items():
        if over_budget(f"source {name}"):
            continue
        log.info("source %s: memory and forward speed", name)
        r = measure_source(name, path, device, args, reals[name])
        log.info("source %s: precompute", name)
        r["precompute"] = guarded(measure_precompute, name, path, target, corpus, device, args, work)
        results["sources"].append(r)
    if sources and not over_budget("fused step"):
        log.info("fused online step: target %s, sources %s", target, list(sources))
        label = "tiny random models" if small else "given sources"
        results["fused"].append({"label": label, **guarded(measure_fused, target, sources, device, args)})
        free(device)

    if args.big_vocab and not over_budget(f"{args.big_vocab} vocabulary"):
        dims = (64, 2, 4) if small else (576, 30, 9)  # SmolLM2-135M's width and depth
        log.info("random-init world with a %d vocabulary", args.big_vocab)
        big = big_vocab_world(work / f"big_vocab_{args.big_vocab}", args.big_vocab, dims, args.precompute_tokens,
                              args.block)
        r = measure_source(f"random-{args.big_vocab // 1024}k", big["source"], device, args, real=False)
        r["precompute"] = guarded(measure_precompute, r["source"], big["source"], big["target"], Path(big["corpus"]),
                                  device, args, work)
        results["sources"].append(r)
        results["fused"].append({"label": f"random {args.big_vocab // 1024}k vocabulary",
                                 **guarded(measure_fused, big["target"], {r["source"]: big["source"]}, device, args)})
        free(device)
    results["seconds"] = time.perf_counter() - t0
    results["table"] = table(results)
    print(results["table"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    log.info("wrote %s", args.json)
    return results


if __name__ == "__main__":
    main()
