"""IterRef's budget in FLOPs (safegen.refine.cost.Meter): the cost model against what the sampler
counts at the model (SampleOutput.flops, from the forwards it really ran), and the budget as a hard
bound with and without the block cache. The oracle is always a run, never the meter itself."""
from dataclasses import replace

import pytest
import torch

from safegen.models.family import ModelProfile
from safegen.models.llada import LLaDAConfig, LLaDAModelLM
from safegen.refine import cost
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.research import planner
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

MASK, PAD = 199, 198
TOXIC = torch.tensor([5, 6, 7, 8, 9])
REWARD = lambda ids: -torch.isin(ids.cpu(), TOXIC).sum(1).double()  # noqa: E731
BLAME = lambda ids: torch.isin(ids.cpu(), TOXIC).double()  # noqa: E731


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96, vocab_size=200,
                      embedding_size=200, max_sequence_length=128, mask_token_id=MASK, eos_token_id=PAD,
                      pad_token_id=PAD)
    return LLaDAModelLM(cfg).eval()


def prompts(padded=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 190, (3, 8), generator=g)
    attn = torch.ones_like(ids)
    if padded:
        attn[1, :2] = 0
        attn[2, :5] = 0
        ids[attn == 0] = PAD
    return ids, attn


def sampler(model, **kw):
    base = dict(max_new_tokens=12, steps=12, block_length=4, temperature=1.0)
    return DiffusionSampler(model, ModelProfile(mask_id=MASK), SamplingConfig(**{**base, **kw}))


def meter_for(s, attn, P):
    lengths = attn.sum(1).double() + s.config.max_new_tokens
    return cost.Meter(s.config, s.dims, lengths)


SETTINGS = [dict(), dict(cache="prefix"), dict(cache="dual"), dict(cfg_scale=1.0),
            dict(cache="dual", max_new_tokens=11, steps=11)]  # the last: blocks 4, 4, 3


@pytest.mark.parametrize("kw", SETTINGS)
def test_plain_cost_is_what_the_sampler_counts(model, kw):
    ids, attn = prompts()
    s = sampler(model, **kw)
    out = s.run(ids, attn, seeds=[1, 2, 3])
    meter = meter_for(s, attn, ids.shape[1])
    assert torch.allclose(out.flops / meter.unit, meter.plain(), rtol=1e-12, atol=0)
    # Each base step's forward as the meter has it, and their sum against the run's FLOPs.
    assert torch.allclose(meter.steps.sum(0) * meter.unit, out.flops, rtol=1e-12, atol=0)
    if not kw.get("cache"):  # uncached, one unit is one row: the budget cuts where the rows did
        assert torch.equal(meter.plain(), out.rows)
    else:
        assert (meter.plain() < 0.8 * s.config.steps).all()


MOVES = {"remask": {}, "bar": dict(proposal_holes="targeted", bar_blamed=True),
         "gibbs mix": dict(proposal_holes="targeted", bar_blamed=True, gibbs_share=0.5, gibbs_holes=3, iterations=4),
         "gibbs": dict(gibbs_share=1.0)}


@pytest.mark.parametrize("cache,schedule,scope,move", [
    (None, "final", "block", "remask"), ("dual", "final", "block", "remask"), ("prefix", "final", "block", "remask"),
    ("dual", "evenly", "block", "remask"), ("dual", "final", "block", "bar"), ("dual", "final", "block", "gibbs mix"),
    (None, "evenly", "block", "gibbs mix"), ("prefix", "final", "all", "gibbs")])
def test_pool_cost_is_what_a_pool_counts(model, cache, schedule, scope, move):
    """Remask-only: every iteration draws a pool and moves, the planner's worst case; for each move,
    a Gibbs move's reverse path included."""
    ids, attn = prompts()
    rc = RefineConfig(**{**dict(n_proposals=2, iterations=2, rho=0.5, schedule=schedule, every=4,
                                selection="remask_only", scope=scope), **MOVES[move]})
    s = sampler(model, cache=cache)
    out = s.run(ids, attn, seeds=[1, 2, 3], hook=IterRef(rc, REWARD, blame=BLAME))
    for i in range(3):
        meter = cost.Meter(s.config, s.dims, (attn[i:i + 1].sum(1) + 12).double())
        want = planner.worst_case_cost(meter, rc)
        assert float(out.flops[i] / meter.unit[0]) == pytest.approx(want, rel=1e-12), i


def test_a_move_at_a_block_end_makes_the_next_block_refresh(model):
    """At a block's end, a move changes the block the next block's cache was made from: its second
    step is a prefill, what Meter.refresh reserves, and a run without the move does not pay it."""
    ids, attn = prompts()
    s = sampler(model, cache="dual")
    meter = meter_for(s, attn, ids.shape[1])
    assert (meter.refresh(4, "block") > 0).all() and (meter.refresh(3, "block") == 0).all()
    assert (meter.refresh(2, "all") > 0).all() and (meter.refresh(12, "all") == 0).all()
    assert (meter.refresh(3, "all") == 0).all()  # step 5 begins block 1: a prefill anyway
    assert (meter.refresh(11, "all") == 0).all()  # no step t+2 left
    rc = RefineConfig(n_proposals=1, iterations=1, rho=0.5, schedule="steps", at_steps=(4,),
                      selection="remask_only")
    moved = s.run(ids, attn, seeds=[1, 2, 3], hook=IterRef(rc, REWARD))
    stayed = s.run(ids, attn, seeds=[1, 2, 3], hook=IterRef(replace(rc, selection="greedy"),
                                                            lambda t: torch.zeros(len(t), dtype=torch.float64)))
    extra = (moved.flops - stayed.flops) / meter.unit  # the same pool either way; only the move differs
    assert torch.allclose(extra, meter.refresh(4, "block"), rtol=1e-12)


BOUND_CASES = [
    (dict(), "block", "uniform"), (dict(cache="dual"), "block", "uniform"),
    (dict(cache="dual"), "all", "targeted"), (dict(cache="prefix"), "all", "uniform"),
    (dict(cache="dual", threshold=0.5), "block", "targeted"), (dict(cfg_scale=1.0), "all", "uniform"),
    # A threshold every candidate passes: each block commits all at its first step, the rest make no forward.
    (dict(cache="dual", threshold=1e-6), "all", "targeted"), (dict(cache="prefix", threshold=1e-6), "block", "uniform"),
]


@pytest.mark.parametrize("kw,scope,holes", BOUND_CASES)
@pytest.mark.parametrize("budget", [2.0, 3.5])
def test_flops_never_exceed_the_budget_and_most_of_it_is_used(model, kw, scope, holes, budget):
    ids, attn = prompts()
    s = sampler(model, **kw)
    plain = s.run(ids, attn, seeds=[1, 2, 3])
    if kw.get("threshold") is None:
        plain_flops = plain.flops
    else:  # the threshold's plain run may stop early; the budget's unit is the schedule's cost
        plain_flops = sampler(model, **{**kw, "threshold": None}).run(ids, attn, seeds=[1, 2, 3]).flops
    rc = RefineConfig(n_proposals=2, iterations=64, rho=0.5, schedule="evenly", every=2, scope=scope,
                      proposal_holes=holes, alpha=0.5, budget=budget)
    out = s.run(ids, attn, seeds=[1, 2, 3], hook=IterRef(rc, REWARD, blame=BLAME))
    assert (out.flops <= budget * plain_flops * (1 + 1e-12)).all(), (out.flops / plain_flops).tolist()
    # Refinement ran, and what it left unspent is less than what it could not afford: a pool at the
    # last point (at most half the answer re-masked, N = 2) and the finished answer's forward there.
    assert (out.proposed > 0).any()
    meter = meter_for(s, attn, ids.shape[1])
    one_pool = meter.pool(2, torch.full((3,), 6), torch.zeros(3, dtype=torch.long)) * meter.unit
    assert (out.flops >= budget * plain_flops - one_pool - 2 * meter.unit).all(), (out.flops / plain_flops).tolist()



@pytest.mark.parametrize("at,scope", [(2, "all"), (4, "block"), (6, "all")])
def test_a_moves_refresh_stays_within_the_budget(model, at, scope):
    """One refinement point, where a move makes a later cached step a full one: the budget keeps that
    refresh back (Meter.refresh), whatever is left over after the last pool that fitted."""
    ids, attn = prompts()
    s = sampler(model, cache="dual")
    plain = s.run(ids, attn, seeds=[1, 2, 3]).flops
    for budget in (1.6, 1.9, 2.2, 2.5, 2.8):
        rc = RefineConfig(n_proposals=1, iterations=64, rho=0.5, schedule="steps", at_steps=(at,), scope=scope,
                          selection="remask_only", budget=budget)
        out = s.run(ids, attn, seeds=[1, 2, 3], hook=IterRef(rc, REWARD))
        assert (out.proposed > 0).any(), budget
        assert (out.flops <= budget * plain * (1 + 1e-12)).all(), (budget, (out.flops / plain).tolist())
