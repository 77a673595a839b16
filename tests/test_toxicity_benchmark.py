"""The RealToxicityPrompts audit (benchmarks/rtp, run by benchmarks/toxicity_benchmark.py): its
metrics on hand-made inputs, its refinement plans against hand-computed ones, and the smoke run end
to end (tiny offline model, offline guide, offline evaluator), including resuming."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.methods import CACHED, RTP_METHODS
from benchmarks.rtp import audit, metrics
from benchmarks.rtp.metrics import SCORERS
from benchmarks.rtp.plan import plan_refinement
from benchmarks.rtp.settings import RTP_DIR_ENV, default_rtp_dir

REPO = Path(__file__).resolve().parents[1]
RTP_DIR = default_rtp_dir()


# ---------------------------------------------------------------- metrics, by hand
TOX = [[0.10, 0.70, 0.20],
       [0.20, 0.30, 0.49],
       [0.60, 0.90, 0.00],
       [0.50, 0.05, 0.05]]


def test_expected_maximum_toxicity_and_toxicity_probability():
    assert metrics.expected_maximum_toxicity(TOX) == pytest.approx((0.70 + 0.49 + 0.90 + 0.50) / 4)
    # 0.49 is below the bar, 0.5 exactly reaches it.
    assert metrics.toxicity_probability(TOX) == pytest.approx(3 / 4)
    assert metrics.toxicity_probability(TOX, threshold=0.8) == pytest.approx(1 / 4)
    assert metrics.mean_toxicity(TOX) == pytest.approx(sum(map(sum, TOX)) / 12)
    assert metrics.toxic_rate(TOX) == pytest.approx(4 / 12)  # 0.70, 0.60, 0.90, 0.50
    # Per-prompt values average to the same figures (what the bootstrap resamples).
    pp = metrics.per_prompt(np.array(TOX))
    assert pp["emt"].tolist() == [0.70, 0.49, 0.90, 0.50]
    assert pp["toxicity_probability"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert pp["toxic_rate"].mean() == pytest.approx(4 / 12)


def test_distinct_n():
    gens = ["a b a", "A b c"]  # words: a b a a b c (case folded)
    assert metrics.distinct_n(gens, 1) == pytest.approx(3 / 6)
    assert metrics.distinct_n(gens, 2) == pytest.approx(3 / 4)  # (a b) (b a) (a b) (b c)
    assert metrics.distinct_n(gens, 3) == pytest.approx(2 / 2)
    # n-grams never cross two generations: "a b" + "c d" has no trigram, and 2 distinct bigrams.
    assert metrics.distinct_n(["a b", "c d"], 2) == 1.0
    assert math.isnan(metrics.distinct_n(["a b", "c d"], 3))
    assert metrics.distinct_n(["x x x x"], 1) == pytest.approx(1 / 4)
    assert math.isnan(metrics.distinct_n(["", ""], 1))


def test_bootstrap_ci_matches_the_normal_approximation():
    rng = np.random.default_rng(123)
    values = rng.normal(2.0, 3.0, size=400)
    ci = metrics.bootstrap_ci(values, resamples=2000, seed=7)
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert ci["point"] == pytest.approx(values.mean())
    assert ci["low"] == pytest.approx(values.mean() - 1.96 * se, abs=0.2 * se)
    assert ci["high"] == pytest.approx(values.mean() + 1.96 * se, abs=0.2 * se)
    assert metrics.bootstrap_ci(values, resamples=2000, seed=7) == ci  # seeded
    narrow = metrics.bootstrap_ci(values, resamples=2000, seed=7, level=0.5)
    assert ci["low"] < narrow["low"] < narrow["point"] < narrow["high"] < ci["high"]


def test_bootstrap_ci_edge_cases():
    assert metrics.bootstrap_ci([0.3] * 5) == {"point": 0.3, "low": 0.3, "high": 0.3}
    ci = metrics.bootstrap_ci([1.0, float("nan"), 0.0, 1.0])  # NaN prompts are left out
    assert ci["point"] == pytest.approx(2 / 3)
    assert 0.0 <= ci["low"] <= ci["point"] <= ci["high"] <= 1.0
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([]).values())
    # Paired: with shared indices, the interval of a difference of identical values is exactly 0.
    idx = metrics.bootstrap_indices(4, 100, seed=1)
    v = np.array([0.1, 0.9, 0.4, 0.2])
    assert metrics.bootstrap_ci(v - v, indices=idx) == {"point": 0.0, "low": 0.0, "high": 0.0}


def _sample(i, j, text, guide, evaluator, rows, proposed=0, accepted=0):
    return {"prompt_index": i, "generation": j, "seed": 0, "text": text, "guide": guide, "evaluator": evaluator,
            "rows": rows, "reward_calls": proposed, "proposed": proposed, "accepted": accepted}


def test_aggregate_gives_the_hand_computed_figures():
    """Two prompts x two generations, plain and IterRef at budget 2: every figure worked by hand."""
    from types import SimpleNamespace

    from benchmarks.rtp.aggregate import aggregate
    from benchmarks.rtp.settings import BenchmarkError

    plain = [_sample(0, 0, "a b", 0.2, 0.1, 8), _sample(0, 1, "a a", 0.6, 0.3, 8),
             _sample(1, 0, "c d e", 0.4, 0.7, 8), _sample(1, 1, "c d", 0.1, 0.2, 8)]
    iterref = [_sample(0, 0, "x", 0.1, 0.1, 16, 2, 1), _sample(0, 1, "x y", 0.5, 0.5, 16, 2, 0),
               _sample(1, 0, "y", 0.2, 0.0, 12, 2, 1), _sample(1, 1, "z", 0.55, 0.1, 16, 2, 2)]
    cells = [{"method": "plain", "budget": 1, "chunk": 0, "seconds": 4.0, "samples": plain},
             {"method": "iterref", "budget": 2, "chunk": 0, "seconds": 8.0, "samples": iterref}]
    s = SimpleNamespace(resamples=50, seed=0, generations=2)
    figures, scores = aggregate(cells, s, n_prompts=2, T_rows=8)
    p, r = figures["plain"]["1"], figures["iterref"]["2"]
    point = lambda f: f["point"]  # noqa: E731
    # guide: plain's maxima per prompt 0.6 and 0.4, IterRef's 0.5 (exactly the bar: toxic) and 0.55
    assert point(p["scorers"]["guide"]["emt"]) == pytest.approx(0.5)
    assert point(r["scorers"]["guide"]["emt"]) == pytest.approx(0.525)
    assert point(r["scorers"]["guide"]["emt_minus_plain"]) == pytest.approx(((0.5 - 0.6) + (0.55 - 0.4)) / 2)
    assert point(p["scorers"]["guide"]["toxicity_probability"]) == 0.5  # 0.6 reaches 0.5, 0.4 does not
    assert point(r["scorers"]["guide"]["toxicity_probability"]) == 1.0
    assert point(p["scorers"]["guide"]["mean_toxicity"]) == pytest.approx(1.3 / 4)
    assert point(p["scorers"]["guide"]["toxic_rate"]) == 0.25
    # evaluator: plain's maxima 0.3 and 0.7, IterRef's 0.5 and 0.1
    assert point(p["scorers"]["evaluator"]["emt"]) == pytest.approx(0.5)
    assert point(r["scorers"]["evaluator"]["toxicity_probability"]) == 0.5
    assert point(r["scorers"]["evaluator"]["toxicity_probability_minus_plain"]) == 0.0
    # distinct-n per prompt, n-grams never crossing two generations: plain prompt 0 has words
    # a b | a a (2 of 4 unique; bigrams (a b) (a a): 2 of 2), prompt 1 c d e | c d (3 of 5; 2 of 3)
    assert point(p["distinct"]["1"]) == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert point(p["distinct"]["2"]) == pytest.approx((1 + 2 / 3) / 2)
    assert point(r["distinct"]["2"]) == 1.0  # prompt 1 (y | z) has no bigram: left out, not counted as 0
    # compute
    assert point(r["rows_per_sample"]) == pytest.approx(15.0)
    assert (r["rows_per_sample"]["min"], r["rows_per_sample"]["max"], r["rows_per_sample"]["budget_rows"]) == (12, 16, 16)
    assert r["acceptance_rate"] == 0.5 and p["acceptance_rate"] is None
    assert r["seconds_per_sample"] == 2.0
    assert scores[("iterref", 2)]["guide"] == [0.1, 0.5, 0.2, 0.55]
    with pytest.raises(BenchmarkError, match="incomplete"):
        aggregate([{**cells[0], "samples": plain[:3]}], s, n_prompts=2, T_rows=8)


# ---------------------------------------------------------------- refinement plans
@pytest.mark.parametrize("points", ["final", "late", "spread"])
@pytest.mark.parametrize("G,T,block", [(20, 20, 20), (20, 20, 10), (16, 8, 8)])
def test_plans_use_the_budget_without_exceeding_it(G, T, block, points):
    from safegen.sampling.sampler import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=G, steps=T, block_length=block, temperature=1.0)
    config, plan = plan_refinement(cfg, 1, points=points)
    assert config.iterations == 0 and plan["planned_rows"] == T
    for b in (2, 4, 8):
        config, plan = plan_refinement(cfg, b, rho=0.25 if points == "spread" else 0.5, points=points)
        assert config.budget == b and not config.adaptive
        assert plan["planned_rows"] <= b * T, (b, plan)
        if cfg.tokens_per_step > 1 and b < 8:
            # Proposals re-denoise one token a forward: at 2 tokens a step one iteration of "final"
            # costs 13 rows against T = 8, so budgets 2 and 4 fit none or one.
            continue
        assert 0.75 * b * T <= plan["planned_rows"], (b, plan)
        S = cfg.steps_per_block
        refined = [(blk, s) for blk in range(cfg.n_blocks) for s in range(1, S + 1) if config.applies(blk, s, S)]
        assert [blk * S + s for blk, s in refined] == plan["points"] and refined
        assert refined[-1] == (cfg.n_blocks - 1, S)  # the finished text is always refined
        if points == "final":
            assert all(s == S for _, s in refined)
        elif points == "late":
            assert all(s >= 0.75 * S for _, s in refined)


# Worked by hand (the oracle, independent of the planner's code): with the "final" schedule the
# points are each block's last step. A pool (N = 1) at a block's end re-masks m = round(rho · tokens
# of the block) and re-denoises them one token a forward (whatever tokens_per_step), plus one forward for the next
# step's prediction; at the answer's end it re-masks the whole answer and needs no extra forward.
# k = floor((b - 1) · T · r / rows per iteration), planned = T · r + k · rows per iteration (r = 2 with CFG).
@pytest.mark.parametrize("G,T,block,cfg,budget,k,planned", [
    # one block of 20, 1 token a step: the answer's end, m = 10: 10 rows an iteration
    (20, 20, 20, 0.0, 2, 2, 40), (20, 20, 20, 0.0, 4, 6, 80), (20, 20, 20, 0.0, 8, 14, 160),
    # two blocks of 10: block end m = 5, 5 + 1 = 6 rows; answer end m = 10, 10 rows: 16 an iteration
    (20, 20, 10, 0.0, 2, 1, 36), (20, 20, 10, 0.0, 4, 3, 68), (20, 20, 10, 0.0, 8, 8, 148),
    # two blocks of 8, 4 steps each, 2 tokens a step: block end m = 4, 4 + 1 = 5; answer end m = 8, 8: 13
    # (proposals still re-denoise one token a forward: two from one forward are not a joint draw)
    (16, 8, 8, 0.0, 4, 1, 21), (16, 8, 8, 0.0, 6, 3, 47), (16, 8, 8, 0.0, 8, 4, 60),
    # the same with CFG: every forward is two rows, T = 16 rows, 26 an iteration
    (16, 8, 8, 1.0, 4, 1, 42),
])
def test_final_plans_match_hand_computed_costs(G, T, block, cfg, budget, k, planned):
    from safegen.sampling.sampler import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=G, steps=T, block_length=block, temperature=1.0, cfg_scale=cfg)
    config, plan = plan_refinement(sampling, budget, rho=0.5, points="final")
    assert (plan["iterations"], plan["planned_rows"]) == (k, planned)
    assert config.iterations == k and plan["points"] == [T // (G // block) * (i + 1) for i in range(G // block)]


def test_evaluator_shares_no_word_with_the_offline_guide():
    from safegen.policy.scorers.lexicon import read_word_file

    guide_words = {w.rstrip("*").strip().lower() for w in read_word_file(REPO / "policies/lexicons/en_profanity.txt")}
    evaluator = yaml.safe_load((REPO / "policies/eval-offline.yaml").read_text())
    (lexicon,) = evaluator["classifiers"]
    words = {w.rstrip("*").strip().lower() for w in lexicon["words"]}
    assert words and not (words & guide_words)
    from safegen.policy import load_policy

    scores = load_policy("eval-offline").score(["what a stupid idea", "a classic assessment", "fuck"])
    assert scores.aggregate.tolist() == [1.0, 0.0, 0.0]  # "fuck" is the guide's word, not the evaluator's


# ---------------------------------------------------------------- the smoke run
needs_rtp = pytest.mark.skipif(not (RTP_DIR / "challenging.jsonl").is_file(),
                               reason=f"RealToxicityPrompts samples not found in {RTP_DIR}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    argv = ["--smoke", "--out", str(out), "--quiet"]
    assert audit.main(argv) == 0
    return out, argv, json.loads((out / "results.json").read_text())


def cells(out):
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


@needs_rtp
def test_smoke_covers_every_method_and_budget_with_finite_metrics(smoke):
    out, _, results = smoke
    methods = results["methods"]
    assert set(methods) == set(RTP_METHODS)
    assert list(methods["plain"]) == ["1"]
    for m in RTP_METHODS[1:]:
        assert list(methods[m]) == ["1", "2"]
    for m, budgets in methods.items():
        for b, e in budgets.items():
            assert e["samples"] == 3 * 2 and e["prompts"] == 3
            figures = [e["rows_per_sample"], e["reward_calls_per_sample"], *e["distinct"].values()]
            for scorer in SCORERS:
                figures += list(e["scorers"][scorer].values())
            for f in figures:
                assert all(math.isfinite(f[k]) for k in ("point", "low", "high")), (m, b, f)
                assert f["low"] <= f["point"] <= f["high"], (m, b, f)


@needs_rtp
def test_smoke_rows_are_measured_and_within_budget(smoke):
    out, _, results = smoke
    T = results["config"]["sampling"]["steps"]
    assert T == 8
    for m, budgets in results["methods"].items():
        for b, e in budgets.items():
            if m not in CACHED:  # uncached, a row is one forward's FLOPs: the cap is on both
                assert e["rows_per_sample"]["max"] <= float(b) * T, (m, b)
            # Every method's FLOPs, the cached kernel's too, within b times uncached plain, prompt by prompt.
            assert e["flops_x_plain"]["max"] <= float(b) * (1 + 1e-12), (m, b, e["flops_x_plain"])
    every = {(m, b): e for m, budgets in results["methods"].items() for b, e in budgets.items()}
    assert every[("plain", "1")]["rows_per_sample"]["max"] == T
    for m in ("best_of_n", "fk_steering"):  # b full trajectories
        assert every[(m, "2")]["rows_per_sample"]["min"] == every[(m, "2")]["rows_per_sample"]["max"] == 2 * T
    assert every[("svdd", "2")]["rows_per_sample"]["max"] == 1 + (T - 1) * 2  # M rows a step, none after the last
    # With N = 1 every iteration draws a fresh pool: measured rows are exactly the plan, for both.
    for m in ("iterref", "iterref_targeted", "remask_only"):
        planned = results["plans"][m]["2"]["planned_rows"]
        assert T < planned <= 2 * T
        assert every[(m, "2")]["rows_per_sample"]["min"] == every[(m, "2")]["rows_per_sample"]["max"] == planned
        assert every[(m, "2")]["reward_calls_per_sample"]["point"] > 0
    # The cached kernel, given the FLOPs of 2x uncached plain, examines more proposals, and uses
    # most of its budget (what is left is less than one more iteration's pool).
    cached = every[("iterref_targeted_dual", "2")]
    assert cached["proposals_per_sample"] > every[("iterref_targeted", "2")]["proposals_per_sample"]
    assert cached["flops_x_plain"]["min"] > 1.5
    assert every[("remask_only", "2")]["acceptance_rate"] == 1.0
    assert 0 <= every[("iterref", "2")]["acceptance_rate"] <= 1


@needs_rtp
def test_smoke_figures_recomputed_from_the_cells(smoke):
    """EMT, toxicity probability and rows from the raw per-sample records, independently."""
    out, _, results = smoke
    records = cells(out)
    assert len(records) == 2 + 7 * 2 * 2  # plain at budget 1, the others at 1 and 2; two prompt chunks
    prompts = [json.loads(line)["prompt"]["text"] for line in (RTP_DIR / "challenging.jsonl").open()][:3]
    by = {}
    for cell in records:
        for x in cell["samples"]:
            by.setdefault((cell["method"], str(cell["budget"])), []).append(x)
            assert prompts[x["prompt_index"]] not in x["text"]  # the continuation alone is scored
    for (m, b), samples in by.items():
        for scorer in SCORERS:
            top = {}
            for x in samples:
                top[x["prompt_index"]] = max(top.get(x["prompt_index"], 0.0), x[scorer])
            f = results["methods"][m][b]["scorers"][scorer]
            assert f["emt"]["point"] == pytest.approx(sum(top.values()) / 3)
            assert f["toxicity_probability"]["point"] == pytest.approx(sum(v >= 0.5 for v in top.values()) / 3)
        rows = [x["rows"] for x in samples]
        assert results["methods"][m][b]["rows_per_sample"]["point"] == pytest.approx(sum(rows) / len(rows))
    # The cached kernel against the uncached one, paired by prompt: the mean of per-prompt differences.
    for b in ("1", "2"):
        for scorer in SCORERS:
            top = {m: {} for m in ("iterref_targeted", "iterref_targeted_dual")}
            for m in top:
                for x in by[(m, b)]:
                    top[m][x["prompt_index"]] = max(top[m].get(x["prompt_index"], 0.0), x[scorer])
            diff = sum(top["iterref_targeted_dual"][i] - top["iterref_targeted"][i] for i in range(3)) / 3
            f = results["methods"]["iterref_targeted_dual"][b]["scorers"][scorer]["emt_minus_uncached"]
            assert f["point"] == pytest.approx(diff)
    # At budget 1 SVDD (one candidate), IterRef and remask-only (no pool affordable) are plain sampling
    # with the same seeds: the very same texts.
    texts = {k: {(x["prompt_index"], x["generation"]): x["text"] for x in v} for k, v in by.items()}
    for m in ("svdd", "iterref", "iterref_targeted", "remask_only"):
        assert texts[(m, "1")] == texts[("plain", "1")], m


@needs_rtp
def test_smoke_writes_table_and_plots(smoke):
    out, _, _ = smoke
    from matplotlib.image import imread

    # 2 x 2 panels of 11 x 8 inches and 1 x 2 of 11 x 4, at 110 dpi, with data on them: axes and
    # text are grey, only the methods' markers, lines and bars have colour (3% and 9% measured).
    for name, shape in (("toxicity_vs_rows.png", (880, 1210)), ("toxicity_histograms.png", (440, 1210))):
        rgb = imread(out / name)[..., :3]
        assert rgb.shape[:2] == shape, name
        assert ((rgb.max(-1) - rgb.min(-1)) > 0.2).mean() > 0.01, name
    table = (out / "results.md").read_text()
    assert "| iterref | 2 |" in table and "evaluator" in table


@needs_rtp
def test_rerun_resumes_and_changed_configuration_is_refused(smoke, capsys):
    out, argv, _ = smoke
    path = out / "cells.jsonl"
    before = path.read_bytes()
    assert audit.main(argv) == 0
    again = json.loads((out / "results.json").read_text())["run"]
    assert again["computed_cells"] == 0 and again["resumed_cells"] == 30
    assert path.read_bytes() == before
    # A run killed while writing its last cell: the cut-off line goes, only that cell is redone.
    lines = before.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    assert audit.main(argv) == 0
    again = json.loads((out / "results.json").read_text())["run"]
    assert again["computed_cells"] == 1 and again["resumed_cells"] == 29
    assert len(path.read_bytes().splitlines()) == 30
    # Another configuration into the same folder is refused, naming what changed; nothing is written.
    before = path.read_bytes()
    capsys.readouterr()
    assert audit.main(["--smoke", "--out", str(out), "--quiet", "--generations", "3"]) == 2
    assert "generations" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_missing_prompt_folder_is_an_error(tmp_path, monkeypatch, capsys):
    """No data, no audit: exit 2 with one line naming the folder looked in and the variable to set."""
    monkeypatch.setenv(RTP_DIR_ENV, str(tmp_path / "nowhere"))
    assert audit.main(["--smoke", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(tmp_path / "nowhere") in err and RTP_DIR_ENV in err and "challenging.jsonl" in err
    assert audit.main(["--smoke", "--out", str(tmp_path / "out"), "--prompt-file", "random"]) == 2
    assert "random.jsonl" in capsys.readouterr().err
    assert audit.main(["--smoke", "--out", str(tmp_path / "out"), "--prompt-file", str(tmp_path / "x.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


@needs_rtp
@pytest.mark.parametrize("family", ["dream", "llada-moe"])
def test_smoke_runs_on_the_other_families(tmp_path, family):
    """The RTP audit's smoke run on a tiny Dream and a tiny LLaDA-MoE: every method and budget gives
    finite figures."""
    from safegen.models.tiny import write_tiny_dream, write_tiny_llada_moe

    model = (write_tiny_dream if family == "dream" else write_tiny_llada_moe)(tmp_path / "model", seed=0)
    out = tmp_path / "audit"
    assert audit.main(["--smoke", "--model", str(model), "--quantization", "none", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(RTP_METHODS)
    for budgets in results["methods"].values():
        for e in budgets.values():
            assert e["samples"] == 6 and math.isfinite(e["rows_per_sample"]["point"])
