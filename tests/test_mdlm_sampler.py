"""MDLM's ancestral sampler (safegen.sampling.mdlm) on the exact toy (safegen.research.toy): its step statistics
against a re-derivation of the reference's `_ddpm_caching_update` loop, its samples against p0, and
IterRef on top of it against p* (total variation and a z-test of the mean reward). Seeds are fixed."""
import math

import pytest
import torch

from safegen.research import toy
from safegen.sampling.mdlm import MDLMSampler, expected_forwards, move_chances, unmask_probability
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.factory import make_sampler
from safegen.sampling.sampler import ConfigError, SamplingConfig

V, L, ALPHA, N_SAMPLES = 3, 4, 0.5, 3000
P0 = toy.random_distribution(V, L, seed=1, sharpness=1.0)
REWARD = toy.toxic_count_reward(V, L, toxic=[0])
BLAME = toy.toxic_blame([0])
P_STAR = toy.target(P0, REWARD.values, ALPHA)
FLOOR = toy.expected_tv_noise(P_STAR, N_SAMPLES)
DENOISER = toy.TableDenoiser(P0, V, L)
# Many steps: two positions unmasked at the same step are drawn independently given the same context,
# which is exact only as T grows (at T = 256, 2.3% of samples have such a pair); steps that unmask
# nothing cost no forward.
STEPS = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of steps on tensors of a few thousand numbers: thread hand-offs would cost more than
    the work (12x on a loaded 2-core machine, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mdlm(steps=STEPS, **sampling):
    return MDLMSampler(DENOISER, V, SamplingConfig(max_new_tokens=L, steps=steps, temperature=1.0,
                                                   sampler="mdlm", **sampling))


class Recorder:
    """A hook at every point that records how many positions each row has masked: costs no forward
    (the sampler refreshes stale rows only, as its next step would)."""

    def __init__(self):
        self.masked = []

    def applies(self, block, step, steps_in_block, t=None):
        return True

    def __call__(self, sampler, state):
        self.masked.append((state.gen == sampler.mask_id).sum(1).clone())


def reference_ddpm_cache(n, steps, seed=0, eps=1e-5):
    """The reference's `_sample` with `_ddpm_caching_update`, re-derived, for n sequences each sampled
    alone (the reference drops its cache when anything in its batch changed): q(x_s) ∝ p_x0 · (t − s)
    for each token and s for the mask, a categorical draw per position, decoded positions copied, the
    model re-run only after a change; argmax noise removal at the end. Returns (samples, masked counts
    before each step, forwards per sample)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, L), V)
    cache = torch.zeros((n, L, V), dtype=torch.float64)
    stale = torch.ones(n, dtype=torch.bool)
    forwards, masked = torch.zeros(n, dtype=torch.float64), []
    for i in range(steps):
        t, s = move_chances(i, steps, eps)
        masked.append((x == V).sum(1))
        run = stale & (x == V).any(1)  # a sequence without a mask needs no forward
        if run.any():
            cache[run] = torch.softmax(DENOISER(x[run])[..., :V].double(), -1)  # mask column dropped (subs)
            forwards += run.double()
        q = torch.cat([cache * (t - s), torch.full((n, L, 1), s, dtype=torch.float64)], dim=-1)
        draw = torch.multinomial(q.reshape(-1, V + 1), 1, generator=g).reshape(n, L)
        new = torch.where(x == V, draw, x)
        stale = (new != x).any(1)
        x = new
    left = (x == V).any(1)
    forwards += left.double()
    if left.any():
        x = torch.where(x == V, DENOISER(x)[..., :V].argmax(-1), x)
    return x, torch.stack(masked, 1), forwards


def unmask_z(masked):
    """z of the positions unmasked over all steps against the binomial expectation Σ n_i p_i, n_i the
    masked positions before step i (n, steps), p_i = (t − s)/t."""
    steps = masked.shape[1]
    p = torch.tensor([unmask_probability(i, steps) for i in range(steps)], dtype=torch.float64)
    n_before = masked[:, :-1].double()
    unmasked = (masked[:, :-1] - masked[:, 1:]).double()
    mean = (n_before * p[:-1]).sum()
    var = (n_before * p[:-1] * (1 - p[:-1])).sum()
    return float((unmasked.sum() - mean) / var.sqrt())


def test_unmask_probability_is_the_log_linear_ratio():
    # (alpha_s − alpha_t) / (1 − alpha_t) with alpha = 1 − t; the first step dt, the last dt / (eps + dt).
    T, eps = 8, 1e-5
    dt = (1 - eps) / T
    assert unmask_probability(0, T) == pytest.approx(dt)
    assert unmask_probability(T - 1, T) == pytest.approx(dt / (eps + dt))
    # A position survives every step with probability eps: the product of s/t telescopes.
    assert math.prod(1 - unmask_probability(i, T) for i in range(T)) == pytest.approx(eps)


def test_step_statistics_match_the_reference_loop():
    steps = 16  # few steps: many positions unmask together, the binomial counts are visible
    recorder = Recorder()
    out = mdlm(steps).run(torch.empty((N_SAMPLES, 0), dtype=torch.long), seeds=0, hook=recorder)
    ours = torch.stack(recorder.masked[:steps], 1)  # masked before steps 0..T-1 (the hook at 0 sees all)
    _, theirs, their_forwards = reference_ddpm_cache(N_SAMPLES, steps)
    assert (ours[:, 0] == L).all() and (theirs[:, 0] == L).all()
    assert abs(unmask_z(ours)) < 3 and abs(unmask_z(theirs)) < 3, (unmask_z(ours), unmask_z(theirs))
    # Per step, the mean number still masked agrees with the reference's (two-sample z).
    for i in range(1, steps):
        a, b = ours[:, i].double(), theirs[:, i].double()
        z = (a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b) + 1e-12)
        assert abs(z) < 4, (i, float(a.mean()), float(b.mean()))
    # Forwards: only after a change, as the reference's cache; both match the closed form.
    expected = expected_forwards(L, steps)
    for rows in (out.rows, their_forwards):
        z = (rows.mean() - expected) / (rows.std() / math.sqrt(len(rows)))
        assert abs(float(z)) < 3, (float(rows.mean()), expected)
    assert out.rows.max() <= L + 1


def test_plain_mdlm_sampler_draws_from_p0_like_the_reference():
    out = mdlm().run(torch.empty((N_SAMPLES, 0), dtype=torch.long), seeds=0)
    floor = toy.expected_tv_noise(P0, N_SAMPLES)
    assert toy.tv_distance(out.sequences, P0, V) < floor + 0.02
    reference, _, _ = reference_ddpm_cache(N_SAMPLES, STEPS, seed=1)
    assert toy.tv_distance(reference, P0, V) < floor + 0.02
    assert abs(toy.mean_z(REWARD(out.sequences), REWARD.values, P0)) < 3
    assert toy.tv_distance(out.sequences, P_STAR, V) > 0.4  # far from the aligned target
    assert out.rows.mean() < L + 1.01  # at most one forward per unmasking step, not one per step


def distance(samples):
    return toy.tv_distance(samples, P_STAR, V), toy.mean_z(REWARD(samples), REWARD.values, P_STAR)


def refined(k, flip_sign=False, **refinement):
    hook = IterRef(RefineConfig(iterations=k, alpha=ALPHA, **refinement), REWARD, BLAME)
    if flip_sign:  # the acceptance with the opposite sign: exp((r − r')/α)
        hook.config.alpha = -ALPHA
    return mdlm().run(torch.empty((N_SAMPLES, 0), dtype=torch.long), seeds=0, hook=hook)


@pytest.mark.parametrize("remask, n_proposals", [("uniform", 1), ("targeted", 3)])
def test_iterref_on_mdlm_reaches_the_aligned_target(remask, n_proposals):
    out = refined(16, proposal_holes=remask, n_proposals=n_proposals)
    tv, z = distance(out.sequences)
    assert tv < FLOOR + 0.02 and abs(z) < 3, (tv, FLOOR, z)


def test_iterref_on_mdlm_with_the_sign_flipped_fails():
    tv, z = distance(refined(16, flip_sign=True).sequences)
    assert tv > FLOOR + 0.3 and z < -10


def test_iterref_refines_intermediate_points_of_mdlm_too():
    """Points before the end (schedule evenly): drafts with a random number of decoded positions; the
    last point still carries the chain to p*."""
    out = refined(24, schedule="steps", at_steps=(STEPS // 2, STEPS))
    tv, z = distance(out.sequences)
    assert tv < FLOOR + 0.02 and abs(z) < 3, (tv, z)


def test_mdlm_config_and_factory():
    assert isinstance(make_sampler(DENOISER, V, SamplingConfig(sampler="mdlm", max_new_tokens=L, steps=64)),
                      MDLMSampler)
    cfg = SamplingConfig(sampler="mdlm", max_new_tokens=32, steps=1000, block_length=5).validate()
    assert (cfg.n_blocks, cfg.steps_per_block, cfg.tokens_per_step) == (1, 1000, 1)
    with pytest.raises(ConfigError, match="sampling.sampler"):
        SamplingConfig(sampler="sedd").validate()


def test_rows_alone_and_batched_are_identical():
    prompts = torch.empty((6, 0), dtype=torch.long)
    together = mdlm(32).run(prompts, seeds=[5, 6, 7, 8, 9, 10]).sequences
    alone = torch.cat([mdlm(32).run(prompts[:1], seeds=[s]).sequences for s in (5, 6, 7, 8, 9, 10)])
    assert torch.equal(together, alone)


def test_budget_is_counted_in_mdlm_plain_forwards():
    """The budget's unit with MDLM's sampler is its expected plain cost (cost.plain_rows), not T: at
    T = 256 for 4 tokens a budget of 3 x T would be no cap at all."""
    from safegen.refine import cost

    sampler = mdlm()
    unit = cost.plain_rows(sampler.config)
    assert unit == pytest.approx(expected_forwards(L, STEPS)) and unit < L + 1
    out = refined(16, budget=3.0)
    assert (out.rows <= 3.0 * unit + cost.EPS).all()
    assert out.rows.mean() > 2.0 * unit  # the allowance is spent, not left
