"""The fast settings through SafeGenerator: keywords of generate(), FLOPs in the reports."""
import pytest

from safegen.generator import SafeGenerator

SAMPLING = dict(max_new_tokens=16, steps=16, block_length=4, temperature=1.0)


@pytest.fixture(scope="module")
def generator(tiny_generator_parts):
    model, tokenizer, profile = tiny_generator_parts
    return SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=SAMPLING,
                         refinement=dict(n_proposals=1, iterations=1, rho=0.25, schedule="final", adaptive=False))


def test_reports_count_flops_and_the_dual_cache_spends_fewer(generator):
    ids, attn, _ = generator.encode_prompts(["Go away, you", "On this late November afternoon, we"])
    plain = generator.generate(ids, attention_mask=attn, seed=3, refine=False, return_dict_in_generate=True)
    fast = generator.generate(ids, attention_mask=attn, seed=3, refine=False, cache="dual", threshold=0.9,
                              return_dict_in_generate=True)
    for p, f in zip(plain.reports, fast.reports):
        assert p.rows == 16 and p.flops > 0
        assert f.rows <= 16 and f.flops < p.flops / 2
    refined = generator.generate(ids, attention_mask=attn, seed=3, cache="dual", return_dict_in_generate=True)
    for r in refined.reports:  # IterRef's proposals and the "before" branch are counted too
        assert r.flops > 0 and r.flops_before >= 0
