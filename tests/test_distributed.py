"""Multi-process fits on CPU (gloo): the DDP and FSDP2 presets train the target and the selector."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).parents[1] / "configs"


def _run(world, tmp_path, preset, extra=()):
    sources = json.dumps([{"name": n, "path": world[n]} for n in ("words", "sums")])
    cmd = [
        sys.executable, "-m", "lightning_fuse", "fit", "--config", str(CONFIGS / "demo.yaml"),
        "--config", str(CONFIGS / preset),
        "--trainer.accelerator", "cpu",
        "--model.init_args.target", world["target"], "--model.init_args.sources", sources,
        "--data.init_args.data_dir", world["corpus"], "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "4",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"),
        "--trainer.enable_progress_bar", "false", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# DDP runs per-token selection (its gate's gradients are all-reduced too), FSDP per-sequence: one subprocess each
TOKEN = ("--model.init_args.selection", "token", "--model.init_args.top_k", "2")


@pytest.mark.parametrize("preset", ["ddp.yaml", "fsdp.yaml"])
def test_two_process_fit_on_cpu(tiny_world, tmp_path, preset):
    token = preset == "ddp.yaml"
    proc = _run(tiny_world, tmp_path, preset, TOKEN if token else ())
    assert "world_size: 2" in proc.stderr or "Initializing distributed: GLOBAL_RANK: 1" in proc.stderr
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, proc.stderr[-2000:]
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("selector.") for k in state) and any(k.startswith("target.") for k in state)
    assert not any(k.startswith("sources") for k in state)
    if token:  # the per-token gate trained: its output layer starts at zero (the gold log-prob prior)
        assert state["token_gate.mlp.2.weight"].abs().sum() > 0
