"""Smoke test of benchmarks/toy_exact.py: its quick mode runs every method at every budget, writes
finite figures, and every method's measured rows stay within its budget."""
import json
import math
from dataclasses import replace

import pytest
import torch

from benchmarks import toy_cells, toy_exact, toy_report
from benchmarks.methods import METHODS
from safegen.research import toy
from safegen.refine.iterref import IterRef


def test_table_denoiser_matches_exact_denoiser():
    for V, L in [(3, 5), (4, 4)]:
        p0 = toy.random_distribution(V, L, seed=3, sharpness=2.0)
        fast, exact = toy.TableDenoiser(p0, V, L), toy.ExactDenoiser(p0, V, L)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, V + 1, (300, 2 + L), generator=g)  # with a 2-token "prompt"
        x[:, :2] = 0
        x[0, 2:] = V  # fully masked
        a, b = fast(x), exact(x)
        assert a.shape == b.shape
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        fin = torch.isfinite(b)
        assert torch.allclose(a[fin], b[fin], atol=1e-5)


def test_budget_to_reach_interpolates_in_log_budget():
    curve = [(1, 0.8), (2, 0.4), (4, 0.2), (8, 0.1)]
    assert toy_report.budget_to_reach(curve, 0.8) == 1
    assert toy_report.budget_to_reach(curve, 0.4) == pytest.approx(2.0)
    assert toy_report.budget_to_reach(curve, 0.3) == pytest.approx(2 ** 1.5)
    assert toy_report.budget_to_reach(curve, 0.05) is None


def test_fitted_iterations_fit_the_budget():
    """The k each setup's IterRef gets at each budget is the largest whose worst case (every
    iteration draws a pool: remask-only) fits b · T, the rows of one iteration measured by running
    the sampler with k = 1."""
    for setup in toy_cells.SETUPS:
        problem = toy_cells.Problem(setup, 0.25)
        T = problem.cfg.steps
        for sched in ("final", "last", "late", "evenly"):
            choice = replace(toy_cells.DEFAULT_TARGETED, schedule=sched)
            rc = replace(choice.config(problem.cfg, 0.25, 8), iterations=1, selection="remask_only", budget=None)
            out = problem.sampler.run(torch.empty((2, 0), dtype=torch.long), seeds=0,
                                      hook=IterRef(rc, problem.reward, problem.blame))
            per_iteration = float(out.rows[0]) - T
            assert per_iteration > 0 and out.rows[1] == out.rows[0]
            for b in toy_cells.BUDGETS:
                k = choice.config(problem.cfg, 0.25, b).iterations
                assert T + k * per_iteration <= b * T < T + (k + 1) * per_iteration, (setup.name, sched, b, k)


def test_quick_run_writes_every_method_and_budget(tmp_path):
    out_json, out_md = tmp_path / "toy.json", tmp_path / "toy.md"
    toy_exact.main(["--quick", "--samples", "100", "--no-progress", "--json", str(out_json),
                "--markdown", str(out_md)])
    data = json.loads(out_json.read_text())
    assert data["config"]["quick"] is True
    assert set(data["setups"]) == {s.name for s in toy_cells.SETUPS}
    numbers = ("mean_reward", "toxic_rate", "tv", "rows_mean", "rows_max", "reward_calls_mean", "seconds")
    for name, res in data["setups"].items():
        T = res["T"]
        cells = {(c["method"], c["budget"]): c for c in res["main"]}
        expected = {("plain", 1)} | {(m, b) for m in METHODS[1:] for b in toy_cells.BUDGETS}
        assert set(cells) == expected, name
        for (method, b), c in cells.items():
            for key in numbers:
                assert isinstance(c[key], (int, float)) and math.isfinite(c[key]), (name, method, b, key)
            assert c["samples"] == 100
            assert 0 <= c["toxic_rate"] <= 1 and 0 <= c["tv"] <= 1
            assert c["rows_budget"] == b * T
            assert c["rows_max"] <= b * T and c["within_budget"], (name, method, b, c["rows_max"])
            assert c["rows_mean"] >= T  # nothing samples for less than plain sampling
        assert cells[("plain", 1)]["rows_max"] == T
        for b in toy_cells.BUDGETS:
            assert cells[("best_of_n", b)]["rows_mean"] == b * T
            if b > 1:  # the refining methods really spent their extra budget
                for m in ("iterref", "iterref_targeted"):
                    assert cells[(m, b)]["rows_mean"] > T, (name, m, b)
                    assert cells[(m, b)]["accept_rate"] is not None
                assert cells[("remask_only", b)]["accept_rate"] == 1.0
        for c in [c for cs in res["sweeps"].values() for c in cs]:
            assert c["rows_max"] <= c["budget"] * T and math.isfinite(c["tv"])
        for key in ("noise_floor_sim", "plain_tv_p0", "tv_p0_target"):
            assert math.isfinite(res[key])
        assert {e["baseline"] for e in res["efficiency"]} >= {"best_of_n", "fk_steering"}
    assert data["setups"]["blocks"]["sweeps"].keys() >= {"N_k", "rho", "floor", "schedule"}
    exact = data["exactness"]["cells"]
    assert {(c["setup"], c["remask"], c["N"]) for c in exact} == {
        (s.name, rm, n) for s in toy_cells.EXACT_SETUPS for rm in ("uniform", "targeted") for n in (1, 3)}
    assert all(math.isfinite(c["tv"]) and math.isfinite(c["z"]) and c["accept_rate"] > 0 for c in exact)
    assert data["all_within_budget"] is True
    md = out_md.read_text()
    assert "| iterref_targeted | 8 |" in md and "TV to p*" in md and "### Exactness" in md
