"""IterRef's proposals must be draws from the model's joint conditional p(x_S | x_rest) whatever the
base sampler's pace and stop-token handling (issue 16, item 3). Checked on the exact toy against
p* itself (TV to p* and the z of the mean reward), and at the model (the rows it really receives)
against the cost model."""
from dataclasses import replace

import pytest
import torch

from safegen.refine import cost
from safegen.research import planner
from safegen.research import toy
from safegen.models.family import ModelProfile
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

from oracles import ScriptedModel, small_toy

V, L, ALPHA, N_SAMPLES, P0, REWARD, BLAME, P_STAR, FLOOR, DENOISER = small_toy()
K = 24


def refined(sampling: SamplingConfig, profile, **refinement) -> torch.Tensor:
    """(N_SAMPLES, L) samples of IterRef with RefineConfig's defaults but k, alpha and `refinement`."""
    hook = IterRef(RefineConfig(iterations=K, alpha=ALPHA, **refinement), REWARD, BLAME)
    out = DiffusionSampler(DENOISER, profile, sampling).run(torch.empty((N_SAMPLES, 0), dtype=torch.long),
                                                            seeds=0, hook=hook)
    return out.sequences


@pytest.mark.parametrize("block_length,remask", [(4, "uniform"), (4, "targeted"), (2, "uniform")])
def test_exact_at_two_tokens_per_step(block_length, remask):
    """T = 2 over L = 4: the base sampler commits two tokens a forward (LLaDA's 256 tokens in 128
    steps). Two holes committed from their separate marginals are not a draw from their joint; the
    proposals re-commit one hole a forward whatever the base pace (measured before: TV 0.20-0.22)."""
    sampling = SamplingConfig(max_new_tokens=L, steps=2, block_length=block_length, temperature=1.0)
    assert sampling.tokens_per_step == 2
    seqs = refined(sampling, V, proposal_holes=remask)
    tv = toy.tv_distance(seqs, P_STAR, V)
    z = toy.mean_z(REWARD(seqs), REWARD.values, P_STAR)
    assert tv < FLOOR + 0.02 and abs(z) < 3, (tv, FLOOR, z)


def _cut(seqs: torch.Tensor, stop: int) -> torch.Tensor:
    """What the sampler returns for complete answers: every token after the first stop becomes
    the stop token (the pad when the profile names none)."""
    is_stop = (seqs == stop).long()
    after = (is_stop.cumsum(1) - is_stop) > 0
    return torch.where(after, torch.full_like(seqs, stop), seqs)


@pytest.mark.parametrize("steps", [L, 2])
def test_exact_with_stop_tokens_committed_last(steps):
    """confidence_eos_eot_inf (LLaDA's instruct setting) commits stop tokens last. Demoting a hole
    by its *sampled* token makes a proposal's order depend on what it samples (measured before:
    TV 0.205 against a floor of 0.021); proposals demote by the logits' most likely token."""
    stop = 2
    profile = ModelProfile(mask_id=V, eos_id=stop)
    sampling = SamplingConfig(max_new_tokens=L, steps=steps, block_length=L, temperature=1.0,
                              confidence_eos_eot_inf=True)
    seqs = refined(sampling, profile)
    # The output is cut at the first stop: compare with the image of p* under the same cut.
    everything = toy.all_sequences(V, L)
    image = toy.encode(_cut(everything, stop), V)
    p_cut = torch.zeros_like(P_STAR).index_add_(0, image, P_STAR)
    cut_reward = REWARD(_cut(everything, stop))  # r of each sequence's cut image, per sequence of p*
    assert torch.equal(_cut(seqs, stop), seqs)
    tv = toy.tv_distance(seqs, p_cut, V)
    z = toy.mean_z(REWARD(seqs), cut_reward, P_STAR)
    floor = toy.expected_tv_noise(p_cut, N_SAMPLES)
    assert tv < floor + 0.02 and abs(z) < 3, (tv, floor, z)


# ---------------------------------------------------------------- cost at the model
@pytest.mark.parametrize("sampling,rc", [
    (SamplingConfig(max_new_tokens=8, steps=4, block_length=8, temperature=1.0),  # 2 a step
     RefineConfig(n_proposals=2, iterations=2, rho=0.5, schedule="late", start=0.5)),
    (SamplingConfig(max_new_tokens=12, steps=4, block_length=6, temperature=1.0, cfg_scale=1.0),  # 3 a step
     RefineConfig(n_proposals=1, iterations=3, rho=0.6, schedule="final", scope="all")),
])
def test_a_proposal_runs_one_forward_per_hole(sampling, rc):
    """At several tokens per base step a proposal still re-commits one hole per forward: the rows the
    model receives are what the cost model charges, N · (m + a scoring forward) per pool."""
    B, P = 2, 2
    m = ScriptedModel(input_weight=1.0)
    hook = IterRef(replace(rc, selection="remask_only"), lambda ids: -(ids == 0).sum(1).double())
    out = DiffusionSampler(m, m.mask_id, sampling).run(torch.randint(0, 5, (B, P)), seeds=0, hook=hook)
    rows_model = sum(c.shape[0] for c in m.calls) / B
    assert out.rows.tolist() == [rows_model] * B
    assert rows_model == planner.worst_case_rows(sampling, rc)
    per_forward = 2 if sampling.cfg_scale > 0 else 1
    for t in cost.refinement_points(sampling, rc.applies):
        n = planner.decoded_at(sampling, t, rc.scope)
        holes = max(1, round(rc.rho * n))
        scoring = 0 if t == sampling.steps else 1
        assert planner.point_pool_rows(sampling, rc, t) == rc.n_proposals * (holes + scoring) * per_forward
