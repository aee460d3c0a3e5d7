import pytest
import torch
import transformers

from lightning_fuse.merge import linear_merge, merge_models, ties_merge


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


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- linear_merge


def test_linear_merge_of_identical_models_is_that_model():
    sd = _sd(_tiny_llama(0))
    merged = linear_merge([sd, sd, sd])
    assert merged.keys() == sd.keys()
    for key in sd:
        torch.testing.assert_close(merged[key], sd[key])


def test_linear_merge_weights_match_hand_computation():
    a, b = _sd(_tiny_llama(0)), _sd(_tiny_llama(1))
    merged = linear_merge([a, b], weights=[3.0, 1.0])  # normalised to 0.75, 0.25
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], 0.75 * a[key] + 0.25 * b[key])
    assert not torch.equal(merged[key], a[key])


def test_linear_merge_keeps_dtype_and_copies_int_buffers():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "step": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16), "step": torch.tensor([9])}
    merged = linear_merge([a, b])
    assert merged["w"].dtype == torch.bfloat16
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 3.0], dtype=torch.bfloat16))
    assert torch.equal(merged["step"], torch.tensor([7]))


# ---------------------------------------------------------------- ties_merge


def test_ties_merge_matches_hand_computation():
    base = {"w": torch.zeros(5), "n": torch.tensor([3, 4])}
    # density 0.4 of 5 entries -> keep top-2 by magnitude per model.
    m1 = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0, 0.1]), "n": torch.tensor([0, 0])}  # keeps idx 0 (3), 3 (2)
    m2 = {"w": torch.tensor([-4.0, 0.2, 0.3, 5.0, 0.0]), "n": torch.tensor([1, 1])}  # keeps idx 0 (-4), 3 (5)
    m3 = {"w": torch.tensor([2.0, -3.0, 0.1, 0.0, 0.0]), "n": torch.tensor([2, 2])}  # keeps idx 0 (2), 1 (-3)
    # trimmed:   m1 [3, 0, 0, 2, 0]   m2 [-4, 0, 0, 5, 0]   m3 [2, -3, 0, 0, 0]
    # sums:         [1, -3, 0, 7, 0] -> elected signs [+, -, 0, +, 0]
    # disjoint mean: idx0 mean(3, 2) = 2.5; idx1 -3; idx2 0; idx3 mean(2, 5) = 3.5; idx4 0
    merged = ties_merge(base, [m1, m2, m3], density=0.4)
    torch.testing.assert_close(merged["w"], torch.tensor([2.5, -3.0, 0.0, 3.5, 0.0]))
    assert torch.equal(merged["n"], base["n"])  # non-float copied from base

    # lambda_ scales the merged task vector on top of a non-zero base.
    base2 = {"w": torch.ones(5), "n": base["n"]}
    shifted = [{"w": m["w"] + 1, "n": m["n"]} for m in (m1, m2, m3)]
    merged2 = ties_merge(base2, shifted, density=0.4, lambda_=0.5)
    torch.testing.assert_close(merged2["w"], 1 + 0.5 * torch.tensor([2.5, -3.0, 0.0, 3.5, 0.0]))


def test_ties_merge_weights_enter_election_and_mean():
    base = {"w": torch.zeros(2)}
    m1 = {"w": torch.tensor([1.0, 2.0])}
    m2 = {"w": torch.tensor([-3.0, 4.0])}
    # weights 0.8, 0.2: idx0 0.8 - 0.6 > 0 -> +, only m1 agrees -> 1; idx1 (0.8*2 + 0.2*4) / 1 = 2.4
    merged = ties_merge(base, [m1, m2], density=1.0, weights=[4, 1])
    torch.testing.assert_close(merged["w"], torch.tensor([1.0, 2.4]))


def test_ties_merge_full_density_same_sign_is_base_plus_mean_task_vector():
    base = _sd(_tiny_llama(0))
    sources = []
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        sources.append({k: v + torch.rand(v.shape, generator=g) + 0.01 for k, v in base.items()})  # tau > 0
    merged = ties_merge(base, sources, density=1.0)
    for key in base:
        mean_tau = sum(s[key] - base[key] for s in sources) / 3
        torch.testing.assert_close(merged[key], base[key] + mean_tau)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1.0]}, r"`weights` must have one value per model \(2\), got 1"),
        ({"weights": [1.0, -1.0]}, "`weights` must be finite and non-negative"),
        ({"weights": [0.0, 0.0]}, "`weights` must not all be zero"),
        ({"density": 0.0}, r"`density` must be in \(0, 1\], got 0.0"),
        ({"density": 1.5}, r"`density` must be in \(0, 1\], got 1.5"),
    ],
)
def test_ties_merge_bad_args(kwargs, match):
    sd = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match=match):
        ties_merge(sd, [sd, sd], **kwargs)


def test_merges_need_two_models_and_same_shapes():
    sd = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="at least 2 models, got 1"):
        linear_merge([sd])
    with pytest.raises(ValueError, match=r"key `w` has shape \(4,\) in `state_dicts\[1\]` but \(3,\)"):
        linear_merge([sd, {"w": torch.zeros(4)}])
    with pytest.raises(ValueError, match="key `w` is in `base` but missing from `state_dicts\\[0\\]`"):
        ties_merge(sd, [{"v": torch.zeros(3)}, sd])
    with pytest.raises(ValueError, match="has 1 key\\(s\\) that `state_dicts\\[0\\]` lacks, first `v`"):
        linear_merge([sd, {"w": torch.zeros(3), "v": torch.zeros(1)}])


# ---------------------------------------------------------------- merge_models


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_models_writes_loadable_folder(tmp_path, method):
    models = [_tiny_llama(seed) for seed in (1, 2)]
    paths = [_save(m, tmp_path / f"src{i}") for i, m in enumerate(models)]
    _tiny_tokenizer().save_pretrained(paths[0])
    base = _tiny_llama(0)
    base_path = _save(base, tmp_path / "base")

    out = merge_models(paths, tmp_path / "out" / "merged", method=method, base_path=base_path, weights=[2, 1])

    assert out == tmp_path / "out" / "merged"
    assert (out / "model.safetensors").is_file()
    assert (out / "merge_config.json").is_file()
    assert not list(out.parent.glob("*.tmp-*"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    if method == "linear":
        expected = linear_merge([_sd(m) for m in models], weights=[2, 1])
    else:
        expected = ties_merge(_sd(base), [_sd(m) for m in models], weights=[2, 1])
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello world")["input_ids"] == [1, 2]


def test_merge_models_bfloat16_and_no_tokenizer(tmp_path):
    paths = [_save(_tiny_llama(seed), tmp_path / f"src{seed}") for seed in (1, 2)]
    out = merge_models(paths, tmp_path / "merged", dtype="bfloat16")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert not (out / "tokenizer_config.json").exists()


def test_merge_models_different_architecture_names_key(tmp_path):
    a = _save(_tiny_llama(1), tmp_path / "a")
    b = _save(_tiny_llama(2, hidden_size=32), tmp_path / "b")
    match = r"key `model\.embed_tokens\.weight` has shape \(64, 32\) in `.*b` but \(64, 16\) in `.*a`"
    with pytest.raises(ValueError, match=match) as err:
        merge_models([a, b], tmp_path / "out")
    assert "same architecture" in str(err.value)
    assert "lightning-fuse fit" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_merge_models_bad_args(tmp_path):
    a = _save(_tiny_llama(1), tmp_path / "a")
    b = _save(_tiny_llama(2), tmp_path / "b")
    with pytest.raises(ValueError, match="`method='ties'` needs `base_path`"):
        merge_models([a, b], tmp_path / "out", method="ties")
    with pytest.raises(ValueError, match="`method` can be linear, ties, got 'dare'"):
        merge_models([a, b], tmp_path / "out", method="dare")
    with pytest.raises(ValueError, match="`dtype` can be float32, bfloat16, float16, got 'int8'"):
        merge_models([a, b], tmp_path / "out", dtype="int8")
    with pytest.raises(ValueError, match="at least 2 models, got 1"):
        merge_models([a], tmp_path / "out")
    with pytest.raises(ValueError, match=r"(?s)weights.*per model.*density"):  # all problems at once
        merge_models([a, b], tmp_path / "out", weights=[1.0], density=2.0)
    with pytest.raises(FileNotFoundError, match="not found: `.*nope`"):
        merge_models([a, str(tmp_path / "nope")], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found: `.*no_base`"):
        merge_models([a, b], tmp_path / "out", method="ties", base_path=str(tmp_path / "no_base"))
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        merge_models([a, b], a)
