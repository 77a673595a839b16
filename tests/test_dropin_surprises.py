"""generate()'s transformers spellings agree: temperature in a keyword, a dict and a GenerationConfig;
eos_token_id lists of any length that add to the model's stop tokens; generation lengths whose blocks
keep the configured length."""
import dataclasses

import pytest
import torch
from transformers import GenerationConfig

from safegen.generator import SafeGenerator

REFINE = dict(n_proposals=2, iterations=1, schedule="final", adaptive=False)


@pytest.fixture(scope="module")
def gen(tiny_generator_parts):
    model, tokenizer, profile = tiny_generator_parts
    return SafeGenerator(model, tokenizer, policy="offline", profile=profile, refinement=REFINE)


@pytest.fixture(scope="module")
def batch(gen):
    return gen.encode_prompts(["Go away, you", "On this late November afternoon, we"])[:2]


def temperature(gen, generation_config=None, **kwargs):
    return gen.resolve(generation_config, **kwargs)[0].temperature


@pytest.mark.parametrize("spelling", ["keyword", "dict", "GenerationConfig"])
def test_one_temperature_rule_for_every_spelling(gen, spelling):
    def resolved(**options):
        if spelling == "keyword":
            return temperature(gen, **options)
        if spelling == "dict":
            return temperature(gen, dict(options))
        return temperature(gen, GenerationConfig(**options))

    assert resolved(temperature=0.7) == 0.7  # a temperature alone samples at it
    assert resolved(do_sample=False, temperature=0.7) == 0.0  # a stated do_sample=False is greedy
    assert resolved(do_sample=True, temperature=0.7) == 0.7
    assert resolved(do_sample=True) == 1.0  # sampling at transformers' default temperature
    assert resolved(temperature=0.0) == 0.0


def test_a_keyword_do_sample_overrides_the_generation_configs_temperature(gen):
    assert temperature(gen, GenerationConfig(temperature=0.7), do_sample=False) == 0.0
    # The config's stated do_sample=False stays stated under a keyword temperature, as in transformers.
    assert temperature(gen, {"do_sample": False}, temperature=0.5) == 0.0


def test_eos_token_id_takes_any_list_and_keeps_the_models_stop_tokens(gen):
    own = set(gen.profile.stop_ids)
    assert len(own) == 2  # the tiny model's EOS and EOT
    one = gen._call_profile({"eos_token_id": 7})
    assert set(one.stop_ids) == own | {7}
    many = gen._call_profile({"eos_token_id": [7, 8, 9, 10]})
    assert set(many.stop_ids) == own | {7, 8, 9, 10}
    assert set(gen._call_profile({"eos_token_id": torch.tensor([7, 8])}).stop_ids) == own | {7, 8}
    for bad in ([], [7, "8"], [True], -1, 1.5):
        with pytest.raises(ValueError, match="eos_token_id"):
            gen._call_profile({"eos_token_id": bad})


def test_eos_token_id_list_cuts_at_the_first_of_its_ids(gen, batch):
    ids, attn = batch
    P = ids.shape[1]
    common = dict(attention_mask=attn, max_new_tokens=16, refine=False, temperature=1.0, seed=7)
    plain = gen.generate(ids, **common)
    stop = set(gen.profile.stop_ids)
    answer = [t for t in plain[0, P:].tolist() if t not in stop]
    picks = answer[2:5]  # three ids of the answer, none a stop token of the model
    cut = gen.generate(ids, eos_token_id=picks, **common)
    first = min(i for i, t in enumerate(plain[0, P:].tolist()) if t in set(picks) | stop)
    assert torch.equal(cut[0, :P + first + 1], plain[0, :P + first + 1])
    pad = gen.profile.pad_id
    assert (cut[0, P + first + 1:] == pad).all()


def test_replacing_the_stop_tokens_is_explicit(tiny_generator_parts):
    model, tokenizer, profile = tiny_generator_parts
    only = dataclasses.replace(profile, eos_id=7, eot_id=None)
    g = SafeGenerator(model, tokenizer, policy="offline", profile=only, refinement=REFINE)
    assert set(g.profile.stop_ids) == {7}
    assert set(g._call_profile({"eos_token_id": [8]}).stop_ids) == {7, 8}
