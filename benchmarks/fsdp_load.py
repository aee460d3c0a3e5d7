"""Peak memory per rank of loading an FSDP2 target (issue 14): the old path against ``lightning_fuse.fsdp_load``.

Two processes (gloo, CPU) load a random Llama target saved as safetensors (fp32, ~370 MB with the defaults):

- ``old``: every rank ``from_pretrained`` the whole target, then ``fully_shard`` (what ``configure_model`` did);
- ``new``: meta init, ``fully_shard``, then the weights from rank 0's safetensors reads in chunks through
  ``set_model_state_dict(broadcast_from_rank0=True)``: the default chunk (``fsdp_load.default_chunk_bytes``: an
  eighth of the model within [64 MiB, 1 GiB], 64 MiB here) and, with ``--chunks_mb``, other sizes (e.g. 1024:
  the whole model in one chunk).

Each load runs in 2 fresh processes; a rank's figure is its peak RSS (``ru_maxrss``) after the load minus its RSS
before it (after imports and process-group set-up). Rounds are interleaved (old, new, new-1GB, old, ...), the
median and the min-max over rounds are printed, and each rank's ``LoadReport`` line.

    nice -n 10 python benchmarks/fsdp_load.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _worker(rank: int, path: str, mode: str, chunk_mb: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_fuse import fsdp_load

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    config = AutoConfig.from_pretrained(path)
    dist.barrier()
    before = _rss_mb()
    if mode == "old":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        fsdp_load.shard_module(model, mesh)
    else:
        chunk = None if chunk_mb == 0 else chunk_mb << 20
        model, report = fsdp_load.load_sharded(
            lambda: fsdp_load.empty_causal_lm(config, "float32"),
            lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), path, mesh,
            torch.device("cpu"), chunk_bytes=chunk,
        )
        print(report.line(), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{rank}.json").write_text(json.dumps({"before": before, "peak": peak}))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_target(path: Path, hidden: int, layers: int, vocab: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                             num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                             tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--work", default="/tmp/lf_fsdp_load")
    parser.add_argument("--chunks_mb", default="0,1024", help="chunk sizes of the new path (0: the default)")
    args = parser.parse_args()
    target = Path(args.work) / "target"
    size = make_target(target, args.hidden, args.layers, args.vocab)
    print(f"target: {target} ({size:.0f} MB of fp32 safetensors), 2 processes (gloo, CPU)")
    variants = [("old", 0)] + [("new", int(c)) for c in args.chunks_mb.split(",")]
    results: dict[str, list[list[float]]] = {f"{m}{f' {c} MB chunks' if c else ''}": [] for m, c in variants}
    for _ in range(args.rounds):
        for (mode, chunk), name in zip(variants, results):
            with tempfile.TemporaryDirectory() as out:
                mp.spawn(_worker, args=(str(target), mode, chunk, _free_port(), out), nprocs=2)
                ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in (0, 1)]
            results[name].append([r["peak"] - r["before"] for r in ranks])
    print(f"{'path':<20} {'rank 0 peak - before (MB)':>28} {'rank 1 peak - before (MB)':>28}")
    for name, rounds in results.items():
        cells = []
        for r in (0, 1):
            values = [row[r] for row in rounds]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"{name:<20} {cells[0]:>28} {cells[1]:>28}")


if __name__ == "__main__":
    main()
