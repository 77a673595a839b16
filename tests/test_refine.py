
import pytest
import torch

from safegen.research import toy
from safegen.research.baselines import best_of_n, fk_steering, svdd
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import ConfigError, DiffusionSampler, SamplingConfig

from oracles import ScriptedModel

# The exactness tests, on a toy whose target is known exactly, are in test_refine_exact.py.

# ---------------------------------------------------------------- accounting
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
    assert (res.reward_calls[clean] == 1).all()  # but one reward call per point, to know it
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
        RefineConfig(accept_reward="high").validate()
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
    from safegen.research.baselines import SVDDSampler

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


def test_budget_is_spent_exactly_when_its_pools_divide_it():
    """2 blocks of 4, T = 8, budget 4 = 32 rows. At block 0's end 5 rows are spent (4 steps and the
    forward for block 1's first step) and 3 base forwards are to come: the point may spend
    (32 - 5 - 3) / 2 points = 12 rows, 4 pools of 3 (2 holes + a scoring forward). The last point
    then has 32 - 20 = 12 rows: 3 pools of 4 (the whole answer, m = 4, no scoring forward)."""
    m = ScriptedModel(input_weight=1.0)
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=4, temperature=1.0)
    rc = RefineConfig(iterations=64, schedule="final", selection="remask_only", budget=4)
    reward = lambda t: -(t == 2).sum(1).double()
    out = DiffusionSampler(m, m.mask_id, cfg).run(torch.randint(0, 5, (3, 2)), seeds=0, hook=IterRef(rc, reward))
    assert out.rows.tolist() == [32.0] * 3
    assert out.proposed.tolist() == [7.0] * 3


def test_prediction_after_an_acceptance_is_what_a_fresh_forward_gives():
    V2, L2 = 3, 6
    model = toy.TableDenoiser(toy.random_distribution(V2, L2, seed=2), V2, L2)  # batch-independent logits
    cfg = SamplingConfig(max_new_tokens=L2, steps=L2, block_length=3, temperature=1.0)
    reward = toy.toxic_count_reward(V2, L2, toxic=[0])
    moved = []

    class Checked(IterRef):
        def __call__(self, sampler, state):
            before = state.x.clone()
            super().__call__(sampler, state)
            fresh = state.copy()
            fresh.pred = None
            sampler.refresh(fresh)
            for f in ("candidates", "confidence", "xhat0"):
                assert torch.equal(getattr(state.pred, f), getattr(fresh.pred, f)), (state.block, state.step, f)
            moved.append(int((state.x != before).any(1).sum()))

    hook = Checked(RefineConfig(iterations=2, schedule="evenly", selection="remask_only"), reward)
    DiffusionSampler(model, V2, cfg).run(torch.empty((30, 0), dtype=torch.long), seeds=0, hook=hook)
    assert len(moved) == cfg.steps and sum(moved) > 30


class PromptEcho(torch.nn.Module):
    """Every generated token is the prompt's first token, but for a 1e-13 chance: a proposal
    denoised without its own row's prompt draws other tokens. Mask id 5."""

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, 6), -30.0)
        return logits.scatter_(2, input_ids[:, :1, None].expand(-1, input_ids.shape[1], 1), 0.0)


def test_proposals_see_their_own_rows_prompt():
    ids = torch.tensor([[1, 0], [2, 0], [3, 0], [4, 0]])
    cfg = SamplingConfig(max_new_tokens=4, steps=4, block_length=4, temperature=1.0)
    rc = RefineConfig(n_proposals=3, iterations=3, schedule="evenly", selection="remask_only")
    reward = lambda t: -(t == 2).sum(1).double()
    out = DiffusionSampler(PromptEcho(), 5, cfg).run(ids, seeds=0, hook=IterRef(rc, reward))
    assert out.accepted.sum() == 4 * 3 * 4
    assert torch.equal(out.sequences[:, 2:], ids[:, :1].expand(-1, 4))


def test_proposal_order_is_a_setting_that_reaches_the_proposals():
    """RefineConfig.proposal_order, not a module global, orders a proposal's commits: on a model
    whose logits depend on the input, the three orders draw different proposals from the same keys,
    and an unknown order is a ConfigError naming the field."""
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)
    reward = lambda ids: -(ids == 0).sum(1).double()
    prompts = torch.randint(0, 5, (6, 2), generator=torch.Generator().manual_seed(0))
    outs = {}
    for order in ("max_prob", "max_prob", "random", "low_confidence"):
        m = ScriptedModel(input_weight=1.0)
        rc = RefineConfig(iterations=3, rho=1.0, selection="remask_only", proposal_order=order)
        out = DiffusionSampler(m, m.mask_id, cfg).run(prompts, seeds=3, hook=IterRef(rc, reward)).sequences
        assert order not in outs or torch.equal(outs[order], out)  # the same order: the same draws
        outs[order] = out
    assert not torch.equal(outs["max_prob"], outs["random"])
    assert not torch.equal(outs["max_prob"], outs["low_confidence"])
    with pytest.raises(ConfigError, match="refine.proposal_order"):
        RefineConfig(proposal_order="left_to_right").validate()


def test_the_former_name_remask_still_sets_proposal_holes():
    """RefineConfig.remask became proposal_holes (beside SamplingConfig.remasking, LLaDA's commit
    order, the old name misled); updated() and the CLI's --remask still take the former name."""
    from safegen.arguments import refine_options
    from safegen.cli import build_parser

    assert RefineConfig().updated(remask="targeted").proposal_holes == "targeted"
    assert RefineConfig.preset("middleware").proposal_holes == "targeted"
    args = build_parser().parse_args(["generate", "hi", "--remask", "uniform"])
    assert refine_options(args) == {"proposal_holes": "uniform"}
