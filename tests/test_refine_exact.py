"""IterRef against an exactly enumerable target: a toy whose denoiser is exact (safegen.research.toy), so
that the refined samples can be compared with p* ∝ p0 · exp(r/α) itself. Each statistical test
checks total variation to p* and the z-score of the mean reward (TV alone misses biases of a few
per cent). Seeds are fixed, so every outcome is reproducible."""
import itertools
import math

import pytest
import torch

from safegen.refine import remask
from safegen.research import toy
from safegen.refine.iterref import BlameResult, IterRef, RefineConfig
from safegen.sampling.sampler import ConfigError, DiffusionSampler, SamplingConfig

from oracles import small_toy

V, L, ALPHA, N_SAMPLES, P0, REWARD, BLAME, P_STAR, FLOOR, DENOISER = small_toy()


def sampler(block_length=L, prompt_aware=False, **sampling):
    """LLaDA's defaults (low_confidence order) at temperature 1, one token per step."""
    cfg = SamplingConfig(max_new_tokens=L, steps=L, block_length=block_length, **({"temperature": 1.0} | sampling))
    return DiffusionSampler(DENOISER, V, cfg)


def refine(k, s=None, n=N_SAMPLES, seed=0, flip_sign=False, **refinement):
    """Refined samples (n, L) with RefineConfig's defaults but k, alpha and `refinement`."""
    hook = IterRef(RefineConfig(iterations=k, alpha=ALPHA, **refinement), REWARD, BLAME)
    if flip_sign:  # the shipped acceptance with the opposite sign: exp((r − r')/α)
        hook.config.alpha = -ALPHA
    out = (s or sampler()).run(torch.empty((n, 0), dtype=torch.long), seeds=seed, hook=hook)
    return out.sequences


def distance(samples):
    return toy.tv_distance(samples, P_STAR, V), toy.mean_z(REWARD(samples), REWARD.values, P_STAR)


def test_plain_sampler_is_exact_for_p0():
    out = sampler(remasking="random").run(torch.empty((N_SAMPLES, 0), dtype=torch.long), seeds=0)
    assert toy.tv_distance(out.sequences, P0, V) < toy.expected_tv_noise(P0, N_SAMPLES) + 0.02
    assert toy.tv_distance(out.sequences, P_STAR, V) > 0.4  # far from the aligned target


def test_iterref_converges_to_the_aligned_target():
    tv = {k: distance(refine(k))[0] for k in (1, 4, 16)}
    assert tv[1] > tv[4] > tv[16]
    assert tv[16] < FLOOR + 0.02, tv


@pytest.mark.parametrize("remask_, n_proposals, block_length", [
    ("uniform", 1, 2), ("uniform", 3, 4), ("targeted", 1, 2), ("targeted", 3, 2), ("targeted", 3, 4)])
def test_exact_with_default_order_for_any_pool_size_and_blocks(remask_, n_proposals, block_length):
    """LLaDA's low_confidence base order, one and two blocks: the chain still reaches p*. N = 3
    re-uses pools after rejections, so this also guards against a pool kept after an acceptance."""
    tv, z = distance(refine(24, sampler(block_length), proposal_holes=remask_, n_proposals=n_proposals))
    assert tv < FLOOR + 0.02 and abs(z) < 3, (tv, FLOOR, z)


@pytest.mark.parametrize("base", [dict(remasking="topk_margin"), dict(remasking="entropy", alg_temp=0.5),
                                  dict(remasking="maskgit_plus", temperature=0.7),
                                  dict(remasking="entropy", transfer="dream"), dict(remasking="origin")])
def test_exact_with_dreams_base_orders(base):
    """Dream's orders, alg_temp and commit counts change only the base sampler's commits; the
    proposals keep their own order, so the chain still reaches p*."""
    tv, z = distance(refine(24, sampler(2, **base)))
    assert tv < FLOOR + 0.02 and abs(z) < 3, (tv, FLOOR, z)


def test_flipped_acceptance_sign_fails_the_exactness_test():
    tv, z = distance(refine(16, flip_sign=True))
    assert tv > FLOOR + 0.3 and z < -10


def test_greedy_base_sampler_with_stochastic_proposals_is_exact():
    """temperature 0: the base trajectory is deterministic; the proposals still sample (at the
    proposal temperature), so the chain mixes to p*."""
    tv, z = distance(refine(24, sampler(2, temperature=0.0)))
    assert tv < FLOOR + 0.02 and abs(z) < 3, (tv, z)


def test_targeted_beats_uniform_at_few_iterations():
    toxic = {}
    for how in ("uniform", "targeted"):
        toxic[how] = float((REWARD(refine(2, sampler(2), proposal_holes=how)) < 0).double().mean())
    assert toxic["targeted"] < toxic["uniform"] - 0.05, toxic


# ---------------------------------------------------------------- the re-masking distribution
def brute_force_q(w, m):
    """{set: q(S)} by enumerating every set of size m among the positive weights."""
    sets = [s for s in itertools.combinations(range(len(w)), m) if all(w[i] > 0 for i in s)]
    mass = {s: math.prod(w[i] for i in s) for s in sets}
    total = sum(mass.values())
    return {s: v / total for s, v in mass.items()}


def test_weighted_subsets_are_drawn_with_their_exact_probability():
    w = torch.tensor([0.1, 1.0, 0.0, 0.4, 0.1, 0.7], dtype=torch.float64)  # position 2 ineligible
    m, n = 3, 40000
    exact = brute_force_q(w.tolist(), m)
    u = torch.rand((n, len(w)), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chosen, log_q = remask.weighted(w.expand(n, -1), torch.full((n,), m), u)
    assert (chosen.sum(1) == m).all() and not chosen[:, 2].any()
    keys = [tuple(torch.nonzero(c).squeeze(1).tolist()) for c in chosen]
    for s, q in exact.items():
        freq = sum(k == s for k in keys) / n
        assert abs(freq - q) < 4 * math.sqrt(q * (1 - q) / n) + 1e-3, (s, freq, q)
    got = {k: float(lq.exp()) for k, lq in zip(keys, log_q)}
    assert all(abs(got[s] - exact[s]) < 1e-9 for s in got)
    # log_prob of a given set agrees with the draw's own, and with enumeration.
    assert torch.allclose(remask.log_prob(w.expand(n, -1), chosen, torch.full((n,), m)), log_q)


def test_weighted_subsets_stay_finite_for_long_answers():
    """C(2000, 1000) ~ 1e600 overflows float64: the recursion runs in log space."""
    w = torch.full((2, 2000), 0.5, dtype=torch.float64)
    m = torch.tensor([1000, 3])
    chosen, log_q = remask.weighted(w, m, torch.rand(2, 2000, dtype=torch.float64))
    assert chosen.sum(1).tolist() == [1000, 3]
    assert torch.isfinite(log_q).all()
    assert abs(float(log_q[1]) + math.log(math.comb(2000, 3))) < 1e-6


def test_targeted_needs_a_blame_and_checks_it():
    with pytest.raises(ConfigError, match="proposal_holes='targeted'.*blame"):
        IterRef(RefineConfig(proposal_holes="targeted"), REWARD)
    with pytest.raises(ConfigError, match="refine.blame_floor"):
        RefineConfig(blame_floor=0.0).validate()
    ids = torch.empty((4, 0), dtype=torch.long)
    for bad, message in [(lambda t: torch.zeros(t.shape[0]), "shape"), (lambda t: 2.0 * BLAME(t), r"\[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            sampler().run(ids, hook=IterRef(RefineConfig(proposal_holes="targeted"), REWARD, bad))


def test_blame_reports_its_reward_calls():
    """A blame that costs reward calls (occlusion) returns them with its result; they are charged
    to the row, on top of one call per scored draft (the current one, then every proposal)."""
    k, n = 3, 5
    costly = lambda t: BlameResult(BLAME(t), torch.full((t.shape[0],), 2.0))  # noqa: E731
    hook = IterRef(RefineConfig(iterations=k, proposal_holes="targeted"), REWARD, costly)
    out = sampler().run(torch.empty((n, 0), dtype=torch.long), seeds=0, hook=hook)
    assert out.reward_calls.tolist() == [(1 + k) * (1 + 2.0)] * n
