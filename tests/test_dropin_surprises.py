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


# ------------------------------------------------------------------ generation lengths and blocks
def blocks(sampling):
    return sampling.block_lengths, [sampling.steps_in_block(b) for b in range(sampling.n_blocks)]


@pytest.mark.parametrize("options, prompt_length, expected", [
    ({"max_new_tokens": 127}, None, ([32, 32, 32, 31], [32, 32, 32, 31])),
    ({"max_new_tokens": 118}, None, ([32, 32, 32, 22], [32, 32, 32, 22])),
    ({"max_length": 40}, 9, ([31], [31])),  # G = 31 is shorter than a block: one block of 31
    ({"max_new_tokens": 127, "steps": 64}, None, ([32, 32, 32, 31], [16, 16, 16, 16])),
    ({"max_new_tokens": 118, "steps": 59}, None, ([32, 32, 32, 22], [16, 16, 16, 11])),
])
def test_awkward_lengths_keep_the_block_length_and_the_tokens_per_step(gen, options, prompt_length, expected):
    sampling = gen.resolve(prompt_length=prompt_length, **options)[0]
    assert blocks(sampling) == expected
    assert sampling.steps == sum(expected[1])


def test_steps_that_fit_no_block_split_are_refused_with_the_nearest():
    from safegen.sampling.sampler import ConfigError, SamplingConfig

    with pytest.raises(ConfigError, match=r"sampling.steps \(101\) does not fit .* 100 and 104"):
        SamplingConfig(max_new_tokens=127, steps=101, block_length=32).validate()


def test_refinement_points_stay_at_block_ends_and_late_in_each_block():
    from safegen.refine import cost
    from safegen.research import planner
    from safegen.refine.iterref import RefineConfig
    from safegen.sampling.sampler import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=127, steps=127, block_length=32)
    final = RefineConfig(schedule="final")
    assert cost.refinement_points(sampling, final.applies) == [32, 64, 96, 127]
    late = cost.refinement_points(sampling, RefineConfig(schedule="late", start=0.9).applies)
    # steps >= 0.9·32 (29..32) of full blocks and >= 0.9·31 (28..31) of the last one
    assert late == [t for b in range(3) for t in range(32 * b + 29, 32 * b + 33)] + list(range(96 + 28, 128))
    assert planner.candidate_point_sets(sampling, "final") == [(32, 64, 96, 127)]


class Recorder:
    """A hook that records (block, step, steps in block, t, decoded in block, decoded so far)."""

    def __init__(self):
        self.seen = []

    def applies(self, block, step, steps_in_block, t):
        return step >= 1

    def __call__(self, sampler, state):
        sl = sampler.block_slice(state.block)
        decoded = state.gen[0] != sampler.mask_id
        self.seen.append((state.block, state.step, sampler.global_step(state), int(decoded[sl].sum()),
                          int(decoded[:sl.stop].sum()), int(decoded.sum())))


@pytest.mark.parametrize("G, T, bl", [(14, 7, 4), (10, 10, 4), (13, 13, 5)])
def test_sampler_commits_blocks_as_the_cost_model_predicts(G, T, bl):
    from oracles import ScriptedModel

    from safegen.refine import cost
    from safegen.research import planner
    from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

    sampling = SamplingConfig(max_new_tokens=G, steps=T, block_length=bl, temperature=1.0)
    m, hook = ScriptedModel(), Recorder()
    out = DiffusionSampler(m, m.mask_id, sampling).run(torch.randint(0, 5, (1, 2)), hook=hook)
    assert [t for _, _, t, *_ in hook.seen] == list(range(1, T + 1))
    assert float(out.rows[0]) == cost.plain_rows(sampling) == T  # one forward a step
    for block, step, t, in_block, so_far, total in hook.seen:
        assert so_far == total  # nothing committed beyond the current block
        assert planner.decoded_at(sampling, t, "all") == so_far, t
        if t < T:
            assert planner.decoded_at(sampling, t, "block") == in_block, t
    ends = [t for block, step, t, in_block, *_ in hook.seen if in_block == sampling.block_lengths[block]
            and step == sampling.steps_in_block(block)]
    assert ends == [sum(sampling.steps_in_block(b) for b in range(i + 1)) for i in range(sampling.n_blocks)]


@pytest.mark.parametrize("G, T, bl, rc", [
    (14, 7, 4, dict(rho=1.0, schedule="evenly")),
    (10, 10, 4, dict(n_proposals=2, rho=0.3, schedule="late", start=0.5, scope="all")),
    (13, 13, 5, dict(rho=0.5, schedule="final")),
])
def test_predicted_rows_equal_the_rows_the_model_runs_with_a_short_last_block(G, T, bl, rc):
    from oracles import ScriptedModel

    from safegen.research import planner
    from safegen.refine.iterref import IterRef, RefineConfig
    from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

    sampling = SamplingConfig(max_new_tokens=G, steps=T, block_length=bl, temperature=1.0)
    refine = RefineConfig(iterations=2, selection="remask_only", budget=None, **rc)
    m = ScriptedModel(input_weight=1.0)
    hook = IterRef(refine, lambda ids: -(ids == 0).sum(1).double())
    DiffusionSampler(m, m.mask_id, sampling).run(torch.randint(0, 5, (2, 2)), seeds=0, hook=hook)
    assert sum(c.shape[0] for c in m.calls) / 2 == planner.worst_case_rows(sampling, refine)


def test_refinement_is_exact_with_a_shorter_last_block():
    """The exact toy (V = 3, L = 4) in blocks of 3 and 1: IterRef still reaches p* ∝ p0·exp(r/α)."""
    from safegen.research import toy
    from safegen.refine.iterref import IterRef, RefineConfig
    from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

    V, L, alpha, n = 3, 4, 0.5, 3000
    p0 = toy.random_distribution(V, L, seed=1, sharpness=1.0)
    reward = toy.toxic_count_reward(V, L, toxic=[0])
    p_star = toy.target(p0, reward.values, alpha)
    sampling = SamplingConfig(max_new_tokens=L, steps=L, block_length=3, temperature=1.0)
    assert blocks(sampling) == ([3, 1], [3, 1])
    hook = IterRef(RefineConfig(iterations=24, alpha=alpha), reward)
    out = DiffusionSampler(toy.TableDenoiser(p0, V, L), V, sampling).run(
        torch.empty((n, 0), dtype=torch.long), seeds=0, hook=hook)
    tv, z = toy.tv_distance(out.sequences, p_star, V), toy.mean_z(reward(out.sequences), reward.values, p_star)
    assert tv < toy.expected_tv_noise(p_star, n) + 0.02 and abs(z) < 3, (tv, z)
