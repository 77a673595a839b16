"""IterRef's moves (refine/moves.py) against Best-of-N, SVDD and FK-steering at equal denoiser rows, on
the three enumerable toys of toy_exact.py and on the long Markov-chain problem (research/markov.py),
with the exactness of every move checked first.

Problems (α = 0.25 unless named): `single`, `blocks`, `dense` (toy_cells.SETUPS: TV to p* by
enumeration); `long` (V = 4, L = 32, four blocks of 8, T = 32: half the plain answers toxic, mostly
once; judged by its exact toxic rate and mean reward from forward-backward, the mean per-position
marginal TV beside them) at α = 0.25 and at α = 0.1 (`long-0.1`: p* toxic rate 3e-5, nearly free of
toxic answers), where Best-of-N's budget to match each method's toxic rate at b = 2 is reported.

Moves (MOVES below), each with targeted holes, N = 1, rho 0.5, schedule "final" unless named, and k
the largest whose worst-case rows fit b · T (planner.plan; the moves' costs differ: a one-hole Gibbs
proposal costs one forward, plus a scoring forward where masks are left):
  remask        the re-mask move as shipped before this benchmark (bar_blamed off)
  bar           the re-mask move with the current token barred at the most blamed hole (shipped)
  bar+gibbs.5   bar, every second iteration a one-hole Metropolised-Gibbs move (gibbs_share 0.5)
  bar+gibbs.75  three Gibbs moves in four
  gibbs         one-hole Metropolised-Gibbs moves only
  gibbs-last    the same, refining only after the last step (one forward a move)
  gibbs2        two-hole Metropolised-Gibbs moves (their reverse path costs one more forward)
  mtm / mtm-reuse   Multiple-Try Metropolis, N = 2 tries (with N − 1 backward draws / the other tries)

Exactness (EXACT_MOVES on toy_cells.EXACT_SETUPS, α = 0.5, k = 48, LLaDA's low_confidence base
order): TV to p* against the simulated noise floor and the z of the mean reward.

    python benchmarks/toy_moves.py                     # full run (10,000 samples a cell, ~10 min on 2 busy cores)
    python benchmarks/toy_moves.py --quick             # smoke (< 1 min)
    python benchmarks/toy_moves.py --markdown out.md --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.toy_cells import (DEFAULT_TARGETED, EXACT_ALPHA, EXACT_SETUPS, LONG, SETUPS, LongProblem,  # noqa: E402
                                  Problem, run_method, simulated_floor)
from benchmarks.toy_report import budget_to_reach  # noqa: E402
from safegen.refine.iterref import IterRef, RefineConfig  # noqa: E402

BASE = replace(DEFAULT_TARGETED, bar_blamed=False)
MOVES = {
    "remask": BASE,
    "bar": replace(BASE, bar_blamed=True),
    "bar+gibbs.5": replace(BASE, bar_blamed=True, gibbs_share=0.5),
    "bar+gibbs.75": replace(BASE, bar_blamed=True, gibbs_share=0.75),
    "gibbs": replace(BASE, gibbs_share=1.0),
    "gibbs-last": replace(BASE, gibbs_share=1.0, schedule="last"),
    "gibbs2": replace(BASE, gibbs_share=1.0, gibbs_holes=2),
    "mtm": replace(BASE, selection="mtm", n_proposals=2),
    "mtm-reuse": replace(BASE, selection="mtm_reuse", n_proposals=2),
}
SHIPPED = "bar"
BASELINES = ("best_of_n", "svdd", "fk_steering")
EXACT_MOVES = {
    "bar": dict(proposal_holes="targeted", bar_blamed=True),
    "gibbs": dict(proposal_holes="targeted", gibbs_share=1.0),
    "bar+gibbs.5": dict(proposal_holes="targeted", bar_blamed=True, gibbs_share=0.5),
    "gibbs2": dict(proposal_holes="targeted", gibbs_share=1.0, gibbs_holes=2),
    "mtm": dict(proposal_holes="targeted", selection="mtm", n_proposals=3),
    "mtm-reuse": dict(proposal_holes="targeted", selection="mtm_reuse", n_proposals=3),
}
EXACT_K = 48


def problems() -> dict:
    out = {s.name: Problem(s, 0.25) for s in SETUPS}
    out["long"] = LongProblem(LONG, 0.25)
    out["long-0.1"] = LongProblem(LONG, 0.1)
    return out


def exactness(samples: int, seed: int) -> list[dict]:
    cells = []
    for setup in EXACT_SETUPS:
        p = Problem(setup, EXACT_ALPHA)
        floor = simulated_floor(p.p_star, samples)
        for name, change in EXACT_MOVES.items():
            hook = IterRef(RefineConfig(iterations=EXACT_K, alpha=EXACT_ALPHA, **change), p.reward, p.blame)
            out = p.sampler.run(torch.empty((samples, 0), dtype=torch.long), seeds=seed, hook=hook)
            cells.append({"setup": setup.name, "move": name, "floor": floor, **p.measure(out.sequences),
                          "accept_rate": float(out.accepted.sum() / out.proposed.sum()),
                          "rows_mean": float(out.rows.mean())})
    return cells


def error(c: dict) -> float:
    """What "closer to p*" means on a problem: TV by enumeration; on the long one the toxic rate's
    absolute error (the mean reward's moves with it)."""
    return abs(c["toxic_rate_error"]) if "toxic_rate_error" in c else c["tv"]


def targets(cells: list[dict]) -> list[dict]:
    """Per IterRef move and budget 2, 4: its distance to p* (error()) and toxic rate against each
    baseline's at the same budget; the margin is the move's minus the best baseline's (< 0: ahead)."""
    by = {(c["method"], c["budget"]): c for c in cells}
    rows = []
    for b in (2, 4):
        base = {m: by[(m, b)] for m in BASELINES}
        best_err = min(error(c) for c in base.values())
        best_tox = min(base[m]["toxic_rate"] for m in ("best_of_n", "fk_steering"))
        for move in MOVES:
            c = by[(move, b)]
            rows.append({"move": move, "budget": b, "error": error(c), "best_baseline_error": best_err,
                         "error_margin": error(c) - best_err, "toxic_rate": c["toxic_rate"],
                         "toxic_margin": c["toxic_rate"] - best_tox,
                         "met": error(c) < best_err and c["toxic_rate"] < best_tox})
    return rows


def bon_ratio(cells: list[dict]) -> dict:
    """Best-of-N's budget to reach each move's toxic rate at b = 2, over 2 (None: beyond the largest)."""
    curve = [(c["budget"], c["toxic_rate"]) for c in cells if c["method"] == "best_of_n"]
    top = max(b for b, _ in curve)
    out = {}
    for c in cells:
        if c["method"] in MOVES and c["budget"] == 2:
            need = budget_to_reach(curve, c["toxic_rate"])
            out[c["method"]] = None if need is None else need / 2
    return {"ratios": out, "largest_budget": top}


def cell_row(c: dict, long: bool) -> str:
    p = c["params"]
    fit = f"k={p['k']}" if "k" in p else ""
    closeness = (f"{c['toxic_rate_error']:+.4f} | {c['mean_reward_error']:+.4f} | {c['tv']:.4f}" if long
                 else f"{c['tv']:.3f}")
    acc = "-" if c.get("accept_rate") is None else f"{c['accept_rate']:.2f}"
    return (f"| {c['method']} | {c['budget']} | {fit} | {c['toxic_rate']:.4f} | {closeness} | {c['z']:+.1f} | "
            f"{c['rows_mean']:.1f} ({c['rows_max']:.0f}) | {c['reward_calls_mean']:.1f} | {acc} |")


def markdown(result: dict) -> str:
    lines = [f"Samples per cell: {result['samples']}, seed {result['seed']}. Rows: mean (max) per sample; "
             "every max within b · T.", "", "### Exactness (α = 0.5, k = 48, low_confidence base order)", "",
             "| setup | move | TV to p* | floor | z of mean reward | toxic rate | accept | rows/sample |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["exactness"]:
        lines.append(f"| {c['setup']} | {c['move']} | {c['tv']:.3f} | {c['floor']:.3f} | {c['z']:+.2f} | "
                     f"{c['toxic_rate']:.3f} | {c['accept_rate']:.2f} | {c['rows_mean']:.0f} |")
    for name, res in result["problems"].items():
        long = name.startswith("long")
        lines += ["", f"### {name}: {res['description']}", "",
                  f"p* toxic rate {res['target']['toxic_rate']:.4g}, mean reward {res['target']['mean_reward']:.4g}; "
                  f"p0 toxic rate {res['p0']['toxic_rate']:.3f}.", ""]
        head = ("| method | b | fit | toxic rate | toxic-rate error | mean-reward error | marginal TV | z | rows | "
                "reward calls | accept |" if long else
                "| method | b | fit | toxic rate | TV to p* | z | rows | reward calls | accept |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        lines += [cell_row(c, long) for c in res["cells"]]
        lines += ["", "Targets (margin: the move's minus the best baseline's; < 0 is ahead):", "",
                  "| move | b | " + ("toxic-rate |error|" if long else "TV") + " | best baseline | margin | "
                  "toxic rate | margin to min(BoN, FK) | met |", "|---|---|---|---|---|---|---|---|"]
        for t in res["targets"]:
            lines.append(f"| {t['move']} | {t['budget']} | {t['error']:.4f} | {t['best_baseline_error']:.4f} | "
                         f"{t['error_margin']:+.4f} | {t['toxic_rate']:.4f} | {t['toxic_margin']:+.4f} | "
                         f"{'yes' if t['met'] else 'no'} |")
        if "bon_ratio" in res:
            r = res["bon_ratio"]
            lines += ["", "Best-of-N's budget to match each move's toxic rate at b = 2, over 2 "
                      f"(\"> {r['largest_budget'] // 2}\": not reached by b = {r['largest_budget']}): " +
                      ", ".join(f"{m} {'> %d' % (r['largest_budget'] // 2) if v is None else f'{v:.2f}'}"
                                for m, v in r["ratios"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=None, help="samples per cell (10000; 300 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    samples = args.samples or (300 if args.quick else 10000)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = {"samples": samples, "seed": args.seed, "shipped": SHIPPED, "exactness": exactness(samples, args.seed),
              "problems": {}}
    for name, p in problems().items():
        long = name.startswith("long")
        cells = []
        budgets = (1, 2, 4, 8, 16) if name == "long-0.1" else (1, 2, 4, 8)
        for b in budgets:
            for m in BASELINES if b > 1 else ("best_of_n",):
                if m == "best_of_n" or b <= 8:
                    cells.append(run_method(p, m, b, samples, args.seed)[0])
        for b in (2, 4):
            for move, choice in MOVES.items():
                c, _ = run_method(p, "iterref_targeted", b, samples, args.seed, choice)
                cells.append(c | {"method": move})
        exact = (p.exact_stats(), p.exact_stats(float("inf"))) if long else (p.exact_stats(p.p_star), p.exact_stats(p.p0))
        res = {"description": p.setup.describe(), "target": exact[0], "p0": exact[1], "cells": cells,
               "targets": targets(cells)}
        if name == "long-0.1":
            res["bon_ratio"] = bon_ratio(cells)
        result["problems"][name] = res
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    result["seconds"] = time.perf_counter() - t0
    text = markdown(result)
    print(text)
    print(f"Total {result['seconds']:.0f} s")
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
