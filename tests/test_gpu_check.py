"""benchmarks/gpu_check.py end to end on CPU with a small configuration (the GPU run uses LLaDA-8B's)."""
import json

import pytest
import torch

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def gpu_check():
    from benchmarks import gpu_check

    return gpu_check


def test_small_run_writes_the_json(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--small", "--out", str(out), "--prompts", "2", "--gen", "8", "--steps", "8"]) == 0
    result = json.loads(out.read_text())
    assert result["plain"]["denoiser_rows_per_sample"] == 8  # one forward row per step
    # IterRef's rows against the planner's count, computed apart from the run: one point (the end of
    # the one block, the whole answer), k = 4 pools of one proposal re-masking round(0.5 · 8) = 4
    # tokens, no scoring forward after the last step: 8 + 4 · 4 = 24, within the budget of 4 x T.
    from safegen import RefineConfig, SamplingConfig
    from safegen.research.planner import worst_case_rows

    sampling = SamplingConfig(max_new_tokens=8, steps=8, block_length=8)
    assert worst_case_rows(sampling, RefineConfig(budget=4.0)) == 24
    assert result["iterref"]["denoiser_rows_per_sample"] == 24
    assert result["G"] == 8 and result["T"] == 8 and result["batch"] == 2
    assert result["plain"]["wall_s"] > 0 and result["iterref"]["wall_s"] > 0
    fast = result["fast"]
    assert set(fast) == {"prefix", "dual", "dual+threshold0.9", "iterref_targeted_budget2",
                         "iterref_targeted_budget2+dual", "iterref_targeted_budget4", "iterref_targeted_budget4+dual"}
    # One block of 8 here: prefix and dual both run the block (8 of 8 + prompt positions) as queries.
    assert fast["dual"]["model_flops_per_sample"] <= fast["prefix"]["model_flops_per_sample"] \
        < result["plain"]["model_flops_per_sample"]
    assert fast["dual"]["denoiser_rows_per_sample"] == 8 and fast["dual"]["tokens_per_s"] > 0
    # The serving scheduler under concurrency: every request answered, tokens counted per level.
    engine = result["engine"]
    assert set(engine) == {"1", "8", "32"}
    for level, row in engine.items():
        assert row["requests"] == int(level) and row["tokens_per_s"] == pytest.approx(int(level) * 8 / row["wall_s"])
        assert 0 < row["latency_p50_s"] <= row["latency_max_s"] <= row["wall_s"]


def test_random_model_is_4bit_except_head_embedding_and_norms(gpu_check):
    import bitsandbytes as bnb
    from safegen.models.llada import LLaDAConfig

    config = LLaDAConfig(**gpu_check.SMALL)
    model = gpu_check.random_4bit_model(config, torch.device("cpu"), torch.float32)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("model.transformer.ff_out") == "Linear"
    assert len(kinds) == 7 * config.n_layers and set(kinds.values()) == {"Linear4bit"}
    assert all(m.weight.quant_state.nested for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    ids, mask = gpu_check.random_prompts(config, 3, 10)
    assert (mask.sum(1) >= 5).all() and (ids[mask == 0] == config.pad_token_id).all()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert logits.shape == (3, 10, config.embedding_size) and torch.isfinite(logits).all()
    assert logits.std() > 0.3  # random weights, yet not a constant output
