"""Cost of fusing N sources: step time and peak memory of online-all, online-routed and offline fusion.

Usage: python benchmarks/cost.py [--sources 1 2 4 8] [--steps 20] [--batch 8] [--block 256]

For N in --sources and K = min(2, N), each configuration runs in its own process (so its peak RSS is its own)
and times full training steps (forward, backward, AdamW) of a FusionModule on random tokens:
- clm:     the target alone (plain causal-LM step), the reference of every ratio;
- floor:   target fwd+bwd+step plus K source forwards, measured alone (no fusion code at all);
- online:  all N sources run, adaptive selection after the sources (routing: after_sources);
- routed:  the selector decides from the target's hidden states, only the K kept sources run (before_sources);
- offline: the sources' top-k outputs come from the batch (as from the precomputed cache), no source in memory.
Models are randomly initialised Llamas (cost does not depend on what they learned). Prints one table; all numbers
come from this run on this machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, VOCAB, SOURCE_HIDDEN, SOURCE_LAYERS = 256, 4, 4096, 256, 4


def _build(root: Path, n: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t1")

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024))

    for name, (h, layers) in {"target": (HIDDEN, LAYERS), **{f"s{i}": (SOURCE_HIDDEN, SOURCE_LAYERS) for i in range(n)}}.items():
        if not (root / name / "config.json").exists():
            llama(h, layers, hash(name) % 1000).save_pretrained(root / name)
            fast.save_pretrained(root / name)


def _measure(root: Path, mode: str, n: int, steps: int, batch: int, block: int) -> dict:
    """Run in a child process: time `steps` training steps (after 3 warm-up steps) of one configuration."""
    import torch

    from lightning_fuse import FusionModule, SourceSpec

    torch.manual_seed(0)
    k = min(2, n)
    sources = [SourceSpec(f"s{i}", str(root / f"s{i}"), load_in_8bit=False) for i in range(n)]
    kwargs = dict(strategy="adaptive", top_k=k, selector_features="hidden")
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
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "n": n, "step_s": seconds, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--root", default=None, help="where the random models are saved (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="lf-cost-"))
    if args.child:
        print(json.dumps(_measure(root, args.child[0], int(args.child[1]), args.steps, args.batch, args.block)))
        return
    _build(root, max(args.sources))
    run = lambda mode, n: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, __file__, "--root", str(root), "--steps", str(args.steps), "--batch", str(args.batch),
         "--block", str(args.block), "--child", mode, str(n)], check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1])
    clm = run("clm", 0)
    rows = []
    for n in args.sources:
        floor = run("floor", n)
        for mode in ("online", "routed", "offline"):
            r = run(mode, n)
            rows.append((n, mode, r["step_s"], r["step_s"] / clm["step_s"], r["step_s"] / floor["step_s"], r["peak_mb"]))
        rows.append((n, "floor", floor["step_s"], floor["step_s"] / clm["step_s"], 1.0, floor["peak_mb"]))
    print(f"target {HIDDEN}x{LAYERS}, sources {SOURCE_HIDDEN}x{SOURCE_LAYERS}, vocab {VOCAB}, batch {args.batch} x {args.block} "
          f"tokens, K = min(2, N), {args.steps} timed steps")
    print(f"plain CLM step: {clm['step_s'] * 1000:.0f} ms, peak RSS {clm['peak_mb']:.0f} MB")
    print(f"{'N':>3} {'mode':<8} {'step ms':>9} {'x CLM':>7} {'x floor':>8} {'peak MB':>8}")
    for n, mode, s, r_clm, r_floor, mb in rows:
        print(f"{n:>3} {mode:<8} {s * 1000:>9.0f} {r_clm:>7.2f} {r_floor:>8.2f} {mb:>8.0f}")
    routed = {n: s for n, mode, s, *_ in rows if mode == "routed"}
    if 2 in routed and 8 in routed:
        print(f"routed N=8 / routed N=2 step time: {routed[8] / routed[2]:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
