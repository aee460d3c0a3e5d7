"""The user's side, through the `lightning-fuse` command: generate, a FusionModule subclass from YAML, merge,
and the selection matrix in TensorBoard."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_module import fit, make
from transformers import AutoModelForCausalLM

from lightning_fuse import SelectionFeedback
from lightning_fuse.callbacks import SelectionMatrixLogger
from lightning_fuse.cli import main
from lightning_fuse.examples import DemoSpecialistsFusion
from lightning_fuse.export import load_module
from lightning_fuse.generate import generate
from lightning_fuse.plots import heatmap_rgb, matrix_table, selection_matrix, winners

CONFIGS = Path(__file__).parents[1] / "configs"


def _printed(capsys) -> list[str]:
    """What `generate` printed, one block per prompt: "<prompt repr>\n<prompt><continuation>\n"."""
    return capsys.readouterr().out.split("=== ")[1:]


# ----------------------------------------------------------------------------------------------- subclass
@pytest.fixture(scope="module")
def subclass_run(tiny_world, tmp_path_factory):
    """`fit` of configs/example_subclass.yaml, pointed at the tiny world: 2 steps, one validation."""
    tmp = tmp_path_factory.mktemp("subclass")
    root = Path(tiny_world["words"]).parent
    main([
        "fit", "--config", str(CONFIGS / "example_subclass.yaml"),
        "--model.init_args.source_dir", str(root),
        "--model.init_args.specialists", '["words", "sums"]',
        "--model.init_args.target", tiny_world["target"],
        "--data.init_args.data_dir", tiny_world["corpus"],
        "--data.init_args.block_size", "32",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp),
        "--trainer.logger.init_args.save_dir", str(tmp / "tb"),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    ckpts = sorted(tmp.rglob("last.ckpt"))
    assert ckpts, list(tmp.rglob("*"))
    return {"ckpt": str(ckpts[0]), "dir": tmp, "root": str(root)}


def test_subclass_from_yaml_declares_its_sources_and_restores(subclass_run):
    module = load_module(subclass_run["ckpt"])
    assert type(module) is DemoSpecialistsFusion
    assert module.source_names == ["words", "sums"]
    assert [s.path for s in module.source_specs] == [str(Path(subclass_run["root"]) / n) for n in ("words", "sums")]
    assert module.selector is not None and module.selector.num_sources == 2


def test_subclass_load_from_checkpoint(subclass_run):
    module = DemoSpecialistsFusion.load_from_checkpoint(subclass_run["ckpt"])  # Lightning's own restore path
    assert type(module) is DemoSpecialistsFusion and module.source_names == ["words", "sums"]


def test_subclass_rejects_other_sources_than_declared(tiny_world):
    root = str(Path(tiny_world["words"]).parent)
    other = [{"name": "general", "path": tiny_world["general"]}]
    with pytest.raises(ValueError, match="declares its sources from `source_dir` and `specialists`"):
        DemoSpecialistsFusion(source_dir=root, specialists=["words"], target=tiny_world["target"], sources=other)


# ----------------------------------------------------------------------------------------------- generate
def test_generate_from_checkpoint_and_export_agree(subclass_run, tmp_path, capsys):
    prompts = ["ab cd ef", "12 + 3"]
    main(["generate", "--model", subclass_run["ckpt"], "--prompts", json.dumps(prompts), "--max_new_tokens", "8"])
    from_ckpt = _printed(capsys)
    out = tmp_path / "exported"
    main(["export", "--ckpt", subclass_run["ckpt"], "--out", str(out)])
    capsys.readouterr()
    main(["generate", "--model", str(out), "--prompts+", prompts[0], "--prompts+", prompts[1], "--max_new_tokens", "8"])
    from_folder = _printed(capsys)
    assert len(from_ckpt) == 2 and from_ckpt == from_folder  # greedy: the checkpoint and its export agree
    assert all(block.startswith(repr(p)) for block, p in zip(from_ckpt, prompts))


def test_generate_greedy_is_deterministic_and_sampling_follows_the_seed(tiny_world):
    prompts = ["ab cd", ""]
    greedy = generate(tiny_world["words"], prompts, max_new_tokens=12)
    assert len(greedy) == 2 and all(isinstance(t, str) and t for t in greedy)
    assert generate(tiny_world["words"], prompts, max_new_tokens=12) == greedy
    state = torch.random.get_rng_state()
    a = generate(tiny_world["sums"], ["1"] * 4, max_new_tokens=12, temperature=1.5, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert generate(tiny_world["sums"], ["1"] * 4, max_new_tokens=12, temperature=1.5, seed=1) == a
    assert generate(tiny_world["sums"], ["1"] * 4, max_new_tokens=12, temperature=1.5, seed=2) != a
    assert len(set(a)) > 1  # samples differ within one call


def test_generate_bad_arguments(tiny_world, tmp_path):
    with pytest.raises(ValueError, match=r"`--prompts` is empty(.|\n)*`--max_new_tokens` must be >= 1"):
        generate(tiny_world["words"], [], max_new_tokens=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without config.json"):
        generate(str(tmp_path / "empty"), ["x"])


# ----------------------------------------------------------------------------------------------- merge
def test_merge_ties_through_the_cli_flags_and_config(tiny_world, tmp_path):
    models = [tiny_world["words"], tiny_world["sums"]]
    flags = tmp_path / "ties-flags"
    main(["merge", "--model_paths", json.dumps(models), "--out_dir", str(flags), "--method", "ties",
          "--base_path", tiny_world["weak"], "--density", "0.5"])  # fmt: skip
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"model_paths": models, "out_dir": str(tmp_path / "ties-config"), "method": "ties",
                                  "base_path": tiny_world["weak"], "density": 0.5}))  # JSON is YAML
    main(["merge", "--config", str(config)])
    meta = json.loads((flags / "merge_config.json").read_text())
    assert meta["method"] == "ties" and meta["base_path"] == tiny_world["weak"] and meta["density"] == 0.5
    assert (flags / "tokenizer.json").exists()
    a, b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (flags, tmp_path / "ties-config"))
    words = AutoModelForCausalLM.from_pretrained(tiny_world["words"]).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], words[key])
    with pytest.raises(ValueError, match="`method='ties'` needs `base_path`"):
        main(["merge", "--model_paths", json.dumps(models), "--out_dir", str(tmp_path / "x"), "--method", "ties"])


# ----------------------------------------------------------------------------------------------- selection matrix
def test_selection_matrix_image_text_and_histograms_in_tensorboard(tiny_world, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = make(tiny_world, ["words", "sums"], strategy="adaptive", top_k=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    callbacks = [SelectionFeedback(beta=0.1, log_every_n_steps=2), SelectionMatrixLogger()]
    _, results = fit(module, tiny_world, steps=4, callbacks=callbacks, logger=logger)
    guidance = {"images": 0, "histograms": 0, "scalars": 0, "tensors": 0}
    acc = EventAccumulator(logger.log_dir, size_guidance=guidance).Reload()
    tags = acc.Tags()
    assert "selection/val_matrix" in tags["images"]
    image = acc.Images("selection/val_matrix")[-1]
    assert image.step == 4 and image.width >= 48 and image.height >= 48  # 2 x 2 cells at least
    assert "selection/chosen" in tags["histograms"]
    text = [t for t in tags["tensors"] if t.startswith("selection/val_table")]
    assert text, tags["tensors"]
    table = acc.Tensors(text[0])[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| domain | words | sums |") and "| words |" in table and "| sums |" in table
    domains, sources, share = selection_matrix(results)
    assert domains == ["sums", "words"] and sources == ["words", "sums"]
    np.testing.assert_allclose(share.sum(1), 1.0, atol=1e-5)


def test_selection_matrix_logger_without_matplotlib(monkeypatch, caplog):
    """No matplotlib: an unlabelled heat map is logged (one log line), the table still is."""

    class Writer:
        def __init__(self):
            self.calls = []

        def add_image(self, tag, img, step, dataformats):
            self.calls.append(("image", tag, img.shape, dataformats))

        def add_text(self, tag, text, step):
            self.calls.append(("text", tag, text))

    class Logger:
        experiment = Writer()

    class Trainer:
        loggers = [Logger()]
        is_global_zero = True
        sanity_checking = False
        global_step = 7

    class Module:
        source_names = ["a", "b"]
        eval_results = {"val/x/a_share": 0.75, "val/x/b_share": 0.25, "val/y/a_share": 0.0, "val/y/b_share": 1.0,
                        "val/x/a_routed": 1.0, "val/x/b_routed": 0.0, "val/x/target_ce": 2.0}

    for name in ("matplotlib", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them raises ImportError
    callback = SelectionMatrixLogger()
    with caplog.at_level("INFO", logger="lightning_fuse.callbacks"):
        callback.on_validation_end(Trainer(), Module())
        callback.on_validation_end(Trainer(), Module())
    assert sum("matplotlib is not installed" in r.message for r in caplog.records) == 1
    calls = Logger.experiment.calls
    assert calls[0] == ("image", "selection/val_matrix", (48, 48, 3), "HWC")
    assert calls[1][:2] == ("text", "selection/val_table") and "**0.750 (1.00)**" in calls[1][2]


def test_selection_helpers_on_results():
    results = {"val/x/a_share": 0.9, "val/x/b_share": 0.1, "val/y/a_share": 0.2, "val/y/b_share": 0.8,
               "val/x/a_ce": 1.0, "val/x/b_ce": 3.0, "val/y/a_ce": 1.0, "val/y/b_ce": 2.0, "val/y/target_ce": 0.1,
               "val/x/a_routed": 1.0, "val/x/b_routed": 0.0, "val/y/a_routed": 0.0, "val/y/b_routed": 1.0}
    assert winners(results) == {
        "x": {"selected": "a", "share": 0.9, "routed": 1.0, "lowest_ce": "a", "ce": 1.0},
        "y": {"selected": "b", "share": 0.8, "routed": 1.0, "lowest_ce": "a", "ce": 1.0},  # target not a source
    }
    domains, sources, m = selection_matrix(results)
    assert matrix_table(m, domains, sources).splitlines()[2] == "| x | **0.900** | 0.100 |"
    img = heatmap_rgb(np.array([[0.0, 1.0, np.nan]]), cell=2)
    assert img.shape == (2, 6, 3) and img[0, 0].tolist() == [255, 255, 255] and img[0, 4].tolist() == [153] * 3
