"""Which sampler runs by default: the command line (generate, detoxify, serve) uses Fast-dLLM's dual
cache for LLaDA models, where users want speed; the Python API keeps LLaDA's reference sampler (its
outputs equal LLaDA's own generate); the exactness flags imply the reference sampler and refuse a
cache; and every report says which sampler produced it."""
import json

import pytest

from safegen.arguments import refine_options, sampling_options
from safegen.cli import build_parser, main
from safegen.config import ConfigError

SMALL = ["--quantization", "none", "--policy", "offline", "--max-new-tokens", "8", "--steps", "8",
         "--block-length", "8", "--temperature", "1.0", "--proposals", "2", "--iterations", "1"]


def options(model, *flags):
    args = build_parser().parse_args(["detoxify", "in.txt", "-o", "out.jsonl", "--model", str(model), *flags])
    return sampling_options(args), refine_options(args)


def test_the_command_line_defaults_to_the_dual_cache_for_llada(tiny_model_dir):
    assert options(tiny_model_dir)[0]["cache"] == "dual"
    assert options(tiny_model_dir, "--cache", "none")[0]["cache"] is None
    assert options(tiny_model_dir, "--cache", "prefix")[0]["cache"] == "prefix"
    assert "cache" not in options(tiny_model_dir, "--cfg-scale", "1.5")[0]  # the cache has no CFG


@pytest.mark.parametrize("flags", [["--preset", "exact"], ["--exact"]])
def test_the_exactness_flags_run_the_reference_sampler_and_refuse_a_cache(tiny_model_dir, flags):
    sampling, refinement = options(tiny_model_dir, *flags)
    assert sampling.get("cache") is None
    if flags == ["--exact"]:
        assert refinement["adaptive"] is False
    for cache in (["--cache", "dual"], ["--fast"], ["--cache", "prefix"]):
        with pytest.raises(ConfigError, match="exact"):
            options(tiny_model_dir, *flags, *cache)


def test_mdlm_models_keep_their_own_sampler(tmp_path):
    folder = tmp_path / "mdlm"
    assert main(["tiny-model", "--family", "mdlm", str(folder)]) == 0
    sampling, _ = options(folder)
    assert sampling["sampler"] == "mdlm" and "cache" not in sampling


def test_reports_say_which_sampler(tiny_model_dir, tiny_generator_parts, tmp_path):
    from safegen import SafeGenerator

    model, tokenizer, profile = tiny_generator_parts
    gen = SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling={"max_new_tokens": 8})
    assert gen.sampling.cache is None  # the Python API: LLaDA's reference sampler
    assert gen.generate_text(["hello"], seed=0)[0].sampler == "llada"
    assert gen.generate_text(["hello"], seed=0, cache="dual", threshold=0.9)[0].sampler == "llada+dual+threshold=0.9"
    src = tmp_path / "p.txt"
    src.write_text("hello there\nthe weather\n")
    for k, (flags, sampler) in enumerate((([], "llada+dual"), (["--cache", "none"], "llada"),
                                          (["--preset", "exact"], "llada"))):
        out = tmp_path / f"out{k}.jsonl"
        assert main(["detoxify", str(src), "-o", str(out), "--model", str(tiny_model_dir), *SMALL, *flags]) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["sampler"] for r in records] == [sampler, sampler]
    from safegen.summary import format_summary, summarize

    assert format_summary(summarize(records)).splitlines()[-1].split() == ["sampler", "llada"]
    mixed = summarize(records + [dict(records[0], sampler="llada+dual")])
    assert mixed["samplers"] == {"llada": 2, "llada+dual": 1}
