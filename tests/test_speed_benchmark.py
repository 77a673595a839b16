"""benchmarks/speed.py --quick: its JSON and the FLOP ratios it reads from the sampler's counts."""
import json

import pytest

from safegen.models.flops import forward_flops


def test_quick_run_writes_one_object_per_setting(tmp_path):
    from benchmarks import speed

    out = tmp_path / "speed.json"
    speed.main(["--quick", "--json", str(out)])
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    for name in ("plain", "prefix", "dual", "dual+threshold0.9", "iterref_targeted_budget2",
                 "iterref_targeted_budget2+dual", "iterref_targeted_budget4", "iterref_targeted_budget4+dual"):
        r = rows[name]
        assert r["flops_per_sample"] > 0 and r["rows_per_sample"] > 0 and r["seconds_per_sample"] > 0
    assert rows["plain"]["rows_per_sample"] == rows["dual"]["rows_per_sample"] == 16  # one forward a step
    # G = 16 in blocks of 4 after a 4-token prompt: dual runs 4 refreshes of 20 positions (the head on
    # the 16 generated) and 12 steps of 4 queries against 20 keys, where plain runs 16 forwards of 20.
    d = speed.LLADA_8B
    full = lambda q, h: forward_flops(d, q, q * 20, h)  # noqa: E731
    assert rows["dual"]["flops_ratio_to_plain"] == pytest.approx(16 * full(20, 20) / (4 * full(20, 16) + 12 * full(4, 4)))
    assert rows["dual"]["flops_ratio_to_plain"] > rows["prefix"]["flops_ratio_to_plain"] > 1.3
    for b in ("2", "4"):
        cached, plain = rows[f"iterref_targeted_budget{b}+dual"], rows[f"iterref_targeted_budget{b}"]
        # Budgets are in FLOPs, x plain sampling in the same settings: each within its own cap.
        assert plain["flops_per_sample"] <= float(b) * rows["plain"]["flops_per_sample"] * (1 + 1e-12)
        assert cached["flops_per_sample"] <= float(b) * rows["dual"]["flops_per_sample"] * (1 + 1e-12)
        assert cached["flops_per_sample"] < 0.75 * plain["flops_per_sample"]  # at G = 16; less at 256
        # At the uncached run's FLOPs, the cache buys more proposals, within the same cap.
        equal = rows[f"iterref_targeted_budget{b}+dual_equal_flops"]
        assert equal["flops_per_sample"] <= float(b) * rows["plain"]["flops_per_sample"] * (1 + 1e-12)
        assert equal["proposed_per_sample"] > plain["proposed_per_sample"]
    toys = {k: v for k, v in rows.items() if k.startswith("toy_")}
    assert toys["toy_peaked_threshold0.5"]["forwards_per_sample"] < toys["toy_peaked_thresholdNone"]["forwards_per_sample"]
    assert toys["toy_flat_threshold0.9"]["forwards_per_sample"] == toys["toy_flat_thresholdNone"]["forwards_per_sample"]


def test_cpu_shape_quick_counts_the_run_model_and_its_rates(tmp_path):
    """--shape cpu (tiny under --quick): the five settings, FLOPs of the model that ran for the forwards
    that ran, the achieved rate against plain's, and --plain-blocks' scaling of uncached plain."""
    from benchmarks import speed
    from safegen.models.flops import dims_of

    out, part = tmp_path / "cpu.json", tmp_path / "cpu-part.json"
    speed.main(["--quick", "--shape", "cpu", "--json", str(out)])
    speed.main(["--quick", "--shape", "cpu", "--plain-blocks", "2", "--json", str(part)])
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    assert list(rows) == list(speed.CPU_SETTINGS)  # no toys, no other settings
    d = dims_of(speed.build_model(64, 2, 128))  # what --quick --shape cpu runs
    full = lambda q, h: forward_flops(d, q, q * 20, h)  # noqa: E731
    # G = 16 in blocks of 4 after a 4-token prompt, 2 prompts: the run model's FLOPs, not LLaDA-8B's.
    assert rows["plain"]["flops_per_sample"] == pytest.approx(16 * full(20, 20))
    assert rows["dual"]["flops_per_sample"] == pytest.approx(4 * full(20, 16) + 12 * full(4, 4))
    for r in rows.values():
        assert r["logged_flops_per_sample"] == pytest.approx(r["flops_per_sample"])  # the log sees every forward
        assert r["gflops_per_second"] == pytest.approx(r["flops_per_sample"] / r["seconds_per_sample"] / 1e9)
        assert r["rate_ratio_to_plain"] == pytest.approx(r["gflops_per_second"] / rows["plain"]["gflops_per_second"])
        assert 0 < r["forward_seconds_per_sample"] <= r["seconds_per_sample"]
        assert r["model_gflops_per_second"] >= r["gflops_per_second"]  # the model's calls are part of the time
        assert r["shape"]["flops_counted_for"] == "run model" and r["shape"]["samples"] == 2
        for key in ("b1_4bit", "b1_bf16", "b16_4bit", "b16_bf16"):
            assert r["roofline"][key]["seconds_per_sample"] > 0 and r["roofline"][key]["bound"] in ("compute", "memory")
    assert rows["iterref_targeted_budget4+dual"]["proposed_per_sample"] > 0
    # Uncached plain's 4 blocks make the same forwards: 2 of them, scaled by 2, count what 4 did.
    p = next(r for r in json.loads(part.read_text()) if r["setting"] == "plain")
    assert p["measured_blocks"] == 2 and p["flops_per_sample"] == rows["plain"]["flops_per_sample"]
    assert p["rows_per_sample"] == 16 and p["roofline"]["b16_bf16"] == rows["plain"]["roofline"]["b16_bf16"]
    # The roofline of dual, per sample, from its forwards: 4 prefills of 20 positions (head on 16) and 12
    # steps of 4 queries against 20 keys, 16 of them cached; at batch 16 each forward serves 16 samples.
    r8 = lambda f, b: speed.roofline_forward(speed.LLADA_8B, f, b, speed.weight_bytes_read(  # noqa: E731
        speed.LLaDAConfig())["bf16"], 0)["seconds"]
    pre, step = speed.Forward("prefill", 20, 20, 16, 0), speed.Forward("queries", 4, 20, 4, 16)
    for b in (1, 16):
        want = (4 * r8(pre, b) + 12 * r8(step, b)) / b
        assert rows["dual"]["roofline"][f"b{b}_bf16"]["seconds_per_sample"] == pytest.approx(want)


def test_roofline_arithmetic_by_hand():
    """LLaDA-8B on the H100's paper figures (989e12 FLOP/s, 3.35e12 B/s): a dual step of 32 queries
    against 320 keys, 288 of them cached, at batch 1 and 16."""
    from benchmarks import speed

    w = speed.weight_bytes_read(speed.LLaDAConfig())
    # bf16: the 8,015,581,184 parameters but the 517,996,544 of the embedding, 2 bytes each.
    assert w["bf16"] == (8_015_581_184 - 517_996_544) * 2 == 14_995_169_280
    # 4-bit: 32 layers of 4 linears of 4096² and 3 of 4096·12288 (6,979,321,856 weights) at half a byte,
    # a byte a block of 64, 4 bytes per 256 blocks and 4 per linear (3,461,148 a layer); the head and
    # the 32·2 + 1 norms of 4096 in bf16.
    assert w["head"] == 126464 * 4096 * 2 == 1_035_993_088
    assert w["4bit"] == 6_979_321_856 // 2 + 32 * 3_461_148 + 1_035_993_088 + (32 * 2 + 1) * 4096 * 2 == 4_636_943_232
    # Per query: 32 layers of 436,207,616 (projections and MLP) + 320 keys · 16,384, and the head 2·4096·126464.
    per_query = 32 * (436_207_616 + 320 * 16_384) + 1_035_993_088
    assert per_query == 15_162_408_960
    step = speed.Forward("queries", 32, 320, 32, 288)
    cache_row = 2 * 32 * 4096 * 288 * 2  # K and V, 32 layers, 4096 wide, 288 cached positions, bf16
    one = speed.roofline_forward(speed.LLADA_8B, step, 1, w["bf16"], w["head"])
    assert one["flops"] == 32 * per_query and one["cache_bytes"] == cache_row == 150_994_944
    assert one["bytes"] == 14_995_169_280 + 150_994_944
    assert one["seconds"] == pytest.approx(15_146_164_224 / 3.35e12) and one["bound"] == "memory"  # 4.52 ms
    sixteen = speed.roofline_forward(speed.LLADA_8B, step, 16, w["bf16"], w["head"])
    assert sixteen["bytes"] == 14_995_169_280 + 16 * 150_994_944
    assert sixteen["seconds"] == pytest.approx(16 * 32 * per_query / 989e12)  # 7.85 ms
    assert sixteen["bound"] == "compute"
    # A pool's keys-and-values prefill computes no head position: the head's weights are not read.
    kv = speed.roofline_forward(speed.LLADA_8B, speed.Forward("prefill", 320, 320, 0, 0), 1, w["4bit"], w["head"])
    assert kv["bytes"] == 4_636_943_232 - 1_035_993_088
