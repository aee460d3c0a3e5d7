"""The embedded demo: corpora from local text, shared tokenizer, specialist sources, cache, ``demo://`` paths.

Most tests reuse the session's fast build (``demo_assets`` in conftest.py).
"""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lightning_fuse import demo
from lightning_fuse.demo import (
    FAST_BUILD,
    META_FILE,
    WEAK,
    DemoSettings,
    build_demo_assets,
    default_root,
    loss_matrix,
    resolve_path,
)

DOMAINS = DemoSettings().domains
# A tiny build for the tests that build their own root (a few seconds).
TINY_BUILD = {
    "steps": 3,
    "weak_steps": 1,
    "byte_budget": 80_000,
    "d_model": 32,
    "seq_len": 32,
    "vocab_size": 512,
}


def test_corpora_exist_and_differ(demo_assets):
    texts = {d: (demo_assets / "corpus" / d / "train.txt").read_text() for d in DOMAINS}
    for d in DOMAINS:
        val = (demo_assets / "corpus" / d / "val.txt").read_text()
        assert len(texts[d]) > 10 * len(val) / 2 > 0
        assert val not in texts[d]
    assert "def " in texts["python"] and "import " in texts["python"]
    assert "License" in texts["licenses"]
    assert "urgency=" in texts["changelog"]
    assert "urgency=" not in texts["python"] and "urgency=" not in texts["licenses"]


def test_tokenizer_round_trips(demo_assets):
    tokenizer = AutoTokenizer.from_pretrained(demo_assets / "tokenizer")
    assert len(tokenizer) == DemoSettings.vocab_size
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    python_val = (demo_assets / "corpus" / "python" / "val.txt").read_text()
    for text in [python_val[:5000], "  naïve → ünïcödé 💥\r\n\ttabs\x00", ""]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(python_val) / len(tokenizer(python_val)["input_ids"]) > 2  # BPE merges, not bytes


def test_specialists_best_on_own_domain(demo_assets):
    matrix = loss_matrix(demo_assets)
    assert set(matrix) == {*DOMAINS, WEAK}
    for domain in DOMAINS:
        others = [matrix[s][domain] for s in matrix if s != domain]
        assert matrix[domain][domain] < min(others) - 0.3, (domain, matrix)
    for source in DOMAINS:  # the per-source json agrees with the root's table
        meta = json.loads((demo_assets / "sources" / source / META_FILE).read_text())
        assert meta["val_loss"] == matrix[source]
        assert meta["trained_on"] == [source] and meta["steps"] == FAST_BUILD["steps"]


def test_recomputed_val_loss_matches_json(demo_assets):
    meta = json.loads((demo_assets / "sources" / "licenses" / META_FILE).read_text())
    seq_len, max_windows = meta["settings"]["seq_len"], meta["settings"]["eval_windows"]
    model = LlamaForCausalLM.from_pretrained(demo_assets / "sources" / "licenses").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_assets / "sources" / "licenses")
    losses = {}
    for domain in DOMAINS:
        ids = tokenizer((demo_assets / "corpus" / domain / "val.txt").read_text())["input_ids"]
        n = min(max_windows, len(ids) // (seq_len + 1))
        windows = torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)
        with torch.no_grad():
            losses[domain] = model(input_ids=windows, labels=windows).loss.item()
    assert losses == pytest.approx(meta["val_loss"], abs=1e-3)
    assert min(losses, key=losses.get) == "licenses"


def test_target_is_initialised_and_loadable(demo_assets):
    target = LlamaForCausalLM.from_pretrained(demo_assets / "target")
    source = LlamaForCausalLM.from_pretrained(demo_assets / "sources" / "python")
    assert target.config.num_hidden_layers == DemoSettings.target_layers
    assert (
        target.config.vocab_size
        == source.config.vocab_size
        == len(AutoTokenizer.from_pretrained(demo_assets / "target"))
    )


def test_second_call_is_cache_hit(demo_assets, monkeypatch):
    mtimes = {p: p.stat().st_mtime_ns for p in demo_assets.rglob("*")}
    monkeypatch.setattr(demo, "_train", lambda *a, **k: pytest.fail("a cached build trained"))
    assert build_demo_assets(root=demo_assets, **FAST_BUILD) == demo_assets  # no training, no file rewritten
    assert {p: p.stat().st_mtime_ns for p in demo_assets.rglob("*")} == mtimes


def test_root_built_with_other_settings_raises(demo_assets):
    steps = FAST_BUILD["steps"]
    with pytest.raises(ValueError, match=rf"other settings: steps={steps} \(asked {steps + 1}\)"):
        build_demo_assets(root=demo_assets, **{**FAST_BUILD, "steps": steps + 1})


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    save = demo._save_pretrained

    def save_then_crash(model, tokenizer, out):
        save(model, tokenizer, out)  # weights on disk, metadata not yet: the worst moment to die
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_save_pretrained", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_demo_assets(root=tmp_path, **TINY_BUILD)
    assert not (tmp_path / "sources").exists() and not (tmp_path / META_FILE).exists()
    assert list((tmp_path / ".partial").iterdir()) == []
    assert (tmp_path / "tokenizer").is_dir()  # finished artefacts are kept

    (tmp_path / ".partial" / "licenses-999-killed").mkdir()  # what SIGKILL leaves behind
    monkeypatch.setattr(demo, "_save_pretrained", save)
    build_demo_assets(root=tmp_path, **TINY_BUILD)
    assert list((tmp_path / ".partial").iterdir()) == []
    for name in (*DOMAINS, WEAK):
        assert (tmp_path / "sources" / name / META_FILE).is_file()
        assert (tmp_path / "sources" / name / "model.safetensors").is_file()
    assert set(loss_matrix(tmp_path)) == {*DOMAINS, WEAK}


def test_build_is_deterministic(tmp_path):
    a = build_demo_assets(root=tmp_path / "a", **TINY_BUILD)
    b = build_demo_assets(root=tmp_path / "b", **TINY_BUILD)
    for rel in ("corpus/licenses/train.txt", "tokenizer/tokenizer.json", "sources/python/model.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert loss_matrix(a) == loss_matrix(b)


def test_missing_domain_files_raise(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.DOMAINS, "changelog", (lambda: [], "/nowhere/*/changelog.Debian.gz"))
    with pytest.raises(
        FileNotFoundError, match=r"(?s)/nowhere/\*/changelog.*domains=\('python', 'licenses'\)"
    ):
        build_demo_assets(root=tmp_path, **TINY_BUILD)
    assert not (tmp_path / "corpus").exists()  # checked before anything is built


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="`domains` can be python, licenses, changelog, got poetry") as err:
        DemoSettings(domains=("python", "poetry"), d_model=30)
    assert "`d_model` (30) must be divisible by `n_heads` (4)" in str(err.value)


def test_default_root_follows_env_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path))
    assert default_root().parent == tmp_path
    assert default_root().name.startswith("demo-")
    assert default_root(DemoSettings(steps=1)) != default_root() == default_root(DemoSettings())


@pytest.mark.parametrize(
    "path", ["HuggingFaceTB/SmolLM2-135M", "/abs/dir", "rel/dir", "", "demo:/x", "hf://demo://x"]
)
def test_resolve_path_leaves_other_paths(path):
    assert resolve_path(path) == path


def test_resolve_path_maps_demo_paths(demo_assets, monkeypatch):
    monkeypatch.setattr(demo, "build_demo_assets", lambda: demo_assets)
    assert resolve_path("demo://sources/python") == str(demo_assets / "sources" / "python")
    assert resolve_path("demo://tokenizer/") == str(demo_assets / "tokenizer")
    assert resolve_path("demo://corpus") == str(demo_assets / "corpus")
    with pytest.raises(FileNotFoundError, match="Existing: .*demo://sources/weak"):
        resolve_path("demo://sources/poetry")
    with pytest.raises(ValueError, match="'..'"):
        resolve_path("demo://../etc")
