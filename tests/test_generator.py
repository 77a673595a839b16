import pytest
import torch

from safegen.generator import SafeGenerator
from safegen.sampling.sampler import ConfigError, DiffusionSampler, SamplingConfig

SAMPLING = dict(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)


@pytest.fixture(scope="module")
def generator(tiny_generator_parts):
    model, tokenizer, profile = tiny_generator_parts
    return SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=SAMPLING,
                         refinement=dict(n_proposals=2, iterations=2, rho=0.25, schedule="final", adaptive=False))


def prompts(generator, texts):
    return generator.encode_prompts(texts)


def test_drop_in_generate_contract(generator):
    ids, attn, _ = prompts(generator, ["Go away, you", "On this late November afternoon, we"])
    out = generator.generate(ids, attention_mask=attn, seed=3)
    assert out.dtype == torch.long and out.shape == (2, ids.shape[1] + 8)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # prompt prefix, left padding included
    assert not (out == generator.profile.mask_id).any()
    # Padded after the first stop token.
    stops = torch.tensor(generator.profile.stop_ids)
    for row in out[:, ids.shape[1]:]:
        hit = torch.isin(row, stops).nonzero()
        if len(hit):
            assert (row[hit[0, 0] + 1:] == generator.profile.pad_id).all()


def test_refinement_off_is_plain_sampling(generator):
    ids, attn, _ = prompts(generator, ["Go away, you", "Hello"])
    out = generator.generate(ids, attention_mask=attn, seed=5, refine=False)
    plain = DiffusionSampler(generator.model, generator.profile, SamplingConfig(**SAMPLING)).run(ids, attn, [5, 6])
    assert torch.equal(out, plain.sequences)
    res = generator.generate(ids, attention_mask=attn, seed=5, refine=False, return_dict_in_generate=True)
    for r in res.reports:
        assert r.text_before == r.text_after and r.rows == 8 and r.rows_before == 0 and not r.refined


def test_reports_consistent_with_accounting(generator):
    ids, attn, _ = prompts(generator, ["Go suck a", "The weather"])
    res = generator.generate(ids, attention_mask=attn, seed=0, return_dict_in_generate=True)
    plain = generator.generate(ids, attention_mask=attn, seed=0, refine=False)
    for i, r in enumerate(res.reports):
        # "Before" is plain sampling for the same prompt and seed.
        assert r.text_before == generator.policy.reward_fn(generator.tokenizer, generator.profile.stop_ids) \
            .decode(plain[i:i + 1, ids.shape[1]:])[0]
        # final schedule, k=2, N=2, rho=0.25 of 8 -> m=2 one-token sub-steps, no scoring forward at the end.
        assert r.rows <= 8 + 2 * 2 * 2 and r.rows > 8
        assert r.rows_before == 0  # the fork happens after the last step: plain costs nothing extra
        assert r.reward_calls >= 1 + 2
        assert 0 <= (r.acceptance_rate or 0) <= 1
        # The verdicts are the policy's on each text, scored alone (the generator scores them in one batch).
        for text, scores, toxic in ((r.text_after, r.toxicity_after, r.toxic_after),
                                    (r.text_before, r.toxicity_before, r.toxic_before)):
            alone = generator.policy.score([text])
            assert toxic == bool(alone.toxic[0]) and scores == alone.row(0)
        assert r.seed == i


def test_kwargs_override_and_unknown_kwargs(generator):
    ids, attn, _ = prompts(generator, ["Hi"])
    out = generator.generate(ids, attention_mask=attn, max_new_tokens=4, steps=4, block_length=4)
    assert out.shape[1] == ids.shape[1] + 4
    with pytest.raises(TypeError, match="max_length_typo"):
        generator.generate(ids, max_length_typo=3)
    with pytest.raises(ConfigError, match="refine.rho"):
        generator.generate(ids, rho=2.0)
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=4, do_sample=False, temperature=0.7)
    a = generator.generate(ids, attention_mask=attn, generation_config=gc, steps=4, block_length=4, refine=False, seed=1)
    b = generator.generate(ids, attention_mask=attn, generation_config=gc, steps=4, block_length=4, refine=False, seed=2)
    assert torch.equal(a, b)  # do_sample=False: greedy, so the seed does not matter


def test_on_toxic_actions(tiny_generator_parts):
    from safegen.policy import load_policy
    model, tokenizer, profile = tiny_generator_parts
    policy = load_policy("offline")
    policy.threshold = 0.0  # everything is "toxic": the action must fire
    policy.on_toxic = "refuse"
    g = SafeGenerator(model, tokenizer, policy=policy, profile=profile, sampling=SAMPLING,
                      refinement=dict(n_proposals=2, iterations=1, schedule="final"))
    ids, attn, _ = g.encode_prompts(["Hello there"])
    res = g.generate(ids, attention_mask=attn, return_dict_in_generate=True)
    assert res.reports[0].action == "refuse" and res.reports[0].text == policy.refusal_text
    decoded = g.tokenizer.decode(res.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert decoded.split()[:2] == g.tokenizer.decode(g.tokenizer(policy.refusal_text, add_special_tokens=False)["input_ids"]).split()[:2]
    policy.on_toxic = "best"
    r = g.generate_text("Hello there", seed=0)[0]
    assert r.action == "best"
    assert r.text == (r.text_before if r.toxicity_before["aggregate"] < r.toxicity_after["aggregate"] else r.text_after)
    # "best" picks between the texts before and after: without the one before it is an error, not a silent "flag".
    with pytest.raises(ConfigError, match="on_toxic: best.*report_before"):
        g.generate_text("Hello there", seed=0, report_before=False)
    assert g.generate_text("Hello there", seed=0, report_before=False, refine=False)[0].action == "best"


def test_generate_text_applies_chat_template(generator):
    reports = generator.generate_text(["you are a", [{"role": "user", "content": "tell me"}]], seed=0)
    assert len(reports) == 2 and reports[0].prompt == "you are a" and reports[1].prompt == "tell me"
    ids, _, _ = generator.encode_prompts(["you are a"])
    text = generator.tokenizer.decode(ids[0])
    assert "<|start_header_id|>" in text and text.rstrip().endswith("<|end_header_id|>")


def test_sampler_left_padding_invariance(tiny_generator_parts):
    """A short prompt gives the same generation alone and left-padded in a batch with a long one."""
    model, tokenizer, profile = tiny_generator_parts
    g = SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=SAMPLING)
    ids, attn, _ = g.encode_prompts(["the cat", "people think that we are just a bunch of idiots who run around"])
    assert attn[0].sum() < attn.shape[1]  # the first row is padded
    cfg = SamplingConfig(**SAMPLING)
    sampler = DiffusionSampler(model, profile, cfg)
    batch = sampler.run(ids, attn, seeds=[4, 5])
    short = ids[0:1, attn[0].bool()]
    alone = sampler.run(short, None, seeds=[4])
    P = ids.shape[1]
    assert torch.equal(batch.sequences[0, P:], alone.sequences[0, short.shape[1]:])
    # The logits themselves agree within float32 tolerance.
    with torch.inference_mode():
        x_pad = batch.sequences[0:1]
        x_alone = alone.sequences[0:1]
        a = model(input_ids=x_pad, attention_mask=torch.cat([attn[0:1], torch.ones(1, 8, dtype=torch.long)], 1)).logits
        b = model(input_ids=x_alone).logits
    assert torch.allclose(a[0, P:], b[0, short.shape[1]:], atol=1e-4)
