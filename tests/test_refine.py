
import pytest
import torch

from safegen import toy
from safegen.baselines import best_of_n, fk_steering, svdd
from safegen.refine import IterRef, RefineConfig
from safegen.sampler import ConfigError, DiffusionSampler, SamplingConfig

from oracles import ScriptedModel

# ---------------------------------------------------------------- exactness (algorithm.md §7)
V, L, ALPHA, N_SAMPLES = 3, 4, 0.5, 3000


@pytest.fixture(scope="module")
def exact_toy():
    p0 = toy.random_distribution(V, L, seed=1, sharpness=1.0)
    reward = toy.toxic_count_reward(V, L, toxic=[0])
    p_star = toy.target(p0, reward.values, ALPHA)
    cfg = SamplingConfig(max_new_tokens=L, steps=L, block_length=L, temperature=1.0, remasking="random")
    sampler = DiffusionSampler(toy.ExactDenoiser(p0, V, L), V, cfg)
    return p0, reward, p_star, sampler


def refined_tv(exact_toy, k, flip_sign=False, seed=0):
    p0, reward, p_star, sampler = exact_toy
    ids = torch.empty((N_SAMPLES, 0), dtype=torch.long)
    hook = IterRef(RefineConfig(n_proposals=4, iterations=k, rho=0.5, alpha=ALPHA, schedule="final"), reward)
    if flip_sign:  # the shipped acceptance with the opposite sign: exp((r − r')/α)
        hook.config.alpha = -ALPHA
    out = sampler.run(ids, seeds=seed, hook=hook)
    return toy.tv_distance(out.sequences, p_star, V)


def test_plain_sampler_is_exact_for_p0(exact_toy):
    p0, _, p_star, sampler = exact_toy
    out = sampler.run(torch.empty((N_SAMPLES, 0), dtype=torch.long), seeds=0)
    floor = toy.expected_tv_noise(p0, N_SAMPLES)
    assert toy.tv_distance(out.sequences, p0, V) < floor + 0.03
    assert toy.tv_distance(out.sequences, p_star, V) > 0.4  # far from the aligned target


def test_iterref_converges_to_aligned_target(exact_toy):
    _, _, p_star, _ = exact_toy
    floor = toy.expected_tv_noise(p_star, N_SAMPLES)  # about 0.04
    tv = {k: refined_tv(exact_toy, k) for k in (1, 4, 16)}
    assert tv[1] > tv[4] > tv[16]
    assert tv[16] < floor + 0.03, tv


def test_flipped_acceptance_sign_fails_the_exactness_test(exact_toy):
    _, _, p_star, _ = exact_toy
    floor = toy.expected_tv_noise(p_star, N_SAMPLES)
    assert refined_tv(exact_toy, 16, flip_sign=True) > floor + 0.3


# ---------------------------------------------------------------- accounting (algorithm.md §5)
def expected_rows(cfg: SamplingConfig, rc: RefineConfig) -> int:
    """T plus, at every refined point, k pools (remask_only accepts every time) of N proposals, each
    m = max(1, round(rho · decoded in scope)) sub-steps at one token per step, plus a scoring forward unless
    the proposal is fully decoded (the very last point)."""
    S, rows = cfg.steps_per_block, cfg.steps
    for block in range(cfg.n_blocks):
        for step in range(1, S + 1):
            if not rc.applies(block, step, S):
                continue
            decoded = cfg.block_length if rc.scope == "block" and step == S else step * cfg.tokens_per_step
            if rc.scope == "all":
                decoded = block * cfg.block_length + step * cfg.tokens_per_step
            if block == cfg.n_blocks - 1 and step == S:  # the last point spans the whole answer
                decoded = cfg.max_new_tokens
            m = max(1, round(rc.rho * decoded))
            scoring = 0 if (block == cfg.n_blocks - 1 and step == S) else 1
            rows += rc.iterations * rc.n_proposals * (m + scoring)
    return rows


@pytest.mark.parametrize("n,k,rho,schedule,scope", [
    (2, 1, 0.5, "late", "block"),
    (3, 2, 0.25, "evenly", "block"),
    (1, 3, 1.0, "final", "all"),
    (4, 1, 0.3, "steps", "all"),
])
def test_rows_match_formula(n, k, rho, schedule, scope):
    m = ScriptedModel(input_weight=1.0)
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=4, temperature=0.5)
    rc = RefineConfig(n_proposals=n, iterations=k, rho=rho, schedule=schedule, start=0.5, scope=scope,
                      at_steps=(3, 8), selection="remask_only")
    reward = lambda ids: -(ids == 0).sum(1).double()
    B = 3
    sampler = DiffusionSampler(m, m.mask_id, cfg)
    out = sampler.run(torch.randint(0, 5, (B, 2)), seeds=1, hook=IterRef(rc, reward))
    points = sum(rc.applies(b, s, 4) for b in range(2) for s in range(1, 5))
    assert out.rows.tolist() == [expected_rows(cfg, rc)] * B
    assert out.proposed.tolist() == [points * k] * B
    assert out.accepted.tolist() == [points * k] * B
    assert out.reward_calls.tolist() == [points * (1 + k * n)] * B
    # All proposals of all rows go through one forward per sub-step: never more rows than B·N.
    assert max(c.shape[0] for c in m.calls) == B * n


def test_mh_pool_reuse_and_budget():
    m = ScriptedModel(input_weight=2.0)
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=8, temperature=0.5)
    reward = lambda ids: -(ids == 0).sum(1).double()
    for budget in (2, 3):
        rc = RefineConfig(n_proposals=2, iterations=6, rho=0.5, alpha=0.05, schedule="late", start=0.5,
                          budget=budget)
        out = DiffusionSampler(m, m.mask_id, cfg).run(torch.randint(0, 5, (4, 2)), seeds=3, hook=IterRef(rc, reward))
        assert (out.rows <= budget * cfg.steps).all()
        assert (out.accepted <= out.proposed).all()


def test_refinement_keeps_prompt_and_decoded_count_and_improves_reward():
    m = ScriptedModel(input_weight=1.0, seed=4)
    P, B = 3, 16
    ids = torch.randint(0, 5, (B, P))
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)
    toxic = 2
    reward = lambda t: -(t == toxic).sum(1).double()
    sampler = DiffusionSampler(m, m.mask_id, cfg)
    plain = sampler.run(ids, seeds=0)
    rc = RefineConfig(n_proposals=4, iterations=4, rho=0.5, alpha=0.05, schedule="late", start=0.5)
    out = sampler.run(ids, seeds=0, hook=IterRef(rc, reward), fork_plain=True)
    assert torch.equal(out.sequences[:, :P], ids)
    assert not (out.sequences == m.mask_id).any()
    assert torch.equal(out.plain_sequences, plain.sequences)  # the fork is exactly plain sampling
    assert out.plain_rows.sum() > 0 and (out.plain_rows < cfg.steps).all()
    r_plain = reward(plain.sequences[:, P:]).mean()
    r_ref = reward(out.sequences[:, P:]).mean()
    assert r_ref > r_plain


def test_greedy_never_lowers_reward_and_adaptive_skips_acceptable_rows():
    m = ScriptedModel(input_weight=1.0, seed=5)
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)
    calls = []

    def reward(t):
        calls.append(t.shape[0])
        return -(t == 2).sum(1).double()

    ids = torch.randint(0, 5, (8, 2))
    sampler = DiffusionSampler(m, m.mask_id, cfg)
    plain = sampler.run(ids, seeds=0).sequences
    out = sampler.run(ids, seeds=0, hook=IterRef(RefineConfig(selection="greedy", schedule="final",
                                                             iterations=3), reward)).sequences
    assert (reward(out[:, 2:]) >= reward(plain[:, 2:])).all()
    clean = reward(plain[:, 2:]) == 0
    rc = RefineConfig(schedule="final", iterations=3, adaptive=True, accept_reward=0.0)
    res = sampler.run(ids, seeds=0, hook=IterRef(rc, reward))
    assert (res.rows[clean] == cfg.steps).all()  # acceptable rows cost no refinement at all
    assert (res.proposed[clean] == 0).all()
    if (~clean).any():
        assert (res.rows[~clean] > cfg.steps).all()


def test_refine_config_errors_name_the_field():
    for field, value in [("n_proposals", 0), ("iterations", -1), ("alpha", 0.0), ("rho", 0.0),
                         ("rho", 1.5), ("schedule", "sometimes"), ("scope", "prompt"),
                         ("selection", "best"), ("budget", 0.5)]:
        with pytest.raises(ConfigError, match=f"refine.{field}"):
            RefineConfig(**{field: value}).validate()
    with pytest.raises(ConfigError, match="accept_reward"):
        RefineConfig(adaptive=True).validate()
    with pytest.raises(ConfigError, match="refine.at_steps"):
        RefineConfig(schedule="steps").validate()
    with pytest.raises(ConfigError, match="unknown refine option"):
        RefineConfig().updated(temperature=1.0)


# ---------------------------------------------------------------- baselines
def test_baselines_respect_budget_and_improve_reward():
    V2, L2 = 4, 6
    p0 = toy.random_distribution(V2, L2, seed=2, sharpness=1.0)
    reward = toy.toxic_count_reward(V2, L2, toxic=[0])
    cfg = SamplingConfig(max_new_tokens=L2, steps=L2, block_length=L2, temperature=1.0, remasking="random")
    sampler = DiffusionSampler(toy.ExactDenoiser(p0, V2, L2), V2, cfg)
    ids = torch.empty((300, 0), dtype=torch.long)
    base = reward(sampler.run(ids, seeds=0).sequences).mean()
    for name, run in [("bon", lambda: best_of_n(sampler, ids, reward, 4)),
                      ("svdd", lambda: svdd(sampler, ids, reward, 4)),
                      ("fk", lambda: fk_steering(sampler, ids, reward, 4, every=2))]:
        out = run()
        assert out.sequences.shape == (300, L2), name
        assert (out.rows <= 4 * L2).all(), name
        assert reward(out.sequences).mean() > base + 0.3, name
    # SVDD with one candidate and Best-of-1 are plain sampling at plain cost.
    one = svdd(sampler, ids[:20], reward, 1)
    assert torch.equal(one.sequences, sampler.run(ids[:20], seeds=0).sequences)
    bo1 = best_of_n(sampler, ids[:20], reward, 1)
    assert (bo1.rows == L2).all()
    # With nothing to choose from, no method pays for a reward call.
    assert one.reward_calls.sum() == 0 and bo1.reward_calls.sum() == 0
    assert fk_steering(sampler, ids[:20], reward, 1).reward_calls.sum() == 0


def test_logits_are_never_stale_after_refinement():
    from safegen.baselines import SVDDSampler

    m = ScriptedModel(input_weight=2.0, seed=7)
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)
    reward = lambda t: -(t == 2).sum(1).double()
    checks = []

    class Checked(IterRef):
        def __call__(self, sampler, state):
            super().__call__(sampler, state)
            if state.logits is not None:  # whatever logits the state keeps must be the draft's
                fresh = m(state.x)[:, state.prompt_length:]
                checks.append(bool(torch.allclose(state.logits[..., :-1], fresh[..., :-1])))
            else:
                checks.append(True)

    hook = Checked(RefineConfig(selection="mh", alpha=1.0, schedule="evenly", iterations=2, n_proposals=2), reward)
    ids = torch.randint(0, 5, (6, 2))
    out = SVDDSampler(m, m.mask_id, cfg, reward, n_candidates=2).run(ids, seeds=0, hook=hook)
    assert checks and all(checks)
    assert out.accepted.sum() > 0 and not (out.sequences == m.mask_id).any()


def test_budget_is_shared_across_refinement_points_and_unaffordable_points_cost_nothing():
    m = ScriptedModel(input_weight=1.0)
    reward = lambda t: -(t == 2).sum(1).double()
    # Nothing affordable: no proposal and no reward call.
    cfg8 = SamplingConfig(max_new_tokens=8, steps=8, block_length=8)
    rc = RefineConfig(n_proposals=4, iterations=2, schedule="late", start=0.5, budget=1)
    out = DiffusionSampler(m, m.mask_id, cfg8).run(torch.randint(0, 5, (2, 2)), hook=IterRef(rc, reward))
    assert out.rows.tolist() == [8.0, 8.0] and out.reward_calls.tolist() == [0.0, 0.0]
    # A generous k would spend everything at the first point; the allowance keeps some for the last.
    cfg = SamplingConfig(max_new_tokens=16, steps=16, block_length=16, temperature=1.0)
    proposed_at = []

    class Recorder(IterRef):
        def __call__(self, sampler, state):
            before = state.proposed.clone()
            super().__call__(sampler, state)
            proposed_at.append((state.step, float((state.proposed - before).sum())))

    rc = RefineConfig(n_proposals=1, iterations=64, rho=0.25, schedule="late", start=0.5, budget=2)
    out = DiffusionSampler(m, m.mask_id, cfg).run(torch.randint(0, 5, (2, 2)), seeds=1, hook=Recorder(rc, reward))
    assert (out.rows <= 2 * cfg.steps).all()
    assert dict(proposed_at)[16] > 0  # the finished text (exact reward) is refined too
    assert sum(n > 0 for _, n in proposed_at) >= 3
