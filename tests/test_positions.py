"""Rotary positions start at each row's first real token, so a row's logits and its greedy output do not
depend on how much left padding its neighbours' longer prompts put before it, in bf16 too."""
import pytest
import torch

from safegen.models.llada import rotary_angles
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

SHORT, LONG = 5, 29  # prompt lengths: the short prompt gets 24 pads when batched with the long one


@pytest.fixture(scope="module")
def models(tiny_generator_parts):
    model, _, profile = tiny_generator_parts
    bf16 = type(model)(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    return {"fp32": model.eval(), "bf16": bf16.to(torch.bfloat16)}, profile


def prompts(profile, vocab=200):
    g = torch.Generator().manual_seed(3)
    short = torch.randint(10, vocab, (SHORT,), generator=g)
    long = torch.randint(10, vocab, (LONG,), generator=g)
    pad = profile.pad_id
    ids = torch.full((2, LONG), pad, dtype=torch.long)
    mask = torch.zeros((2, LONG), dtype=torch.long)
    ids[0, LONG - SHORT:], mask[0, LONG - SHORT:] = short, 1
    ids[1], mask[1] = long, 1
    return short[None], ids, mask


def greedy(model, profile, ids, mask=None):
    cfg = SamplingConfig(max_new_tokens=32, steps=32, block_length=32, temperature=0.0)
    out = DiffusionSampler(model, profile, cfg).run(ids, mask, seeds=0).sequences
    return out[:, ids.shape[1]:]


def test_greedy_output_alone_equals_batched_with_a_longer_prompt(models):
    by_dtype, profile = models
    short, ids, mask = prompts(profile)
    alone = greedy(by_dtype["bf16"], profile, short)
    batched = greedy(by_dtype["bf16"], profile, ids, mask)
    assert torch.equal(alone[0], batched[0]), f"{int((alone[0] != batched[0]).sum())} of 32 tokens differ"


def test_safe_generator_passes_the_padding_to_the_model(models, tiny_generator_parts):
    """generate_text pads a batch on the left and hands the mask on: in bf16, greedy, a prompt's text
    alone and beside a longer prompt is the same."""
    from safegen.generator import SafeGenerator

    by_dtype, profile = models
    g = SafeGenerator(by_dtype["bf16"], tiny_generator_parts[1], policy="offline", profile=profile)
    short, long = "you are", "on this late november afternoon , we walked along the river and talked about"
    options = dict(max_new_tokens=16, temperature=0.0, refine=False)
    alone = g.generate_text([short], **options)[0].text
    assert g.generate_text([short, long], **options)[0].text == alone


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_padded_rows_logits_equal_its_logits_alone(models, dtype):
    """Bit for bit: the short prompt plus 32 masks, alone and after 24 pads beside a longer row."""
    by_dtype, profile = models
    model = by_dtype[dtype]
    short, ids, mask = prompts(profile)
    gen = torch.full((1, 32), profile.mask_id)
    alone_ids = torch.cat([short, gen], 1)
    ids = torch.cat([ids, gen.expand(2, -1)], 1)
    mask = torch.cat([mask, torch.ones((2, 32), dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(alone_ids).logits[0]
        batched = model(ids, attention_mask=mask).logits[0, LONG - SHORT:]
    assert (alone.float() - batched.float()).abs().max().item() == 0.0


def test_unpadded_rows_keep_llada_absolute_positions(models):
    """Without padding, positions are 0..L-1, as in LLaDA's own code: the logits equal a forward that
    applies absolute positions block by block."""
    by_dtype, profile = models
    model = by_dtype["fp32"]
    _, ids, _ = prompts(profile)
    t = model.model.transformer
    cos, sin = rotary_angles(ids.shape[1], model.config.head_dim, model.config.rope_theta, "cpu")
    with torch.no_grad():
        x = t.wte(ids)
        for block in t.blocks:
            x = block(x, cos, sin, None)
        reference = t.ff_out(t.ln_f(x))
        assert torch.equal(model(ids).logits, reference)
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, reference)
