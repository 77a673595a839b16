import pytest
import torch

from safegen.sampling import rng
from safegen.models.family import ModelProfile
from safegen.sampling.factory import generate
from safegen.sampling.sampler import ConfigError, DiffusionSampler, SamplingConfig, transfer_counts

from oracles import ScriptedModel, WrappedOutput


def masks_per_call(model, P):
    return [int((c[:, P:] == model.mask_id).sum(1)[0]) for c in model.calls]


def test_transfer_counts_match_llada_formula():
    n = torch.tensor([4, 7, 10, 3])
    counts = transfer_counts(n, 3)
    assert counts.sum(1).tolist() == n.tolist()
    for row, total in zip(counts.tolist(), n.tolist()):
        assert row == [total // 3 + (s < total % 3) for s in range(3)]


def test_commits_per_step_follow_schedule():
    m = ScriptedModel()
    P = 3
    ids = torch.randint(0, 5, (2, P))
    cfg = SamplingConfig(max_new_tokens=8, steps=6, block_length=4)
    out = DiffusionSampler(m, m.mask_id, cfg).run(ids)
    before = masks_per_call(m, P)
    assert len(m.calls) == cfg.steps == 6
    # Each forward precedes one commit: 8 masks, then 2,1,1 commits in block 0 and 2,1,1 in block 1.
    assert before == [8, 6, 5, 4, 2, 1]
    assert out.rows.tolist() == [6.0, 6.0]


def test_block_discipline_prompt_untouched_no_mask_left():
    m = ScriptedModel(input_weight=1.0)
    P = 4
    ids = torch.randint(0, 5, (3, P))
    cfg = SamplingConfig(max_new_tokens=12, steps=12, block_length=4, temperature=0.7)
    out = DiffusionSampler(m, m.mask_id, cfg).run(ids, seeds=[5, 6, 7])
    for call_index, x in enumerate(m.calls):
        block = call_index // 4
        gen = x[:, P:]
        assert (gen[:, (block + 1) * 4:] == m.mask_id).all(), "committed ahead of the current block"
        assert (gen[:, : block * 4] != m.mask_id).all(), "an earlier block still has masks"
        assert torch.equal(x[:, :P], ids)
    assert torch.equal(out.sequences[:, :P], ids)
    assert not (out.sequences == m.mask_id).any()


def test_low_confidence_commits_most_probable_first():
    m = ScriptedModel(seed=3)
    P = 2
    cfg = SamplingConfig(max_new_tokens=4, steps=4, block_length=4)
    DiffusionSampler(m, m.mask_id, cfg).run(torch.zeros((1, P), dtype=torch.long))
    probs = torch.softmax(m.table[P:P + 4, :-1], -1).max(-1).values
    order = [int(((a[0, P:] == m.mask_id) & (b[0, P:] != m.mask_id)).nonzero()) for a, b in zip(m.calls, m.calls[1:])]
    assert order == torch.argsort(probs, descending=True)[:3].tolist()


def test_stop_token_cuts_output():
    m = ScriptedModel(vocab=12)
    eos, P = 3, 2
    m.table[P + 2, eos] = 50.0  # the third generated token is EOS, with high confidence
    prof = ModelProfile(mask_id=m.mask_id, eos_id=eos, pad_id=0)
    out = generate(m, torch.ones((1, P), dtype=torch.long), prof, max_new_tokens=8, steps=8, block_length=8)
    gen = out.sequences[0, P:]
    assert gen[2] == eos
    assert (gen[3:] == 0).all()


def test_eos_options():
    m = ScriptedModel(vocab=12)
    eos, eot, P = 3, 4, 2
    m.table[:, eos] = 20.0
    prof = ModelProfile(mask_id=m.mask_id, eos_id=eos, eot_id=eot, pad_id=0)
    out = generate(m, torch.ones((1, P), dtype=torch.long), prof, max_new_tokens=4, steps=4,
                   block_length=4, logits_eos_inf=True)
    assert not (out.sequences == eos).any()
    # With the confidence rule, EOS candidates wait until nothing else is left: they come last.
    m.calls.clear()
    m.table[P + 1, eos] = -50.0
    generate(m, torch.ones((1, P), dtype=torch.long), prof, max_new_tokens=4, steps=4, block_length=4,
             confidence_eos_eot_inf=True)
    first_commit = (m.calls[1][0, P:] != m.mask_id).nonzero().flatten().tolist()
    assert first_commit == [1]


def test_temperature_zero_is_deterministic_and_seeds_matter_at_positive_temperature():
    m = ScriptedModel(input_weight=1.0)
    ids = torch.randint(0, 5, (2, 3))
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=8)
    a = DiffusionSampler(m, m.mask_id, cfg).run(ids, seeds=0).sequences
    b = DiffusionSampler(m, m.mask_id, cfg).run(ids, seeds=123).sequences
    assert torch.equal(a, b)
    hot = cfg.updated(temperature=2.0)
    c = DiffusionSampler(m, m.mask_id, hot).run(ids, seeds=0).sequences
    d = DiffusionSampler(m, m.mask_id, hot).run(ids, seeds=123).sequences
    assert not torch.equal(c, d)


def _predict(logits, committable, seeds, temperature):
    """predict() on given logits for all-masked rows (the last vocabulary entry is the mask)."""
    V = logits.shape[-1]
    s = DiffusionSampler(ScriptedModel(vocab=V), V - 1, SamplingConfig(temperature=temperature))
    x_gen = torch.full(logits.shape[:2], V - 1)
    return s.predict(logits.clone(), x_gen, committable, rng.seed_keys(seeds), temperature)


def test_sampling_draws_exactly_softmax_over_temperature():
    T, rows, G = 0.7, 100, 200
    table = torch.tensor([1.0, 0.0, -1.0, 0.5, float("-inf"), 0.0, 2.0, -2.5, 0.3])  # the last is the mask
    logits = table.expand(rows, G, -1)
    picked = _predict(logits, torch.ones(rows, G, dtype=torch.bool), torch.arange(rows), T).candidates
    n = picked.numel()
    counts = torch.bincount(picked.flatten(), minlength=len(table)).double()
    expected = n * torch.softmax(table[:-1].double() / T, 0)
    assert counts[4] == 0 and counts[-1] == 0  # the -inf token and the mask are never drawn
    live = expected > 0
    # Every token's count: a z-test (binomial sd) at 4.5 sd; all together: Pearson's chi-square
    # against its 1 - 1e-5 quantile (Wilson-Hilferty, z = 4.26).
    sd = (expected * (1 - expected / n)).sqrt()
    assert ((counts[:-1] - expected).abs()[live] < 4.5 * sd[live]).all()
    df = int(live.sum()) - 1
    chi2 = float(((counts[:-1] - expected)[live] ** 2 / expected[live]).sum())
    assert chi2 < df * (1 - 2 / (9 * df) + 4.26 * (2 / (9 * df)) ** 0.5) ** 3


def test_a_positions_draw_does_not_depend_on_which_others_are_committable():
    # Proposals re-denoise a subset of positions and must see the noise the base sampler would.
    logits = torch.randn(6, 16, 30, generator=torch.Generator().manual_seed(0))
    every = torch.ones(6, 16, dtype=torch.bool)
    some = torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) < 0.3
    a = _predict(logits, every, torch.arange(6), 1.0).candidates
    b = _predict(logits, some, torch.arange(6), 1.0).candidates
    assert torch.equal(a[some], b[some])
    assert not torch.equal(a, _predict(logits, every, torch.arange(6) + 6, 1.0).candidates)


def test_cfg_doubles_the_forward_batch():
    m = ScriptedModel(input_weight=1.0)
    ids = torch.randint(0, 5, (3, 4))
    cfg = SamplingConfig(max_new_tokens=4, steps=4, block_length=4, cfg_scale=1.5)
    out = DiffusionSampler(m, m.mask_id, cfg).run(ids)
    assert all(c.shape[0] == 6 for c in m.calls)
    assert (m.calls[0][3:, :4] == m.mask_id).all()  # the unconditional half has its prompt masked
    assert out.rows.tolist() == [8.0, 8.0, 8.0]


def test_per_row_seed_independent_of_batch():
    m = ScriptedModel(input_weight=1.0)
    ids = torch.randint(0, 5, (4, 3))
    cfg = SamplingConfig(max_new_tokens=8, steps=4, block_length=4, temperature=1.0, remasking="random")
    s = DiffusionSampler(m, m.mask_id, cfg)
    full = s.run(ids, seeds=[11, 12, 13, 14]).sequences
    alone = s.run(ids[2:3], seeds=[13]).sequences
    shuffled = s.run(ids[[3, 2, 0]], seeds=[14, 13, 11]).sequences
    assert torch.equal(alone[0], full[2])
    assert torch.equal(shuffled[1], full[2]) and torch.equal(shuffled[0], full[3])


def test_accepts_output_objects_and_validates():
    m = WrappedOutput(ScriptedModel())
    out = generate(m, torch.zeros((1, 2), dtype=torch.long), 11, max_new_tokens=4, steps=2, block_length=4)
    assert out.sequences.shape == (1, 6)
    with pytest.raises(ConfigError, match=r"steps \(9\) does not fit blocks of \[4, 4, 2\].* 8 and 10"):
        SamplingConfig(max_new_tokens=10, block_length=4, steps=9).validate()
    with pytest.raises(ConfigError, match="steps"):
        SamplingConfig(max_new_tokens=8, block_length=4, steps=3).validate()
    with pytest.raises(ConfigError, match="remasking"):
        SamplingConfig(remasking="topk").validate()
    with pytest.raises(ConfigError, match="bogus"):
        SamplingConfig().updated(bogus=1)
    with pytest.raises(ValueError, match="mask token"):
        generate(m, torch.full((1, 2), 11), 11, max_new_tokens=4, steps=2, block_length=4)
    with pytest.raises(ValueError, match="seeds"):
        generate(m, torch.zeros((2, 2), dtype=torch.long), 11, seeds=[1], max_new_tokens=4, steps=2,
                 block_length=4)


def test_shifted_logits_profile():
    m = ScriptedModel()
    P = 2
    prof = ModelProfile(mask_id=m.mask_id, shift_logits=True)
    out = generate(m, torch.zeros((1, P), dtype=torch.long), prof, max_new_tokens=4, steps=4, block_length=4)
    # Position i takes the argmax of row i-1 of the table (Dream-style shift).
    expected = m.table[P - 1:P + 3, :-1].argmax(-1)
    assert torch.equal(out.sequences[0, P:], expected)


def test_padding_columns_of_the_head_are_never_proposed():
    m = ScriptedModel(vocab=12)
    m.table[:, 8:11] = 30.0  # the head's padding columns (ids 8..10) look best
    prof = ModelProfile(mask_id=m.mask_id, vocab_size=8)
    for temperature in (0.0, 1.0):
        out = generate(m, torch.zeros((4, 2), dtype=torch.long), prof, max_new_tokens=4, steps=4,
                       block_length=4, temperature=temperature)
        assert (out.sequences < 8).all()
