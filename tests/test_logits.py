import pytest
import torch

from lightning_fuse.logits import default_chunk_size, sparse_logprobs


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_logprobs_matches_float64_log_softmax(chunk_size, dtype):
    torch.manual_seed(0)
    logits = (4 * torch.randn(2, 5, 37, dtype=torch.float64)).to(dtype)
    gold = torch.randint(0, 37, (2, 5))
    top_lp, top_ids, gold_lp = sparse_logprobs(logits, 4, gold, chunk_size)
    ref = torch.log_softmax(logits.double(), -1)  # the reference: the same (rounded) logits, in float64
    ref_lp, ref_ids = ref.topk(4, -1)
    assert top_lp.dtype == gold_lp.dtype == torch.float32 and top_ids.dtype == torch.long
    assert top_lp.shape == top_ids.shape == (2, 5, 4) and gold_lp.shape == (2, 5)
    torch.testing.assert_close(top_lp.double(), ref_lp, atol=2e-6, rtol=0)
    # ids: equal where the reference's values are not tied (bf16 logits tie often)
    torch.testing.assert_close(ref.gather(-1, top_ids), ref_lp, atol=2e-6, rtol=0)
    torch.testing.assert_close(gold_lp.double(), ref.gather(-1, gold.unsqueeze(-1)).squeeze(-1), atol=2e-6, rtol=0)


def test_sparse_logprobs_top_k_above_vocab_and_gradient():
    logits = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    gold = torch.tensor([[0, 4, 2]])
    top_lp, top_ids, gold_lp = sparse_logprobs(logits, 99, gold, chunk_size=2)
    assert top_lp.shape == (1, 3, 5)  # min(top_k, V)
    torch.testing.assert_close(top_lp.double().exp().sum(-1), torch.ones(1, 3, dtype=torch.float64))
    gold_lp.sum().backward()
    expected = torch.nn.functional.one_hot(gold, 5).double() - torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=0)


def test_sparse_logprobs_empty_batch_and_bad_input():
    top_lp, top_ids, gold_lp = sparse_logprobs(torch.zeros(0, 4, 9), 3, torch.zeros(0, 4, dtype=torch.long))
    assert top_lp.shape == top_ids.shape == (0, 4, 3) and gold_lp.shape == (0, 4)
    with pytest.raises(ValueError, match="must be \\[B, L\\]"):
        sparse_logprobs(torch.zeros(1, 4, 9), 3, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        sparse_logprobs(torch.zeros(1, 4, 9), 3, torch.zeros(1, 4, dtype=torch.long), chunk_size=0)


def test_default_chunk_size_bounds_the_chunk():
    assert default_chunk_size(128_000) * 128_000 <= 1 << 24
    assert default_chunk_size(10**9) == 1


def test_hidden_path_equals_full_logits_of_a_real_llama():
    """The chunked LM head gives what the HF model's own logits give (tiny random Llama, float64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_fuse.logits import plain_lm_head, sparse_logprobs_from_hidden

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).double().eval()
    ids = torch.randint(0, 50, (2, 7))
    head = plain_lm_head(model)
    assert head is model.lm_head
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.base_model(input_ids=ids)[0]
        got = sparse_logprobs_from_hidden(hidden, head, 5, ids, chunk_size=3)
    want = sparse_logprobs(logits, 5, ids)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    model.config.final_logit_softcapping = 30.0  # logits post-processed by the model: no shortcut
    assert plain_lm_head(model) is None
