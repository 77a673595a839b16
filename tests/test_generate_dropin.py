"""SafeGenerator.generate as a drop-in for transformers' model.generate."""
import pytest
import torch

from safegen.generator import SafeGenerator, fit_lengths, left_padded
from safegen.sampling.sampler import SamplingConfig

REFINE = dict(n_proposals=2, iterations=1, schedule="final", adaptive=False)


@pytest.fixture(scope="module")
def default_generator(tiny_generator_parts):
    """Constructed with the default sampling settings (128 tokens, 128 steps, blocks of 32)."""
    model, tokenizer, profile = tiny_generator_parts
    return SafeGenerator(model, tokenizer, policy="offline", profile=profile, refinement=REFINE)


@pytest.fixture(scope="module")
def batch(default_generator):
    return default_generator.encode_prompts(["Go away, you", "On this late November afternoon, we"])[:2]


def test_max_new_tokens_alone_fits_steps_and_blocks(default_generator, batch):
    ids, attn = batch
    out = default_generator.generate(ids, attention_mask=attn, max_new_tokens=16, refine=False)
    assert out.shape == (2, ids.shape[1] + 16)
    sampling, _, _ = default_generator.resolve(max_new_tokens=64)  # the class docstring's own example
    assert (sampling.max_new_tokens, sampling.steps, sampling.block_length) == (64, 64, 32)
    assert fit_lengths(SamplingConfig(), {"max_new_tokens": 48}) == \
        {"max_new_tokens": 48, "block_length": 32, "steps": 48}  # blocks of 32 and 16
    # Half a commit per step configured: kept when G changes; a set value is never overridden.
    half = SamplingConfig(max_new_tokens=64, steps=32, block_length=32)
    assert fit_lengths(half, {"max_new_tokens": 16}) == {"max_new_tokens": 16, "block_length": 16, "steps": 8}
    assert fit_lengths(half, {"max_new_tokens": 16, "steps": 4})["steps"] == 4


def test_transformers_keywords_are_honoured(default_generator, batch):
    ids, attn = batch
    g = default_generator
    P = ids.shape[1]
    common = dict(attention_mask=attn, max_new_tokens=8, refine=False)
    # max_length is the prompt plus the generation.
    assert torch.equal(g.generate(ids, max_length=P + 8, attention_mask=attn, refine=False, seed=3),
                       g.generate(ids, seed=3, **common))
    # do_sample: False is greedy (the seed does not matter); True samples (at temperature 1).
    assert torch.equal(g.generate(ids, do_sample=False, seed=1, **common), g.generate(ids, do_sample=False, seed=2, **common))
    assert torch.equal(g.generate(ids, do_sample=True, seed=1, **common),
                       g.generate(ids, temperature=1.0, seed=1, **common))
    # num_return_sequences: n rows per prompt, each with its own seed, as if the prompts were repeated.
    many = g.generate(ids, num_return_sequences=2, do_sample=True, seed=5, **common)
    repeated = g.generate(ids.repeat_interleave(2, 0), attention_mask=attn.repeat_interleave(2, 0), max_new_tokens=8,
                          refine=False, do_sample=True, seed=5)
    assert many.shape[0] == 4 and torch.equal(many, repeated)
    # eos_token_id ends the answer at the first such token; pad_token_id fills what follows.
    plain = g.generate(ids, temperature=1.0, seed=7, **common)
    stop = int(plain[0, P + 2])
    pad = g.tokenizer.convert_tokens_to_ids("the")
    cut = g.generate(ids, temperature=1.0, seed=7, eos_token_id=stop, pad_token_id=pad, **common)
    first = int((plain[0, P:] == stop).nonzero()[0, 0])
    assert torch.equal(cut[0, P:P + first + 1], plain[0, P:P + first + 1])
    assert (cut[0, P + first + 1:] == pad).all() and first + 1 < 8


def test_keywords_without_meaning_are_refused_with_the_reason(default_generator, batch):
    ids, attn = batch
    with pytest.raises(TypeError, match="min_p.*truncated only by top_k and top_p"):
        default_generator.generate(ids, attention_mask=attn, max_new_tokens=8, min_p=0.05)
    with pytest.raises(TypeError, match="num_beams.*beam search"):
        default_generator.generate(ids, attention_mask=attn, max_new_tokens=8, num_beams=4)
    with pytest.raises(ValueError, match="identical"):
        default_generator.generate(ids, attention_mask=attn, max_new_tokens=8, num_return_sequences=2)
    with pytest.raises(TypeError, match="unknown argument.*max_lenght"):
        default_generator.generate(ids, attention_mask=attn, max_lenght=8)


def test_right_padded_batch_gives_the_left_padded_output(default_generator, batch):
    ids, attn = batch
    assert attn[0].sum() < attn.shape[1]  # the first prompt is shorter: padded
    pad = default_generator.profile.pad_id
    lengths = attn.sum(1)
    right = torch.full_like(ids, pad)
    right_mask = torch.zeros_like(attn)
    for i, n in enumerate(lengths.tolist()):
        right[i, :n] = ids[i, attn[i].bool()]
        right_mask[i, :n] = 1
    assert torch.equal(left_padded(right, right_mask, pad)[0], ids)
    kwargs = dict(max_new_tokens=8, temperature=1.0, seed=2)
    assert torch.equal(default_generator.generate(right, attention_mask=right_mask, **kwargs),
                       default_generator.generate(ids, attention_mask=attn, **kwargs))


def test_no_prompts_give_no_reports(default_generator):
    assert default_generator.generate_text([], max_new_tokens=8) == []
    with pytest.raises(TypeError, match="typical_p"):
        default_generator.generate_text([], typical_p=0.9)


def test_truncation_warning_names_the_label(default_generator, caplog):
    default_generator.encode_prompts(["short", "the " * 300], max_prompt_tokens=20,
                                     labels=["p.txt:1", "p.txt:10"])
    assert "p.txt:10 has" in caplog.text and "p.txt:1 has" not in caplog.text
