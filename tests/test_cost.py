"""safegen.refine.cost against what really runs: the oracle is the model's own batch (the rows a scripted
model receives) and the sampler's commits, never the cost model itself."""
from dataclasses import replace

import pytest
import torch

from safegen.refine import cost
from safegen.research import planner
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

from oracles import ScriptedModel

B = 2
REWARD = lambda ids: -(ids == 0).sum(1).double()  # noqa: E731


def model_rows(sampling: SamplingConfig, rc: RefineConfig) -> float:
    """Rows per sample the model is given by the sampler with remask-only IterRef (every iteration
    draws a pool: the worst case) and no budget cap."""
    m = ScriptedModel(input_weight=1.0)
    hook = IterRef(replace(rc, selection="remask_only", budget=None), REWARD)
    DiffusionSampler(m, m.mask_id, sampling).run(torch.randint(0, 5, (B, 2)), seeds=0, hook=hook)
    return sum(c.shape[0] for c in m.calls) / B


SAMPLINGS = [
    # block_length 7 over 2 steps: commits 4 then 3, not 2·tokens_per_step = 6 after two steps
    SamplingConfig(max_new_tokens=14, steps=4, block_length=7, temperature=1.0),
    SamplingConfig(max_new_tokens=14, steps=4, block_length=7, temperature=1.0, cfg_scale=1.5),
    SamplingConfig(max_new_tokens=8, steps=8, block_length=4, temperature=0.5),
    SamplingConfig(max_new_tokens=12, steps=4, block_length=12, temperature=1.0),
]
REFINES = [
    RefineConfig(rho=1.0, schedule="evenly"),
    RefineConfig(n_proposals=2, rho=0.3, schedule="late", start=0.5, scope="all"),
    RefineConfig(rho=0.5, schedule="final"),
    RefineConfig(n_proposals=3, rho=0.6, schedule="steps", at_steps=(1, 3), scope="all"),
]


@pytest.mark.parametrize("sampling,rc", [(SAMPLINGS[i], REFINES[j]) for i, j in
                                         [(0, 0), (0, 3), (1, 1), (1, 2), (2, 1), (2, 2), (3, 0), (3, 3)]])
def test_planned_k_is_the_largest_whose_rows_fit(sampling, rc):
    budget = 12.0  # rho 1 at every step costs 8-9x plain now that proposals run one token a forward
    plan = planner.plan(sampling, rc, budget)
    plain = model_rows(sampling, replace(rc, iterations=0))
    assert cost.plain_rows(sampling) == plain
    assert plan.iterations >= 1
    rows = model_rows(sampling, replace(rc, iterations=plan.iterations))
    assert rows == plan.rows == planner.worst_case_rows(sampling, replace(rc, iterations=plan.iterations))
    assert rows <= budget * plain
    assert model_rows(sampling, replace(rc, iterations=plan.iterations + 1)) > budget * plain


def test_decoded_tokens_at_each_point_are_the_samplers():
    sampling = SAMPLINGS[0]
    seen = []

    class Recorder:
        def applies(self, block, step, S, t):
            return step >= 1

        def __call__(self, sampler, state):
            sl = sampler.block_slice(state.block)
            decoded = state.gen != sampler.mask_id
            seen.append((sampler.global_step(state), int(decoded[0, sl].sum()), int(decoded[0, :sl.stop].sum())))

    m = ScriptedModel()
    DiffusionSampler(m, m.mask_id, sampling).run(torch.randint(0, 5, (1, 2)), hook=Recorder())
    assert [t for t, _, _ in seen] == list(range(1, sampling.steps + 1))
    for t, in_block, so_far in seen[:-1]:
        assert planner.decoded_at(sampling, t, "block") == in_block, t
        assert planner.decoded_at(sampling, t, "all") == so_far, t
    assert planner.decoded_at(sampling, sampling.steps, "block") == sampling.max_new_tokens  # the whole answer


def test_allowance_shares_what_the_base_steps_leave():
    sampling = SamplingConfig(max_new_tokens=8, steps=8, block_length=4, cfg_scale=1.0)  # 2 rows a forward
    spent = torch.tensor([10.0, 14.0])
    # budget 2 · 8 steps · 2 rows = 32; after t = 4, steps 6..8 are still to run (step 5's forward is
    # made): 3 · 2 rows; 2 points share the rest.
    assert cost.allowance(sampling, 2, spent, 4, 2).tolist() == [(32 - 10 - 6) / 2, (32 - 14 - 6) / 2]
    # At the last point no base step is left.
    assert cost.allowance(sampling, 2, spent, 8, 1).tolist() == [22.0, 18.0]


def test_nothing_fits_a_budget_of_plain_sampling():
    plan = planner.plan(SAMPLINGS[1], REFINES[0], 1.0)
    assert plan.iterations == 0 and plan.points == () and plan.rows == 8.0  # 4 steps, 2 rows with CFG
