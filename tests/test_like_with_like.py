"""Refinement on the cache compares like with like: the current draft's reward is read from the same
kind of forward as a proposal's, its own (fast.ProposalCache with the head), not from the sampler's
cached prediction, whose logits outside the block date from the block's start (dual) or from earlier
steps. Measured as the share of the current draft's masked x̂0 positions that differ from a full
forward on the same draft: 0 for what the chain scores, and (the test's sensitivity) far from 0 for
the sampler's own prediction that the chain used before."""
import pytest
import torch

from oracles import SMALL_MASK as MASK, padded_prompts, small_llada
from safegen.models.family import ModelProfile
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig


@pytest.fixture(scope="module")
def model():
    return small_llada(seed=2)


class Recording(IterRef):
    """Records, at each point, every x̂0 that `begin` scores, with the full forward's x̂0 of the same drafts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.points, self._scored = [], None

    def begin(self, sampler, state):
        self._scored = []
        chain = super().begin(sampler, state)
        if self._scored:
            owner = self._scored[-1][0].to(state.x.device)
            attn = None if state.attention_mask is None else state.attention_mask[owner]
            with torch.inference_mode():
                logits = sampler._call(state.x[owner], attn)[:, state.prompt_length:]
                full = sampler.next_prediction(state, logits, state.gen[owner], owner).xhat0
            masked = state.gen[owner] == sampler.mask_id
            self.points.append([(xhat0[masked] != full[masked]).double().mean().item() if masked.any() else 0.0
                                for _, xhat0 in self._scored])
        self._scored = None
        return chain

    def score(self, state, xhat0, owner):
        if self._scored is not None:
            self._scored.append((owner.clone(), xhat0.clone()))
        return super().score(state, xhat0, owner)


def prompts():
    return padded_prompts(4, 4, 6, pads=(2,))


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_the_current_drafts_reward_comes_from_its_own_forward(model, cache):
    ids, attn = prompts()
    cfg = SamplingConfig(max_new_tokens=24, steps=24, block_length=8, temperature=1.0, cache=cache)
    hook = Recording(RefineConfig(schedule="late", iterations=2, adaptive=False, n_proposals=2),
                     lambda gen: -(gen == 7).sum(1).double())
    DiffusionSampler(model, ModelProfile(mask_id=MASK), cfg).run(ids, attn, seeds=0, hook=hook)
    assert len(hook.points) >= 6
    gate = [p[0] for p in hook.points]  # the sampler's cached prediction (what the chain used before)
    scored = [p[-1] for p in hook.points]  # what the chain compares proposals with now
    assert all(len(p) == 2 for p in hook.points)  # the gate, then the draft's own forward
    assert max(scored) == 0.0, scored
    assert max(gate) > 0.05, gate  # the check is sensitive: the cached prediction differs


def test_without_the_cache_the_sampler_prediction_is_the_full_forward(model):
    ids, attn = prompts()
    cfg = SamplingConfig(max_new_tokens=16, steps=16, block_length=8, temperature=1.0)
    hook = Recording(RefineConfig(schedule="late", iterations=1, adaptive=False, n_proposals=2),
                     lambda gen: -(gen == 7).sum(1).double())
    DiffusionSampler(model, ModelProfile(mask_id=MASK), cfg).run(ids, attn, seeds=0, hook=hook)
    assert hook.points and all(p == [0.0] for p in hook.points)  # one score, already like with like
