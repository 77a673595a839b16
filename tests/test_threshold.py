"""`threshold` means what it means in Fast-dLLM: a step commits the block's most confident candidate
and every other masked position of the block whose probability is at least τ, and a block runs until
it is done, whatever the step schedule. Checked against a reference written here from that
description (greedy, the uncached sampler, several blocks, left padding), token for token and
forward for forward; the rule that safegen had before (max(scheduled count, #p > τ)) fails it."""
import pytest
import torch

from oracles import SMALL_MASK as MASK, padded_prompts, small_llada
from safegen.models.family import ModelProfile
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig


@pytest.fixture(scope="module")
def model():  # sharper logits than the default initialisation: some steps commit several
    return small_llada(seed=1, head_scale=8.0)


def reference(model, ids, attn, G, block, tau):
    """Fast-dLLM's threshold decoding, greedy, one row at a time (no batch effects): (tokens, forwards)."""
    out, forwards = [], []
    for r in range(ids.shape[0]):
        keep = attn[r].bool()
        x = torch.cat([ids[r][keep], torch.full((G,), MASK)])[None]
        P, n = int(keep.sum()), 0
        for start in range(P, P + G, block):
            end = min(start + block, P + G)
            while (x[0, start:end] == MASK).any():
                with torch.no_grad():
                    logits = model(input_ids=x).logits[0].float()
                n += 1
                p = logits.softmax(-1)
                x0 = p.argmax(-1)
                conf = p.gather(-1, x0[:, None])[:, 0]
                masked = torch.zeros_like(conf, dtype=torch.bool)
                masked[start:end] = x[0, start:end] == MASK
                conf = torch.where(masked, conf, torch.tensor(-float("inf")))
                order = conf.argsort(descending=True)
                take = [int(order[0])] + [int(i) for i in order[1:] if masked[i] and conf[i] >= tau]
                x[0, take] = x0[take]
        out.append(x[0, P:])
        forwards.append(n)
    return torch.stack(out), forwards


def prompts():
    return padded_prompts(5, 3, 6, pads=(2, 4))


@pytest.mark.parametrize("tau", [0.3, 0.7, 0.9])
def test_threshold_is_fast_dllms_rule_token_for_token(model, tau):
    ids, attn = prompts()
    G, block = 16, 8
    # `steps` says 4 a block (2 tokens a step); Fast-dLLM's threshold ignores the schedule.
    cfg = SamplingConfig(max_new_tokens=G, steps=8, block_length=block, threshold=tau)
    out = DiffusionSampler(model, ModelProfile(mask_id=MASK), cfg).run(ids, attn, seeds=0)
    want, forwards = reference(model, ids, attn, G, block, tau)
    assert torch.equal(out.sequences[:, ids.shape[1]:], want)
    assert out.rows.tolist() == [float(f) for f in forwards]
    if tau == 0.9:  # the high threshold: most steps commit one token, more steps than the schedule's 4
        assert max(forwards) > G // 2
    if tau == 0.3:  # the low one: steps commit several, fewer forwards than the schedule
        assert max(forwards) < G // 2


def test_the_steps_of_a_block_are_its_length_with_a_threshold():
    cfg = SamplingConfig(max_new_tokens=20, steps=10, block_length=8, threshold=0.9).validate()
    assert [cfg.steps_in_block(b) for b in range(cfg.n_blocks)] == [8, 8, 4]
    assert SamplingConfig(max_new_tokens=20, steps=10, block_length=8).validate().steps_in_block(0) == 4


def test_with_a_threshold_the_loop_and_the_budget_count_one_step_a_position(model):
    """`steps` given with a threshold is replaced by G (validated), so that IterRef's refinement points
    and the FLOP meter see the steps the loop runs; refinement under a FLOP budget stays within it."""
    from safegen.refine.cost import Meter
    from safegen.refine.iterref import IterRef, RefineConfig

    cfg = SamplingConfig(max_new_tokens=16, steps=8, block_length=8, threshold=0.7, cache="dual").validate()
    assert cfg.steps == 16 and cfg.steps_per_block == 8
    ids, attn = prompts()
    sampler = DiffusionSampler(model, ModelProfile(mask_id=MASK), cfg)
    reward = lambda gen: -(gen == 7).sum(1).double()  # noqa: E731
    out = sampler.run(ids, attn, seeds=0, hook=IterRef(RefineConfig(budget=2.0, iterations=8, schedule="late"), reward))
    meter = Meter.of(sampler, sampler.start(ids, attn, 0))
    cap = 2.0 * meter.plain() * meter.unit  # FLOPs: twice plain sampling's (the schedule's forwards, an upper bound)
    assert float(out.proposed.sum()) > 0  # refinement ran
    assert bool((out.flops <= cap * (1 + 1e-9)).all()), (out.flops / cap).tolist()
