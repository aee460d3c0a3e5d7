"""Multi-process fits on CPU (gloo): the DDP and FSDP2 presets train the target and the selector.

The FSDP2 run also checks how the target was loaded (tests/fsdp_check.py: no rank calls ``from_pretrained`` on
it, each holds half of it, rank 0 gathers exactly the plain ``from_pretrained`` weights), prints each rank's peak
memory, and writes a distributed (DCP) checkpoint that ``export`` turns into the same folder as a single file.
In the same processes it loads two targets that cannot be streamed (a ``pytorch_model.bin`` folder, safetensors of
the base model under other names) and checks the fallback: only rank 0 calls ``from_pretrained``, and the
gathered weights are exactly its. Last, a copy of the target whose safetensors file is cut short on rank 0 in the
middle of the load (after rank 0 planned it from the file's header and sent two chunks): both ranks must end with
rank 0's one-line error naming the file, at the same chunk, instead of rank 1 waiting in the broadcast.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CONFIGS = Path(__file__).parents[1] / "configs"


def _run(world, tmp_path, preset, target, extra=()):
    sources = json.dumps([{"name": n, "path": world[n]} for n in ("words", "sums")])
    cmd = [
        sys.executable, "-m", "lightning_fuse", "fit", "--config", str(CONFIGS / "demo.yaml"),
        "--config", str(CONFIGS / preset),
        "--trainer.accelerator", "cpu",
        "--model.init_args.target", target, "--model.init_args.sources", sources,
        "--data.init_args.data_dir", world["corpus"], "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "4",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"),
        "--trainer.enable_progress_bar", "false", *extra,
    ]
    pythonpath = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world_size: 2" in proc.stderr or "Initializing distributed: GLOBAL_RANK: 1" in proc.stderr
    return proc


def _check_state(state: dict) -> None:
    assert any(k.startswith("selector.") for k in state) and any(k.startswith("target.") for k in state)
    assert not any(k.startswith("sources") for k in state)


# DDP runs per-token selection (its gate's gradients are all-reduced too), FSDP per-sequence: one subprocess each
TOKEN = ("--model.init_args.selection", "token", "--model.init_args.top_k", "2")


def test_two_process_ddp_fit_on_cpu(tiny_world, tmp_path):
    proc = _run(tiny_world, tmp_path, "ddp.yaml", tiny_world["target"], TOKEN)
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, proc.stderr[-2000:]
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    _check_state(state)
    # the per-token gate trained: its output layer starts at zero (the gold log-prob prior)
    assert state["token_gate.mlp.2.weight"].abs().sum() > 0


def _unstreamable_copies(general: str, root: Path) -> list[Path]:
    """``general`` as the two folders the FSDP load cannot stream: saved with ``safe_serialization=False`` (what
    transformers < 5 wrote: the same tensors in ``pytorch_model.bin``), and its base model alone (safetensors
    without the ``model.`` prefix; ``from_pretrained`` adds it and ties the LM head to the embedding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(general)
    as_bin, base = root / "general_bin", root / "general_base"
    model.save_pretrained(as_bin)
    torch.save(load_file(as_bin / "model.safetensors"), as_bin / "pytorch_model.bin")
    (as_bin / "model.safetensors").unlink()
    model.model.save_pretrained(base)
    return [as_bin, base]


def test_two_process_fsdp_fit_loads_sharded_and_exports_dcp(tiny_world, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lightning_fuse.export import export

    # A target with weights (a trained tiny LM), so that the sharded load can be compared with from_pretrained.
    fallbacks = _unstreamable_copies(tiny_world["general"], tmp_path)
    cut = shutil.copytree(tiny_world["general"], tmp_path / "general_cut")
    check = {"class_path": "fsdp_check.FSDPLoadCheck",
             "init_args": {"fallback_targets": [str(p) for p in fallbacks], "cut_target": str(cut)}}
    proc = _run(tiny_world, tmp_path, "fsdp.yaml", tiny_world["general"], [
        "--trainer.strategy.init_args.save_distributed_checkpoint", "true",
        "--trainer.callbacks+", json.dumps(check),
    ])
    ranks = [json.loads((tmp_path / f"fsdp_check_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        print(f"rank {r['rank']}: peak RSS {r['peak_rss_mb']:.0f} MB, target shard {r['local_bytes']} of "
              f"{r['full_bytes']} bytes")
    print("\n".join(line for line in proc.stderr.splitlines() if "target load (FSDP" in line))
    assert [r["source"] for r in ranks] == ["safetensors"] * 2
    assert [r["target_from_pretrained_calls"] for r in ranks] == [0, 0]  # no rank loaded the whole target
    assert all(r["local_bytes"] <= 0.6 * r["full_bytes"] for r in ranks)
    assert ranks[0]["same_keys"] and ranks[0]["max_abs_diff"] == 0.0

    # The fallback: rank 0 alone loads the whole model with from_pretrained, says why, and sends it to the others.
    for i, path in enumerate(fallbacks):
        rank0, rank1 = (r["fallbacks"][i] for r in ranks)
        assert rank0["path"] == rank1["path"] == os.path.realpath(path)
        assert [rank0["source"], rank1["source"]] == ["from_pretrained"] * 2
        assert [rank0["from_pretrained_calls"], rank1["from_pretrained_calls"]] == [1, 0]
        assert [rank0["held_full_copy"], rank1["held_full_copy"]] == [True, False]
        assert all(r["local_bytes"] <= 0.6 * r["full_bytes"] for r in (rank0, rank1))
        assert rank0["same_keys"] and rank0["max_abs_diff"] == 0.0
        # the whole tiny model in one chunk, its tied embedding and LM head counted once (no persistent buffers)
        assert rank0["largest_chunk_bytes"] == rank0["full_bytes"]
    warnings = [line for line in proc.stderr.splitlines() if "is loaded whole on rank 0" in line]
    assert len(warnings) == 2, warnings  # once per target, by rank 0
    assert "it holds pytorch_model.bin, not safetensors; re-save it" in warnings[0], warnings
    assert "names or shapes differ from the model's (e.g. `embed_tokens.weight`); re-save it" in warnings[1], warnings

    # A file cut short mid-load on rank 0: every rank raises rank 0's line (rank 1 does not wait in the broadcast).
    rank0, rank1 = (r["cut"] for r in ranks)
    file = os.path.join(os.path.realpath(cut), "model.safetensors")
    assert rank0["chunks_read"] == 3  # two chunks sent, the third read failed
    assert rank0["error"].startswith(f"target: cannot read {file} (SafetensorError: "), rank0["error"]
    assert rank0["error"].endswith("Download it again, or re-save the model with from_pretrained + save_pretrained.")
    assert "\n" not in rank0["error"]
    assert rank1["error"] == f"rank 0 failed to load the target's weights: {rank0['error']}"

    folder = next(tmp_path.rglob("last.ckpt"))
    assert folder.is_dir() and (folder / ".metadata").is_file()
    # torch's own conversion of the folder to one file, plus Lightning's meta.pt: a single-file checkpoint
    single = tmp_path / "single.ckpt"
    dcp_to_torch_save(folder, single)
    checkpoint = torch.load(single, weights_only=False)
    checkpoint.update(torch.load(folder / "meta.pt", weights_only=False))
    torch.save(checkpoint, single)
    _check_state(checkpoint["state_dict"])

    a = export("last", str(tmp_path / "from_dcp"), runs_dir=str(tmp_path))  # finds the newest DCP folder
    b = export(str(single), str(tmp_path / "from_file"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    trained = {k.removeprefix("target."): v for k, v in checkpoint["state_dict"].items() if k.startswith("target.")}
    assert all(torch.equal(wa[k], trained[k]) for k in wa)


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    from lightning_fuse.export import export

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="not a distributed checkpoint") as err:
        export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert "\n" not in str(err.value)
