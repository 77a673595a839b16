"""Smoke run of benchmarks/overhead.py at its quick size: the figures exist and are coherent."""
import json

from benchmarks import overhead as bench


def test_quick_overhead_run(tmp_path):
    out = tmp_path / "o.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    t = r["time"]
    # Each phase took time, and the timers cover no more than the wall time (a timer that kept the
    # warm-up or counted a call twice leaves nothing, or less than nothing, for the rest).
    assert t["forward_s"] > 0 and t["classifier_s"] > 0 and 0 < t["other_s"] < t["wall_s"]
    # The timed forwards are exactly the ones the sampler charged: rows given to the model equal
    # the rows its accounting reports for the refined and the "before" samples.
    assert t["forward_rows"] == t["charged_rows"] > 0
    assert t["forward_calls"] > 0 and t["classifier_calls"] > 0
    # The classifiers run inside the policy layer (scoring, or blaming for targeted re-masking):
    # their time is part of that layer's, which the middleware's share now includes.
    assert 0 < t["classifier_s"] <= t["policy_score_s"] + t["policy_blame_s"]
    assert t["policy_blame_s"] > 0
    w = r["weights"]
    # Quantized layers shrink: 8-bit about 1/4 of fp32, 4-bit about 1/8 plus statistics.
    assert 0.2 < w["8bit"]["blocks_linear_ratio_fp32"] < 0.3
    assert 0.1 < w["4bit"]["blocks_linear_ratio_fp32"] < 0.175
    assert r["peak_memory"]["plain"]["peak_above_model_mib"] >= 0


def test_stopwatch_counts_a_nested_call_once():
    # A scorer's blame that calls its own (wrapped) score: one call, its time once, not twice.
    watch = bench.Stopwatch()
    calls = []

    def score(texts):
        calls.append("score")
        return texts

    def blame(texts):
        calls.append("blame")
        return wrapped_score(texts)

    wrapped_score = watch.wrap(score)
    wrapped_blame = watch.wrap(blame)
    wrapped_blame(["a", "b"])
    wrapped_score(["c"])
    assert calls == ["blame", "score", "score"]
    assert (watch.calls, watch.items) == (2, 3)
