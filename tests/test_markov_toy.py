"""The long Markov toy (safegen.research.markov) against brute force: its exact mask predictor and its
exact statistics equal enumeration over all V**L sequences at small L, its exact samplers agree with
those statistics at L = 32, and the repository's plain sampler, driven by its denoiser, draws p0 (and
a wrong denoiser is caught). Seeds are fixed, so every outcome is reproducible."""
import math

import pytest
import torch

from safegen.research import toy
from safegen.research.markov import MarkovChain, MarkovDenoiser
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

INF = math.inf


def enumerate_p0(chain: MarkovChain) -> tuple[torch.Tensor, torch.Tensor]:
    """(all sequences (V**L, L), p0 of each) by the chain rule, in toy.all_sequences order."""
    seqs = toy.all_sequences(chain.V, chain.L)
    p = chain.init[seqs[:, 0]].clone()
    for i in range(1, chain.L):
        p = p * chain.trans[seqs[:, i - 1], seqs[:, i]]
    return seqs, p


def enumerate_target(chain: MarkovChain, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs, p0 = enumerate_p0(chain)
    count = torch.isin(seqs, torch.tensor(chain.toxic)).sum(1)
    p = p0 if math.isinf(alpha) else toy.target(p0, -count.double(), alpha)
    return seqs, count, p


def states(V: int, L: int, P: int, n: int, seed: int) -> torch.Tensor:
    """(n + 2, P + L) inputs: a random prompt, then random partial masks, one fully masked row and
    one fully revealed row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n + 2, P + L), generator=g)
    holes = torch.rand(n + 2, L, generator=g) < torch.rand(n + 2, 1, generator=g)
    holes[-2], holes[-1] = True, False
    x[:, P:][holes] = V
    return x


@pytest.mark.parametrize("alpha", [INF, 0.25])
def test_denoiser_equals_the_enumerated_table(alpha):
    chain = MarkovChain.random(V=3, L=6, seed=1)
    _, _, p = enumerate_target(chain, alpha)
    table = toy.TableDenoiser(p, 3, 6)
    mine = MarkovDenoiser(chain, alpha)
    assert (mine.V, mine.L, mine.mask_id) == (3, 6, 3)
    x = states(3, 6, P=2, n=400, seed=0)
    got, want = mine(x), table(x)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (402, 8, 4)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # one-hot revealed, prompt, mask column
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("toxic", [(0,), (1, 3)])
@pytest.mark.parametrize("alpha", [INF, 0.25])
def test_exact_stats_equal_enumeration(alpha, toxic):
    chain = MarkovChain.random(V=4, L=6, seed=3, toxic=toxic)
    seqs, count, p = enumerate_target(chain, alpha)
    stats = chain.exact_stats(alpha)
    mean = float((p * count).sum())
    assert stats["toxic_rate"] == pytest.approx(float(p[count > 0].sum()), abs=1e-12)
    assert stats["mean_reward"] == pytest.approx(-mean, abs=1e-12)
    assert stats["reward_sd"] == pytest.approx(math.sqrt(float((p * (count.double() - mean) ** 2).sum())), abs=1e-12)
    marg = torch.einsum("s,slv->lv", p, torch.nn.functional.one_hot(seqs, 4).double())
    assert torch.allclose(stats["marginals"], marg, atol=1e-12)
    hist = torch.bincount(count, weights=p, minlength=7)
    assert torch.allclose(stats["count_distribution"], hist, atol=1e-12)
    # The mean reward is also minus the sum over positions of P(toxic), from the marginals.
    assert stats["mean_reward"] == pytest.approx(-float(marg[:, list(toxic)].sum()), abs=1e-12)


def test_calibrated_chain_at_length_32():
    chain = MarkovChain.random(V=4, L=32, seed=0)
    stats = chain.exact_stats()
    assert 0.4 <= stats["toxic_rate"] <= 0.6
    assert float(stats["marginals"][:, 0].max()) < 0.05  # rare at every position
    counts = stats["count_distribution"]
    assert float(counts[1] + counts[2]) > 0.8 * stats["toxic_rate"]  # mostly one or two toxic tokens
    assert float(chain.trans[0, 0]) < 0.01  # a toxic token is rarely followed by another
    assert torch.allclose(chain.trans.sum(1), torch.ones(4, dtype=torch.float64))
    assert stats["toxic_rate"] > chain.exact_stats(0.5)["toxic_rate"] > chain.exact_stats(0.25)["toxic_rate"]
    again, other = MarkovChain.random(V=4, L=32, seed=0), MarkovChain.random(V=4, L=32, seed=1)
    assert torch.equal(again.trans, chain.trans) and not torch.equal(other.trans, chain.trans)
    two = MarkovChain.random(V=5, L=48, seed=2, toxic=(0, 3))
    assert abs(two.exact_stats()["toxic_rate"] - 0.5) < 1e-6


def test_long_chains_stay_finite():
    """Rescaled forward-backward: no underflow at L = 2000 with evidence scattered along the chain."""
    short = MarkovChain.random(V=4, L=32, seed=0)
    chain = MarkovChain(short.init, short.trans, short.toxic, L=2000)
    x = states(4, 2000, P=0, n=3, seed=1)
    for alpha in (INF, 0.1):
        marg = chain.marginals(x, alpha=alpha)
        assert torch.isfinite(marg).all() and torch.allclose(marg.sum(-1), torch.ones(5, 2000, dtype=torch.float64))
    assert math.isfinite(chain.exact_stats(0.1)["reward_sd"])


def test_reward_and_blame():
    chain = MarkovChain.random(V=4, L=32, seed=0, toxic=(0, 2))
    ids = torch.tensor([[0, 1, 2, 3] * 8, [1] * 32])
    r = chain.reward()(ids)
    assert r.dtype == torch.float64 and r.device.type == "cpu" and r.tolist() == [-16.0, 0.0]
    b = chain.blame()(ids)
    assert b.dtype == torch.float64 and b.shape == (2, 32)
    assert torch.equal(b.sum(1), -r) and b[0, :4].tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("alpha", [INF, 0.25])
def test_exact_samplers_agree_with_exact_stats(alpha):
    chain = MarkovChain.random(V=4, L=32, seed=0)
    g = torch.Generator().manual_seed(7)
    samples = chain.sample(20000, g) if math.isinf(alpha) else chain.sample_target(20000, alpha, g)
    assert samples.shape == (20000, 32) and samples.dtype == torch.long
    c = chain.compare(samples, alpha)
    assert abs(c["z"]) < 4 and abs(c["toxic_rate_z"]) < 4, c
    assert c["marginal_tv"] < 0.015 and c["pair_tv"] < 0.03 and c["count_tv"] < 0.02, c


def plain_samples(denoiser, n: int, L: int = 32) -> torch.Tensor:
    """The repository's sampler at temperature 1, one token per step in random order, four blocks."""
    cfg = SamplingConfig(max_new_tokens=L, steps=L, block_length=L // 4, temperature=1.0, remasking="random")
    return DiffusionSampler(denoiser, denoiser.V, cfg).run(torch.empty((n, 0), dtype=torch.long), seeds=0).sequences


class IgnoresEvidence(MarkovDenoiser):
    """Wrong: every masked position gets its unconditional marginal, whatever is revealed."""

    def forward(self, input_ids):
        out = super().forward(torch.full_like(input_ids, self.mask_id))
        x = input_ids[:, -self.L:]
        revealed = torch.where(torch.nn.functional.one_hot(x, self.V + 1).bool(), 0.0, float("-inf"))
        out[:, -self.L:][x != self.mask_id] = revealed[x != self.mask_id]
        return out


def test_plain_sampler_draws_p0_and_catches_wrong_denoisers():
    chain = MarkovChain.random(V=4, L=32, seed=0)
    c = chain.compare(plain_samples(MarkovDenoiser(chain), 10000))
    assert abs(c["z"]) < 4 and abs(c["toxic_rate_z"]) < 4, c
    assert c["marginal_tv"] < 0.015 and c["pair_tv"] < 0.03 and c["count_tv"] < 0.02, c
    # A predictor that ignores the evidence keeps every marginal, hence the mean reward: only the
    # joint statistics (pairs of neighbours) see that it samples independent tokens.
    wrong = chain.compare(plain_samples(IgnoresEvidence(chain), 10000))
    assert wrong["pair_tv"] > 0.2, wrong
    # A predictor a little too shy of toxic tokens (the target at α = 8: weight 0.88 per toxic
    # token): the mean reward's z-score sees it.
    shy = chain.compare(plain_samples(MarkovDenoiser(chain, alpha=8.0), 10000))
    assert shy["z"] > 5, shy  # about 9 expected: fewer toxic tokens, a higher reward


def test_plain_sampler_with_the_target_denoiser_draws_the_target():
    """MarkovDenoiser(chain, α) is the exact predictor of p*, so plain sampling with it draws p*."""
    chain = MarkovChain.random(V=4, L=32, seed=0)
    c = chain.compare(plain_samples(MarkovDenoiser(chain, alpha=0.5), 10000), alpha=0.5)
    assert abs(c["z"]) < 4 and abs(c["toxic_rate_z"]) < 4, c
    assert c["marginal_tv"] < 0.015 and c["pair_tv"] < 0.03 and c["count_tv"] < 0.02, c
