"""The "before" sample: plain sampling of the same prompt and seed, paid for only where refinement
changed the sample."""
import torch

from oracles import ScriptedModel
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig


class ChangeRecorder:
    """A step hook that records which rows the wrapped hook ever changed."""

    def __init__(self, hook, batch):
        self.hook, self.changed = hook, torch.zeros(batch, dtype=torch.bool)

    def applies(self, *point):
        return self.hook.applies(*point)

    def __call__(self, sampler, state):
        before = state.x.clone()
        self.hook(sampler, state)
        self.changed |= (state.x != before).any(1)


def test_untouched_rows_cost_nothing_and_forks_are_plain_sampling():
    m = ScriptedModel(input_weight=1.0, seed=4)
    ids = torch.randint(0, 5, (16, 3), generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(max_new_tokens=16, steps=16, block_length=8, temperature=1.0)
    reward = lambda t: -(t == 4).sum(1).double()
    sampler = DiffusionSampler(m, m.mask_id, cfg)
    plain = sampler.run(ids, seeds=0)
    # Refinement from the first block on, with a bar that a few rows pass: refinement leaves them be.
    rc = RefineConfig(n_proposals=2, iterations=2, rho=0.5, alpha=0.05, schedule="late", start=0.5,
                      adaptive=True, accept_reward=-1.0)
    hook = ChangeRecorder(IterRef(rc, reward), len(ids))
    out = sampler.run(ids, seeds=0, hook=hook, fork_plain=True)
    assert torch.equal(out.plain_sequences, plain.sequences)  # every "before" is exactly plain sampling
    untouched = ~hook.changed
    assert 0 < int(untouched.sum()) < 16  # both kinds of row are present
    assert (out.plain_rows[untouched] == 0).all()
    assert (out.plain_rows[~untouched] > 0).all() and (out.plain_rows < cfg.steps).all()
