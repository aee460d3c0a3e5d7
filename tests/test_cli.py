"""The `lightning-fuse` command: every YAML parses against the real signatures; fit + export run end to end."""

import json
from pathlib import Path

import pytest
import torch
from jsonargparse import ActionConfigFile
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser
from transformers import AutoModelForCausalLM

from lightning_fuse.cli import main
from lightning_fuse.data import TextDataModule
from lightning_fuse.module import FusionModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
OVERLAYS = {"ddp.yaml", "fsdp.yaml"}  # trainer-only presets, used on top of a full config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_against_signatures(config):
    parser = LightningArgumentParser()  # parse + type-check only: no model is loaded
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(FusionModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(TextDataModule, "data", subclass_mode=True)
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--num_threads", type=int | None, default=None)
    configs = [config.parent / "demo.yaml", config] if config.name in OVERLAYS else [config]
    cfg = parser.parse_args([arg for c in configs for arg in ("--config", str(c))])
    model = cfg["model"]
    assert model["class_path"].startswith("lightning_fuse.")
    init = model["init_args"]
    assert len(init["sources"]) >= 1 if "sources" in init else len(init["specialists"]) >= 1


def test_benchmark_settings_are_reachable_from_the_cli_config():
    """The settings README's benchmarks use (benchmarks/quality.py) parse from a config / the command line."""
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(FusionModule, "model", subclass_mode=True)
    parser.add_argument("--config", action=ActionConfigFile)
    cfg = parser.parse_args([
        "--model.class_path", "lightning_fuse.FusionModule", "--model.init_args.target", "demo://target",
        "--trainer.gradient_clip_val", "1.0",
        "--model.init_args.lr_schedule", "cosine", "--model.init_args.lr_floor", "0.1",
        "--model.init_args.selector_features", "rewards", "--model.init_args.top_k", "2",
        "--model.init_args.relative_threshold", "0.5", "--model.init_args.selection", "token",
    ])
    init = cfg["model"]["init_args"]
    assert (init["lr_schedule"], init["lr_floor"], init["relative_threshold"]) == ("cosine", 0.1, 0.5)
    assert (init["selector_features"], init["top_k"], init["selection"]) == ("rewards", 2, "token")
    assert cfg["trainer"]["gradient_clip_val"] == 1.0


def _tiny_args(world, tmp_path, *extra):
    sources = [{"name": n, "path": world[n]} for n in ("words", "sums")]
    return [
        "fit", "--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"),
        "--model.init_args.target", world["target"],
        "--model.init_args.sources", json.dumps(sources),
        "--data.init_args.data_dir", world["corpus"],
        "--data.init_args.block_size", "32",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def test_fit_then_export_through_the_cli(tiny_world, tmp_path, capsys):
    main(_tiny_args(tiny_world, tmp_path))
    printed = capsys.readouterr().out  # the end of fit prints the last validation's per-domain table
    assert "last validation (step 4)" in printed and "words" in printed and "sums" in printed, printed[-2000:]
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    assert list(tmp_path.rglob("config.yaml")), "LightningCLI saves the resolved config beside the run"
    out = tmp_path / "exported"
    main(["export", "--ckpt", str(ckpts[0]), "--out", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    assert (out / "tokenizer.json").exists()


def test_cli_rejects_unknown_strategy(tiny_world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_tiny_args(tiny_world, tmp_path, "--model.init_args.strategy", "mixture"))
    assert "mixture" in capsys.readouterr().err


def test_export_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        main(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o")])
