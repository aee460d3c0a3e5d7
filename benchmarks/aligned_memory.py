"""Peak memory of reducing a cross-tokenizer source's logits to its output (issue 11, item 6).

Each variant runs in a fresh subprocess on the same random last hidden states ``[B, M, 576]`` and LM head (e.g.
Gemma's 262k vocabulary) and reports the peak memory of going from them to the source's output (peak RSS on CPU,
or ``torch.cuda.max_memory_allocated`` with ``--device cuda``):

- ``dense``: the previous code: the logits, a dense float32 log-softmax, then the gold log-prob read by gathering
  a second dense ``[B, L, V]`` tensor;
- ``chunked logits``: the logits, then `lightning_fuse.alignment.carry.carry_over` (log-normalisers, top-k and the
  gold log-prob read from the logits in chunks of positions: no other dense tensor) - models that post-process
  their logits (Gemma-2's soft-capping);
- ``chunked head``: `reduce_hidden` + `carry_reduced`: the LM head applied per chunk of positions, no
  ``[B, L, V]`` tensor at all (the default for plain LM heads).

Usage::

    python benchmarks/aligned_memory.py --batch 1 --length 1024 --vocab 262144
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def _dense(logits, aligned, labels, top_k):
    """The reduction as it was before (sources.py `_aligned_forward`), kept here as the baseline."""
    from lightning_fuse.fusion import next_token_mask

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    pos = aligned.src_pos.clamp_min(0)
    k = top_k
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    idx = pos.unsqueeze(-1).expand(-1, -1, k)
    lp = top_lp.gather(1, idx)
    src_ids = aligned.src_ids
    src_next = src_ids.gather(1, (pos + 1).clamp_max(src_ids.shape[1] - 1))
    gold = logprobs.gather(1, pos.unsqueeze(-1).expand(-1, -1, logprobs.shape[-1])).gather(-1, src_next.unsqueeze(-1))
    return lp, top_ids, gold, next_token_mask(labels)


def _run(variant: str, b: int, m: int, v: int, device: str, width: int = 576) -> dict:
    from lightning_fuse.alignment.aligner import AlignedBatch
    from lightning_fuse.alignment.carry import carry_over, carry_reduced, reduce_hidden

    torch.manual_seed(0)
    dev = torch.device(device)
    hidden = torch.randn(b, m, width, device=dev)
    head = torch.nn.Linear(width, v, bias=False).to(dev).requires_grad_(False)
    length = m  # target positions ~ source positions
    aligned = AlignedBatch(
        src_ids=torch.randint(0, v, (b, m), device=dev), src_mask=torch.ones(b, m, dtype=torch.bool, device=dev),
        src_pos=torch.arange(length, device=dev).expand(b, -1).clone() - 1,
        src_credit=torch.arange(m, device=dev).expand(b, -1).clone() - 1,
        covered=torch.ones(b, length, dtype=torch.bool, device=dev),
    )
    labels = torch.randint(0, 1000, (b, length), device=dev)
    vocab_map = torch.arange(v, device=dev)
    kind = torch.ones(v, dtype=torch.int8, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        if variant == "dense":
            _dense(head(hidden), aligned, labels, 10)
        elif variant == "chunked logits":
            carry_over(head(hidden), aligned, vocab_map, kind, labels, 10, v)
        else:
            reduced = reduce_hidden(hidden, head, aligned.src_ids, 10)
            carry_reduced(*reduced, aligned, vocab_map, kind, labels, v)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "logits_gb": b * m * v * 4 / 1e9, "extra_peak_gb": peak / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one run, in a subprocess
    a = parser.parse_args()
    if a.variant:
        print(json.dumps(_run(a.variant, a.batch, a.length, a.vocab, a.device)))
        return
    print(f"B={a.batch} M=L={a.length} V={a.vocab} on {a.device}: peak memory of the reduction, from the last "
          "hidden states on (float32 logits would be {:.2f} GB)".format(a.batch * a.length * a.vocab * 4 / 1e9))
    for variant in ("dense", "chunked logits", "chunked head"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(a.batch), "--length",
                              str(a.length), "--vocab", str(a.vocab), "--device", a.device],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {variant:15s} peak {r['extra_peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
