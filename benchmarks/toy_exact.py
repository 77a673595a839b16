"""Exact-denoiser toy benchmark: IterRef against test-time alignment baselines at equal compute.

A known distribution p0 over every sequence of a small vocabulary, a perfect mask predictor for it,
a "toxicity" reward r = -(number of toxic tokens), its blame (1 at each toxic token) and the aligned
target p* ∝ p0 · exp(r / α), enumerated exactly. Two parts:

Exactness (EXACT_SETUPS, alpha 0.5): IterRef with RefineConfig's defaults (only k = 32 and alpha set)
on LLaDA's default sampler (low_confidence order, temperature 1), uniform and targeted re-masking,
N = 1 and 3, one block and three. Per cell: TV to p* against the simulated noise floor, and the
z-score of the mean reward against E_p*[r]. Also the proposals' commit order (RefineConfig.proposal_order)
compared: low_confidence, max_prob, random.

Efficiency (SETUPS): every method on the same `DiffusionSampler` (one token per step, random order,
temperature 1, so plain sampling draws exactly from p0) and the same per-sample accounting, at budgets
b = 1, 2, 4, 8 times plain sampling's T denoiser rows. Per cell: mean reward, toxic rate (share of
samples with any toxic token), total variation to p*, z of the mean reward, and the *measured*
denoiser rows and reward calls per sample.
  single  V=4, L=6, one block (T=6), peaked p0 tilted away from toxicity: ~56% of plain samples toxic
  blocks  V=3, L=8, two semi-autoregressive blocks of 4 (T=8, so "late"/"evenly" differ from
          "final"), peaked p0 tilted away from toxicity: ~54% toxic
  dense   V=3, L=6, one block, flat p0 (sharpness 1), no tilt: ~90% toxic, often several toxic tokens
p0 = random_distribution(V, L, seed, sharpness) · exp(-bias · toxic count), renormalised.

The denoiser is `toy.ExactDenoiser`'s exact conditional marginals, precomputed once for all
(V + 1)**L partially masked states (`TableDenoiser`): the same logits (tests/test_toy_benchmark.py
checks it), a table lookup instead of a scan over all V**L sequences per row.

Methods at budget b: Best-of-N with N = b; SVDD-PM with b candidates per step, argmax selection (its
α = 0: softmax selection at α = 0.25 had a higher toxic rate in all 9 problem × budget cells we
tried); FK-steering with b particles, λ = 1/α, resampling every 2 steps (resampling every step was
worse in all 9; every T steps was within 0.007 on single/blocks and worse on dense); remask-only,
IterRef with uniform re-masking (the paper's kernel) and IterRef with targeted re-masking (whose
re-mask move bars the token at its most blamed hole, RefineConfig.bar_blamed's default), with the
settings of DEFAULT_ITERREF / DEFAULT_TARGETED (the sweeps printed with the results are how they
were chosen) and k = the largest number of iterations whose worst-case rows (every proposal
accepted, one pool per iteration; safegen.research.planner.plan) fit in b · T; RefineConfig.budget = b caps it
in any case. With N = 1 every iteration draws one proposal, so the rows are deterministic: T + k ·
Σ_points N · (m + scoring forward), m = max(1, round(rho · decoded in scope)); k is an integer, so
IterRef may spend a little less than b · T (printed).

The budget ratio: the budget Best-of-N / FK-steering / SVDD need to reach a method's toxic rate at
b = 2 and 4, interpolating their toxic rate linearly in log2(budget) between measured budgets
("> 8" when never reached), divided by that method's b: > 1 means the method needs less compute.

The problems and methods are in toy_cells.py, the analysis and tables in toy_report.py.

    python benchmarks/toy_exact.py                      # full run (~5 min on 2 busy CPU cores, 10,000 samples/cell)
    python benchmarks/toy_exact.py --quick              # CI smoke (< 30 s)
    python benchmarks/toy_exact.py --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.toy_cells import (BUDGETS, DEFAULT_ALPHA, DEFAULT_ITERREF, DEFAULT_TARGETED,  # noqa: E402
                                  EXACT_ALPHA, EXACT_SETUPS, FK_EVERY, ORDERS, SETUPS, SVDD_ALPHA,
                                  SWEEP_BUDGET, Problem, Task, exactness_cell, make_p0, run_method,
                                  sampling_config, simulated_floor)
from benchmarks.methods import METHODS  # noqa: E402
from benchmarks.toy_report import efficiency, markdown, settings_text, targets  # noqa: E402
from safegen import RefineConfig  # noqa: E402
from safegen.research import toy  # noqa: E402
from safegen.research.toy import TableDenoiser  # noqa: E402

SHIPPED_ORDER = RefineConfig.proposal_order  # the default proposal order (max_prob)


# ----------------------------------------------------------------------------- the plan
def nk_pairs(total: int) -> list[tuple[int, int]]:
    """(N, k) with N · k = total, N ascending."""
    return [(n, total // n) for n in range(1, total + 1) if total % n == 0]


def plan(setups, alpha: float, budgets, sweep_setups=None) -> list[Task]:
    """Every cell to run: the main grid of each setup, then the sweeps of targeted IterRef (the
    kernel the middleware ships) on the setups named in `sweep_setups` (None: all)."""
    tasks = []
    for s in setups:
        tasks.append(Task(s.name, "main", "plain", 1, alpha))
        for b in budgets:
            for m in METHODS[1:]:
                tasks.append(Task(s.name, "main", m, b, alpha))
        if sweep_setups is not None and s.name not in sweep_setups:
            continue
        B, base = SWEEP_BUDGET, DEFAULT_TARGETED

        def sweep(table, label, budget=B, a=alpha, **change):
            tasks.append(Task(s.name, table, "iterref_targeted", budget, a, replace(base, **change), label))

        total = base.config(sampling_config(s), alpha, B).iterations
        for n, k in nk_pairs(total):
            sweep("N_k", f"N={n}, k={k}", n_proposals=n, iterations=k)
        for rho in (0.2, 0.35, 0.5, 0.75, 1.0):
            sweep("rho", f"rho={rho}", rho=rho)
        for floor in (0.02, 0.05, 0.2, 1.0):
            sweep("floor", f"floor={floor}", blame_floor=floor)
        for sched in ("final", "last", "late", "evenly"):
            for b in (B, 8):
                sweep("schedule", sched, budget=b, schedule=sched)
        for a in (0.5, 0.25, 0.1):
            sweep("alpha", f"alpha={a}", a=a)
    return tasks


def exactness_plan(quick: bool) -> list[tuple]:
    """(setup, remask, N, proposal order) of every exactness cell."""
    cells = [(s, rm, n, SHIPPED_ORDER) for s in EXACT_SETUPS for rm in ("uniform", "targeted")
             for n in (1, 3)]
    if not quick:
        cells += [(s, "uniform", 1, o) for s in EXACT_SETUPS for o in ORDERS if o != SHIPPED_ORDER]
    return cells


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=None, help="samples per cell (default 10000; 150 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="target temperature")
    ap.add_argument("--quick", action="store_true", help="small, fast configuration for CI smoke (< 30 s)")
    ap.add_argument("--setups", default=",".join(s.name for s in SETUPS), help="comma-separated setup names")
    ap.add_argument("--no-exactness", action="store_true", help="skip the exactness cells")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small tensors)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def describe(p: Problem, samples: int, seed: int) -> dict:
    plain = p.sampler.run(torch.empty((samples, 0), dtype=torch.long), seeds=seed + 10 ** 6)
    return {"description": p.setup.describe(), "setup": asdict(p.setup), "T": p.setup.T,
            "p0": p.exact_stats(p.p0), "target": p.exact_stats(p.p_star),
            "tv_p0_target": 0.5 * float((p.p0 - p.p_star).abs().sum()),
            "noise_floor_sim": simulated_floor(p.p_star, samples),
            "noise_floor_p0_sim": simulated_floor(p.p0, samples),
            "plain_tv_p0": toy.tv_distance(plain.sequences, p.p0, p.setup.V)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    samples = args.samples or (150 if args.quick else 10000)
    torch.set_num_threads(args.threads)
    by_name = {s.name: s for s in SETUPS}
    names = [n for n in args.setups.split(",") if n]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown setup(s) {unknown}; known: {sorted(by_name)}")
    setups = [by_name[n] for n in names]
    # --quick: every method and budget on every setup, the sweeps on one setup only.
    tasks = plan(setups, args.alpha, BUDGETS, sweep_setups=("blocks",) if args.quick else None)
    exact = [] if args.no_exactness else exactness_plan(args.quick)
    t_start = time.perf_counter()

    denoisers = {s.name: TableDenoiser(make_p0(s), s.V, s.L) for s in setups}
    problems: dict = {}

    def problem(setup_name: str, alpha: float) -> Problem:
        key = (setup_name, alpha)
        if key not in problems:
            problems[key] = Problem(by_name[setup_name], alpha, denoisers[setup_name])
        return problems[key]

    result = {"config": {"samples": samples, "seed": args.seed, "alpha": args.alpha, "quick": args.quick,
                         "budgets": list(BUDGETS), "methods": list(METHODS), "svdd_alpha": SVDD_ALPHA,
                         "fk_every": FK_EVERY, "sweep_budget": SWEEP_BUDGET,
                         "iterref_default": settings_text(asdict(DEFAULT_ITERREF) | {"iterations": "fitted"}),
                         "targeted_default": settings_text(asdict(DEFAULT_TARGETED) | {"iterations": "fitted"}),
                         "proposal_order": SHIPPED_ORDER,
                         "threads": args.threads, "torch": torch.__version__},
              "setups": {}, "exactness": None}
    for s in setups:
        result["setups"][s.name] = describe(problem(s.name, args.alpha), samples, args.seed) | {
            "main": [], "sweeps": {}, "efficiency": [], "targets": {}}

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(tasks) + len(exact), file=sys.stderr, desc="toy_exact", unit="cell")
        except ImportError:  # pragma: no cover
            bar = None
    if exact:
        exact_problems = {s.name: Problem(s, EXACT_ALPHA) for s in EXACT_SETUPS}
        result["exactness"] = {"setups": {n: describe(p, samples, args.seed) for n, p in exact_problems.items()},
                               "cells": []}
        for setup, rm, n, order in exact:
            result["exactness"]["cells"].append(
                exactness_cell(exact_problems[setup.name], rm, n, order, samples, args.seed))
            if bar is not None:
                bar.update(1)
    for t in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{t.setup} {t.table} {t.method} b={t.budget}")
        cell, _ = run_method(problem(t.setup, t.alpha), t.method, t.budget, samples, args.seed, t.choice)
        if t.label:
            cell["label"] = t.label
        res = result["setups"][t.setup]
        if t.table == "main":
            res["main"].append(cell)
        else:
            res["sweeps"].setdefault(t.table, []).append(cell)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for name, res in result["setups"].items():
        res["efficiency"] = efficiency(res["main"])
        res["targets"] = targets(res["main"], name)
    result["seconds"] = time.perf_counter() - t_start
    result["all_within_budget"] = all(
        c["within_budget"] for res in result["setups"].values()
        for c in res["main"] + [c for cs in res["sweeps"].values() for c in cs])

    text = markdown(result)
    print(text)
    print(f"\nTotal {result['seconds']:.0f} s, every cell within budget: {result['all_within_budget']}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
