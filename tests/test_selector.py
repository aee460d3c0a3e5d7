"""The selector on its own: the CE prior it starts from, and that training can move it away from that prior."""

import pytest
import torch

from lightning_fuse.fusion import baseline_weights, mixture_nll
from lightning_fuse.selector import Selector


def _ce_and_rewards(batch=16, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ce = 1.0 + 6.0 * torch.rand(batch, n, generator=g)  # per-sequence cross-entropy of each source
    return ce, torch.exp(-ce)


@pytest.mark.parametrize("features", ["rewards", "both"])
def test_prior_selector_starts_at_fusellm_weights(features):
    """Step 0: gate = softmax(-CE) (softmax_ce's weights), top-1 = argmin CE (min_ce's choice), whatever the hidden state."""
    ce, rewards = _ce_and_rewards()
    sel = Selector(5, hidden_size=8, features=features, top_k=1)
    selection = sel.select(sel(rewards=rewards, hidden=torch.randn(16, 8)))
    torch.testing.assert_close(selection.gate, baseline_weights("softmax_ce", ce))
    torch.testing.assert_close(selection.weights, baseline_weights("min_ce", ce))
    sel2 = Selector(5, hidden_size=8, features=features, top_k=2)
    kept = sel2.select(sel2(rewards=rewards, hidden=torch.randn(16, 8))).mask
    two_lowest_ce = torch.zeros(16, 5, dtype=torch.bool).scatter_(-1, ce.topk(2, -1, largest=False).indices, True)
    assert torch.equal(kept, two_lowest_ce)


def test_plain_selector_has_no_prior():
    """selector_prior=False (and any hidden-only selector): a randomly initialised MLP, no prior parameter."""
    ce, rewards = _ce_and_rewards()
    plain = Selector(5, hidden_size=8, features="rewards", top_k=1, prior=False)
    assert not hasattr(plain, "prior_scale") and plain.mlp[-1].weight.abs().sum() > 0
    assert not torch.allclose(plain.select(plain(rewards=rewards)).gate, baseline_weights("softmax_ce", ce))
    hidden_only = Selector(5, hidden_size=8, features="hidden", top_k=1, prior=True)
    assert not hidden_only.prior and not hasattr(hidden_only, "prior_scale")


def test_prior_selector_learns_to_override_a_misleading_prior():
    """Source 2 is the best on the gold tokens of every sequence, but the rewards it is fed rank the sources at
    random: at step 0 the prior picks source 2 only ~1/N of the time; training on the mixture likelihood must learn
    to pick it (the prior is a starting point, not a cage), and both the MLP and the prior's scale receive gradient."""
    torch.manual_seed(0)
    n, batch, length = 4, 64, 8
    sel = Selector(n, hidden_size=8, features="rewards", top_k=1)
    gold = torch.full((batch, n, length), -3.0)
    gold[:, 2] = -0.5
    mask = torch.ones(batch, length, dtype=torch.bool)
    opt = torch.optim.AdamW(sel.parameters(), lr=1e-2, weight_decay=0.0)

    def picks_best(rewards):
        return float((sel.select(sel(rewards=rewards)).gate.argmax(-1) == 2).float().mean())

    _, rewards = _ce_and_rewards(batch, n, seed=1)
    before = picks_best(rewards)
    for step in range(200):
        _, rewards = _ce_and_rewards(batch, n, seed=100 + step)
        opt.zero_grad()
        loss = mixture_nll(gold, sel.select(sel(rewards=rewards)).gate, mask)
        loss.backward()
        if step == 0:
            assert float(sel.prior_scale.grad.abs()) > 0 and float(sel.mlp[-1].weight.grad.abs().sum()) > 0
        opt.step()
    _, rewards = _ce_and_rewards(batch, n, seed=1)
    assert before < 0.5 and picks_best(rewards) > 0.95, (before, picks_best(rewards))


def test_relative_threshold_drops_a_kept_source_much_worse_than_the_best():
    """Top-2 keeps a second source even when it is far worse; the relative threshold drops it (issue 17)."""
    ce = torch.tensor([[2.0, 2.2, 6.0], [2.0, 4.0, 6.0]])  # row 0: a close runner-up; row 1: 2 nats worse
    plain = Selector(3, 8, "rewards", top_k=2)
    guarded = Selector(3, 8, "rewards", top_k=2, relative_threshold=0.5)
    rewards = torch.exp(-ce)
    before, after = plain.select(plain(rewards)), guarded.select(guarded(rewards))
    assert before.mask.tolist() == [[True, True, False], [True, True, False]]
    assert before.weights[1, 1] > 0.1  # the far-worse source gets a real weight without the guard
    assert after.mask.tolist() == [[True, True, False], [True, False, False]]
    assert after.weights[1].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="relative_threshold"):
        Selector(3, 8, "rewards", relative_threshold=1.5)
