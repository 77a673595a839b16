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
