"""Cost of fusing N sources: step time (interleaved rounds) and peak memory at a real vocabulary size.

Usage:
  python benchmarks/cost.py [--sources 1 2 4 8] [--steps 10] [--rounds 3] [--batch 8] [--block 256]
  python benchmarks/cost.py --memory [--vocab 128000] [--before_tree DIR]

Speed. For N in --sources and K = min(2, N), each configuration runs in its own process and times full training
steps (forward, backward, AdamW) of a FusionModule on random tokens:
- clm:     the target alone (plain causal-LM step), the reference of every ratio;
- floor:   target fwd+bwd+step plus K source forwards, measured alone (no fusion code at all);
- online:  all N sources run, adaptive selection after the sources (routing: after_sources);
- routed:  the selector decides from the target's hidden states, only the K kept sources run (before_sources);
- offline: the sources' top-k outputs come from the batch (as from the precomputed cache), no source in memory.
``--token``: instead, per-sequence adaptive (``online``, ``offline``) against ``selection: token`` at the same K
(``online_token``, ``offline_token``: the per-sequence selector keeps K sources per row, the per-token gate on the
target's hidden state and the sources' signals mixes them at every position); goal: token <= 1.2x sequence.
On a shared machine one run of a configuration says little: the configurations run interleaved, ``--rounds``
times, each round in a rotated order; a row reports the median over rounds of the per-step median, the minimum,
and the spread ``(max - min) / median``. Ratios are ratios of medians.

Memory (``--memory``). Peak memory above the process' resident set before the measured call (Linux VmHWM, reset
through /proc/self/clear_refs), at vocabulary ``--vocab`` with small hidden sizes (the vocabulary is what matters):
- source: one same-tokenizer source's contribution, ``FrozenSource.forward`` (top-10, gold log-prob, CE);
- step:   one training step's forward and backward (one source online, top-10 forward KL; T = 1 and T = 2),
for two batch sizes and two chunk sizes. ``--before_tree`` runs the same children against another checkout of
lightning_fuse (e.g. ``git archive a7ac38d``) for the before/after table.
Models are randomly initialised Llamas (cost does not depend on what they learned). All numbers come from this
run on this machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, VOCAB, SOURCE_HIDDEN, SOURCE_LAYERS = 256, 4, 4096, 256, 4
MEM_HIDDEN, MEM_LAYERS = 64, 2


def _build(root: Path, n: int, vocab_size: int = VOCAB, hidden: int | None = None, layers: int | None = None) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t1")

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024))

    shapes = {"target": (hidden or HIDDEN, layers or LAYERS),
              **{f"s{i}": (hidden or SOURCE_HIDDEN, layers or SOURCE_LAYERS) for i in range(n)}}
    for seed, (name, (h, n_layers)) in enumerate(shapes.items()):
        if not (root / name / "config.json").exists():
            llama(h, n_layers, seed).save_pretrained(root / name)
            fast.save_pretrained(root / name)


def _measure(root: Path, mode: str, n: int, steps: int, batch: int, block: int) -> dict:
    """Run in a child process: time `steps` training steps (after 3 warm-up steps) of one configuration."""
    import torch

    from lightning_fuse import FusionModule, SourceSpec

    torch.manual_seed(0)
    k = min(2, n)
    sources = [SourceSpec(f"s{i}", str(root / f"s{i}"), load_in_8bit=False) for i in range(n)]
    kwargs = dict(strategy="adaptive", top_k=k, selector_features="hidden")
    if mode.endswith("_token"):
        mode = mode.removesuffix("_token")
        kwargs.update(selection="token", token_features="both")
    if mode == "clm":
        module = FusionModule(str(root / "target"), [], strategy="clm")
    elif mode == "routed":
        module = FusionModule(str(root / "target"), sources, routing="before_sources", explore=0.0, **kwargs)
    else:
        module = FusionModule(str(root / "target"), sources, offline=mode == "offline", **kwargs)
    module.configure_model()
    opt = torch.optim.AdamW([p for g in module._param_groups() for p in g["params"]], lr=1e-4)
    ids = torch.randint(2, VOCAB, (batch, block))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "domain": torch.zeros(batch, dtype=torch.long)}
    if mode in ("offline", "floor"):
        loaded = FusionModule(str(root / "target"), sources, **kwargs)
        loaded.configure_model()
        outs = loaded.run_sources(data)
        if mode == "offline":  # what the cache DataModule puts into a batch (fp16 values, as stored)
            data["cached"] = {f"s{i}": {"ids": o.dist.ids, "logprobs": o.dist.logprobs.half().float(),
                                        "gold_logprob": o.gold_logprob, "ce": o.ce} for i, o in enumerate(outs)}
            del loaded
        floor_sources = loaded.sources[:k] if mode == "floor" else []

    def step():
        if mode == "floor":
            with torch.no_grad():
                for s in floor_sources:
                    _ = s.model(input_ids=ids).logits
            loss = module.target(input_ids=ids, labels=ids).loss
        else:
            loss = module._step(data, "train")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "n": n, "step_s": statistics.median(times), "peak_mb": peak_mb}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_above_now(fn) -> float:
    """MB of resident memory ``fn()`` needed at its peak above what was resident before it."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) / 1024


def _memory(root: Path, what: str, batch: int, block: int, temperature: float, chunk_elements: int | None) -> dict:
    """Run in a child process: peak memory of one source forward or one training step (forward + backward)."""
    import torch

    import lightning_fuse
    from lightning_fuse import FusionModule, SourceSpec

    torch.set_num_threads(1)
    if chunk_elements is not None:
        import lightning_fuse.logits

        lightning_fuse.logits.DEFAULT_CHUNK_ELEMENTS = chunk_elements
    torch.manual_seed(0)
    module = FusionModule(str(root / "target"), [SourceSpec("s0", str(root / "s0"), load_in_8bit=False)],
                          strategy="uniform", distill_top_k=10, temperature=temperature)
    module.configure_model()
    vocab = module.target.get_output_embeddings().weight.shape[0]
    ids = torch.randint(2, vocab, (batch, block))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    source = module.sources[0]
    if what == "source":
        with torch.no_grad():
            source.forward(ids, data["attention_mask"], ids, 10, vocab)  # warm-up (lazy allocations)
            mb = _peak_above_now(lambda: source.forward(ids, data["attention_mask"], ids, 10, vocab))
    else:
        module._step(data, "train")["loss"].backward()  # warm-up: gradients allocated once
        module.target.zero_grad(set_to_none=False)
        mb = _peak_above_now(lambda: module._step(data, "train")["loss"].backward())
    return {"what": what, "positions": batch * block, "peak_mb": mb, "tree": str(Path(lightning_fuse.__file__).parent)}


def _child(root: Path, args: list[str], tree: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")  # big blocks go back to the OS
    if tree is not None:
        env["PYTHONPATH"] = tree
    out = subprocess.run([sys.executable, __file__, "--root", str(root), *args], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _speed(args: argparse.Namespace, root: Path) -> None:
    _build(root, max(args.sources))
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--block", str(args.block)]
    modes = ("online", "online_token", "offline", "offline_token") if args.token else ("floor", "online", "routed", "offline")
    configs = [("clm", 0)] + [(mode, n) for n in args.sources for mode in modes]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    peaks: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        shift = r * len(configs) // args.rounds
        for mode, n in configs[shift:] + configs[:shift]:  # interleaved, rotated: drift hits every row alike
            result = _child(root, [*common, "--child", mode, str(n)])
            times[(mode, n)].append(result["step_s"])
            peaks[(mode, n)].append(result["peak_mb"])
    med = {c: statistics.median(v) for c, v in times.items()}
    print(f"target {HIDDEN}x{LAYERS}, sources {SOURCE_HIDDEN}x{SOURCE_LAYERS}, vocab {VOCAB}, batch {args.batch} x "
          f"{args.block} tokens, K = min(2, N), {args.steps} timed steps per process, {args.rounds} interleaved rounds")
    clm = med[("clm", 0)]
    print(f"{'N':>3} {'mode':<13} {'median ms':>10} {'min ms':>7} {'spread':>7} {'x CLM':>6} {'x floor':>8} {'peak MB':>8}")
    routed = {}
    for (mode, n), m in med.items():
        floor = med.get(("floor", n), m)
        spread = (max(times[(mode, n)]) - min(times[(mode, n)])) / m
        print(f"{n:>3} {mode:<13} {m * 1000:>10.0f} {min(times[(mode, n)]) * 1000:>7.0f} {spread:>6.0%} "
              f"{m / clm:>6.2f} {m / floor:>8.2f} {statistics.median(peaks[(mode, n)]):>8.0f}")
        if mode == "routed":
            routed[n] = m
    for (mode, n), m in med.items():
        if mode.endswith("_token"):
            base = mode.removesuffix("_token")
            ratios = sorted(a / b for a, b in zip(times[(mode, n)], times[(base, n)]))  # per round (interleaved)
            print(f"N={n} K={min(2, n)} {mode} / {base}: {m / med[(base, n)]:.2f} (per-round ratios "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}; goal <= 1.2)")
    if 2 in routed and 8 in routed:
        print(f"routed N=8 / routed N=2 step time: {routed[8] / routed[2]:.2f} (goal <= 1.3)")


def _memory_table(args: argparse.Namespace, root: Path) -> None:
    _build(root, 1, args.vocab, MEM_HIDDEN, MEM_LAYERS)
    trees = [("after", None)] + ([("before", args.before_tree)] if args.before_tree else [])
    rows = []
    for what, temperature in (("source", 1.0), ("step", 1.0), ("step", 2.0)):
        for batch in args.memory_batches:
            for label, tree in trees:
                chunks = [None] if label == "before" else [1 << 22, 1 << 24]
                for chunk in chunks:
                    extra = [] if chunk is None else ["--chunk_elements", str(chunk)]
                    r = _child(root, ["--batch", str(batch), "--block", str(args.block), "--temperature",
                                      str(temperature), *extra, "--memory_child", what], tree)
                    rows.append((what, temperature, batch * args.block, label, chunk, r["peak_mb"]))
    dense_mb = args.memory_batches[-1] * args.block * args.vocab * 4 / 2**20
    print(f"vocab {args.vocab}, target and source {MEM_HIDDEN}x{MEM_LAYERS} Llamas, block {args.block}, float32, "
          f"1 thread; one [B, L, V] float32 tensor at B x L = {args.memory_batches[-1] * args.block}: {dense_mb:.0f} MB")
    print(f"{'measured':<22} {'B x L':>6} {'code':<7} {'chunk (positions)':>18} {'peak MB':>8}")
    for what, temperature, positions, label, chunk, mb in rows:
        name = "source forward" if what == "source" else f"train step, T = {temperature:g}"
        chunk_txt = "-" if chunk is None else f"{chunk // args.vocab}"
        print(f"{name:<22} {positions:>6} {label:<7} {chunk_txt:>18} {mb:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--memory", action="store_true", help="the peak-memory table instead of the speed table")
    parser.add_argument("--token", action="store_true", help="selection: token vs sequence at the same K")
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--memory_batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--before_tree", default=None, help="another lightning_fuse checkout to measure against")
    parser.add_argument("--temperature", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--chunk_elements", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help="where the random models are saved (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="lf-cost-"))
    if args.child:
        print(json.dumps(_measure(root, args.child[0], int(args.child[1]), args.steps, args.batch, args.block)))
    elif args.memory_child:
        print(json.dumps(_memory(root, args.memory_child, args.batch, args.block, args.temperature, args.chunk_elements)))
    elif args.memory:
        _memory_table(args, root)
    else:
        _speed(args, root)


if __name__ == "__main__":
    main()
