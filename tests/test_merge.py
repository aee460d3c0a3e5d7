"""`lightning-fuse merge` drives mergekit (the `peers` extra); without it, one line names the install command."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lightning_fuse.merge import MERGEKIT_MISSING, merge_models


def _mergekit():
    return pytest.importorskip("mergekit", reason='mergekit is not installed (pip install -e ".[peers]")')


def _tiny_llama(seed: int, hidden_size: int = 16) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _sd(path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base model and two 'fine-tunes' of it (base + a random task vector), saved as HF folders."""
    root = tmp_path_factory.mktemp("merge_models")
    base = _tiny_llama(0)
    paths = {"base": _save(base, root / "base")}
    for seed in (1, 2):
        model = _tiny_llama(0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths[f"ft{seed}"] = _save(model, root / f"ft{seed}")
    _tiny_tokenizer().save_pretrained(paths["ft1"])
    return paths


def _ties_reference(base, sources, weights, density):
    """TIES (Yadav et al. 2023) in float64 with mergekit's conventions: per tensor and model keep the
    ``max(1, int(density * n))`` largest |tau|; elected sign = sign of sum_i w_i tau_i, +1 where it is 0; weighted
    mean of the kept entries that agree with it."""
    out = {}
    for key, b in base.items():
        b64 = b.double()
        taus = []
        for sd in sources:
            tau = (sd[key].double() - b64).flatten()
            k = max(1, int(density * tau.numel()))
            kept = torch.zeros_like(tau)
            idx = tau.abs().argsort(descending=True)[:k]
            kept[idx] = tau[idx]
            taus.append(kept.view_as(b64))
        taus = torch.stack(taus)
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * b.dim()))
        elected = torch.where((w * taus).sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(taus) == elected).double()
        den = (w * agree).sum(0)
        merged = (w * taus * agree).sum(0) / torch.where(den == 0, torch.ones_like(den), den)
        out[key] = b64 + merged
    return out


# ---------------------------------------------------------------- without mergekit


def test_merge_without_mergekit_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mergekit", None)  # import mergekit -> ImportError
    monkeypatch.setitem(sys.modules, "mergekit.merge_methods", None)
    with pytest.raises(ImportError) as err:
        merge_models(["a", "b"], tmp_path / "out")
    assert str(err.value) == MERGEKIT_MISSING
    assert 'pip install -e ".[peers]"' in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- results


def test_linear_merge_matches_hand_computation(folders, tmp_path):
    _mergekit()
    out = merge_models([folders["ft1"], folders["ft2"]], tmp_path / "lin", weights=[3.0, 1.0])
    got, a, b = _sd(out), _sd(folders["ft1"]), _sd(folders["ft2"])
    assert got.keys() == a.keys()
    for key in a:  # normalised weights 0.75, 0.25
        torch.testing.assert_close(got[key], 0.75 * a[key] + 0.25 * b[key], rtol=0, atol=1e-7)
    assert (out / "model.safetensors").is_file() and (out / "mergekit_config.yml").is_file()
    record = json.loads((out / "merge_config.json").read_text())
    assert record["method"] == "linear" and record["weights"] == [3.0, 1.0] and record["mergekit"]
    assert not list(out.parent.glob(".lin.tmp-*"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # the first model's
    assert tokenizer("hello world")["input_ids"] == [1, 2]


def test_ties_matches_float64_reference_with_mergekit_conventions(folders, tmp_path):
    _mergekit()
    # density 0.3: int(0.3 * n) and round(0.3 * n) differ for many of these tensors (n = 16, 64, 512, 1024)
    out = merge_models([folders["ft1"], folders["ft2"]], tmp_path / "ties", method="ties", base_path=folders["base"],
                       weights=[2.0, 1.0], density=0.3)
    got = _sd(out)
    ref = _ties_reference(_sd(folders["base"]), [_sd(folders["ft1"]), _sd(folders["ft2"])], [2.0, 1.0], 0.3)
    for key in ref:
        torch.testing.assert_close(got[key].double(), ref[key], rtol=0, atol=1e-6)


_CASES = {  # method: (merge_models kwargs, mergekit per-model parameters)
    "linear": ({"weights": [2.0, 1.0]}, [{"weight": 2.0}, {"weight": 1.0}]),
    "ties": ({"weights": [2.0, 1.0], "density": 0.3}, [{"weight": 2.0, "density": 0.3}, {"weight": 1.0, "density": 0.3}]),
    "dare_ties": ({"density": 0.5}, [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]),
}


def _mergekit_config(folders, method: str) -> dict:
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": folders[f"ft{i}"], "parameters": p} for i, p in zip((1, 2), _CASES[method][1])]}
    if method != "linear":
        config["base_model"] = folders["base"]
    return config


def _assert_same_tensors(ours_dir, theirs_dir):
    ours, theirs = _sd(ours_dir), _sd(theirs_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("method", list(_CASES))
def test_merge_equals_mergekit_run_merge(folders, tmp_path, method):
    """`merge_models` and mergekit's own `run_merge` on a hand-written config give the same tensors."""
    _mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(_mergekit_config(folders, method)), str(tmp_path / "mk"),
              MergeOptions(random_seed=0, quiet=True, copy_tokenizer=False))
    base = None if method == "linear" else folders["base"]
    merge_models([folders["ft1"], folders["ft2"]], tmp_path / "lf", method=method, base_path=base, **_CASES[method][0])
    _assert_same_tensors(tmp_path / "lf", tmp_path / "mk")


def test_merge_cli_equals_mergekit_yaml_subprocess(folders, tmp_path):
    """`lightning-fuse merge` and mergekit's `mergekit-yaml`, both as subprocesses: TIES at density 0.3, weights 2, 1."""
    _mergekit()
    mergekit_yaml = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    (tmp_path / "config.yml").write_text(json.dumps(_mergekit_config(folders, "ties")))  # JSON is YAML
    subprocess.run([mergekit_yaml, str(tmp_path / "config.yml"), str(tmp_path / "mk"), "--quiet",
                    "--no-copy-tokenizer"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "lightning_fuse", "merge", "--model_paths",
                    json.dumps([folders["ft1"], folders["ft2"]]), "--out_dir", str(tmp_path / "lf"), "--method", "ties",
                    "--base_path", folders["base"], "--weights", "[2.0, 1.0]", "--density", "0.3"],
                   check=True, capture_output=True)
    _assert_same_tensors(tmp_path / "lf", tmp_path / "mk")


def test_merge_bfloat16_output_computed_in_float32(folders, tmp_path):
    _mergekit()
    out = merge_models([folders["ft2"], folders["ft1"]], tmp_path / "bf16", dtype="bfloat16")
    got, a, b = _sd(out), _sd(folders["ft1"]), _sd(folders["ft2"])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert got[key].dtype == torch.bfloat16
    assert torch.equal(got[key], (0.5 * a[key] + 0.5 * b[key]).to(torch.bfloat16))
    assert not (out / "tokenizer_config.json").exists()  # the first model (ft2) has no tokenizer


def test_slerp_takes_method_parameters(folders, tmp_path):
    _mergekit()
    out = merge_models([folders["ft1"]], tmp_path / "slerp", method="slerp", base_path=folders["base"],
                       parameters={"t": 0.0})
    got, base = _sd(out), _sd(folders["base"])
    for key in base:  # t = 0 is the base model
        torch.testing.assert_close(got[key], base[key], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- argument and model checks


def test_merge_models_bad_args(folders, tmp_path):
    _mergekit()
    a, b = folders["ft1"], folders["ft2"]
    with pytest.raises(ValueError, match="`method='ties'` needs `base_path`"):
        merge_models([a, b], tmp_path / "out", method="ties")
    with pytest.raises(ValueError, match=r"`method` can be .*linear.*ties.*\(mergekit's methods\), got 'nope'"):
        merge_models([a, b], tmp_path / "out", method="nope")
    with pytest.raises(ValueError, match="`dtype` can be float32, bfloat16, float16, got 'int8'"):
        merge_models([a, b], tmp_path / "out", dtype="int8")
    with pytest.raises(ValueError, match=r"at least 2 models \(base included\), got 1"):
        merge_models([a], tmp_path / "out")
    with pytest.raises(ValueError, match=r"(?s)weights.*per model.*density"):  # all problems at once
        merge_models([a, b], tmp_path / "out", method="ties", base_path=folders["base"], weights=[1.0], density=2.0)
    with pytest.raises(ValueError, match="`density` is not a parameter of 'linear'; it takes: weight, normalize"):
        merge_models([a, b], tmp_path / "out", density=0.5)
    with pytest.raises(ValueError, match=r"`parameters` \['tt'\] are not parameters of 'slerp'; it takes: t"):
        merge_models([a], tmp_path / "out", method="slerp", base_path=folders["base"], parameters={"tt": 0.5})
    with pytest.raises(FileNotFoundError, match="not found: `.*nope`"):
        merge_models([a, str(tmp_path / "nope")], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found: `.*no_base`"):
        merge_models([a, b], tmp_path / "out", method="ties", base_path=str(tmp_path / "no_base"))
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        merge_models([a, b], a)
    assert not (tmp_path / "out").exists()


def test_merge_models_different_architecture_names_key(tmp_path):
    _mergekit()
    a = _save(_tiny_llama(1), tmp_path / "a")
    b = _save(_tiny_llama(2, hidden_size=32), tmp_path / "b")
    match = r"key `model\.embed_tokens\.weight` has shape \(64, 32\) in `.*b` but \(64, 16\) in `.*a`"
    with pytest.raises(ValueError, match=match) as err:
        merge_models([a, b], tmp_path / "out")
    assert "same architecture" in str(err.value)
    assert "lightning-fuse fit" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
