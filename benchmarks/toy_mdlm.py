"""The exact toy (benchmarks/toy_cells.py's problems) on MDLM's ancestral sampler: IterRef (uniform and
targeted re-masking) against Best-of-N and remask-only at equal denoiser rows.

Budgets are multiples of the MDLM sampler's expected plain forwards (safegen.refine.cost.plain_rows: the model
runs only after a step that unmasked something), not of T. SVDD and FK-steering are built on LLaDA's
sampler and are left out. T = 256 steps for L = 6 tokens: positions unmasked at the same step are drawn
independently, which is exact only as T grows (at T = 256 about 6% of samples have such a pair), and
steps that unmask nothing cost nothing. IterRef's k is the largest whose worst case fits the budget
(safegen.research.planner.plan), capped by RefineConfig.budget. Per cell: mean reward, toxic rate, TV to p*, z of
the mean reward against p*, measured rows per sample.

    python benchmarks/toy_mdlm.py                   # ~5 min on 2 busy CPU cores
    python benchmarks/toy_mdlm.py --samples 500     # a quick look
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if not __package__:  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.toy_cells import SETUPS, Problem, run_method  # noqa: E402
from safegen.refine import cost  # noqa: E402
from safegen.sampling.mdlm import MDLMSampler  # noqa: E402
from safegen.sampling.sampler import SamplingConfig  # noqa: E402

METHODS = ("plain", "best_of_n", "remask_only", "iterref", "iterref_targeted")
STEPS = 256


def mdlm_problem(setup, alpha: float) -> Problem:
    problem = Problem(setup, alpha)
    problem.cfg = SamplingConfig(max_new_tokens=setup.L, steps=STEPS, temperature=1.0, sampler="mdlm")
    problem.sampler = MDLMSampler(problem.denoiser, setup.V, problem.cfg)
    return problem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--budgets", default="1,2,4,8")
    ap.add_argument("--setups", default="single,dense")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    for setup in (s for s in SETUPS if s.name in args.setups.split(",")):
        problem = mdlm_problem(setup, args.alpha)
        unit = cost.plain_rows(problem.cfg)
        exact = problem.exact_stats(problem.p_star)
        print(f"\n{setup.name}: {setup.describe().replace(f'T={setup.T}', f'MDLM T={STEPS}')}; alpha {args.alpha}; "
              f"budget unit {unit:.2f} rows; p* toxic rate {exact['toxic_rate']:.3f}")
        print("| method | budget | toxic rate | mean reward | TV to p* | z vs p* | rows/sample (max) | params |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for method in METHODS:
            for budget in ([1] if method == "plain" else budgets):
                cell, out = run_method(problem, method, budget, args.samples, args.seed)
                cell.update(setup=setup.name, rows_budget=budget * unit,
                            within_budget=bool(float(out.rows.max()) <= budget * unit + 1e-9))
                rows.append(cell)
                print(f"| {method} | {budget} | {cell['toxic_rate']:.3f} | {cell['mean_reward']:.3f} | "
                      f"{cell['tv']:.3f} | {cell['z']:.1f} | {cell['rows_mean']:.2f} ({cell['rows_max']:.0f}) | "
                      f"{json.dumps(cell['params'])} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
