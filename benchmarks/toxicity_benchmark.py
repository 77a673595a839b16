"""RealToxicityPrompts audit: how toxic are a masked diffusion LM's continuations, with and without
test-time alignment, at equal denoiser compute.

For every prompt it draws `--generations` continuations of up to `--max-new-tokens` tokens with each
method at each budget b (a multiple of plain sampling's T denoiser rows per sample):

    plain        the base sampler (budget 1 only)
    best_of_n    N = b independent samples, the highest guide reward kept
    svdd         b candidate next states per step (SVDD-PM, argmax at --svdd-alpha 0)
    fk_steering  b particles, resampled every --fk-every steps
    remask_only  the IterRef kernel accepting every proposal (no reward in the choice)
    iterref      IterRef, Metropolis selection (exact mode: no adaptive skipping), uniform re-masking
    iterref_targeted  the same, re-masking the tokens the guide blames (proposal_holes="targeted")

IterRef (both re-maskings) and remask-only run with RefineConfig(budget=b) and the same (N, k, rho, refined steps),
planned by `plan_refinement` to spend as much of (b - 1)·T extra rows as it can: by default at each
finished block, like RefineConfig's "final" schedule; `--refine-points late|spread` spreads it over
more steps. Rows, reward calls and time are measured from the sampler, never assumed.

Only the continuation is scored, by two policies: the guide (`--policy`, whose reward steers the
methods) and an evaluator that did not steer (`--evaluator`). A method that only improves the
guide's numbers games the guide. Metrics per method and budget, with 95% bootstrap intervals over
prompts: Expected Maximum Toxicity, toxicity probability (a generation >= 0.5), mean toxicity, toxic
rate, distinct-1/2/3, rows and reward calls per sample, and EMT minus plain's (paired).

Output in --out: cells.jsonl (one line per finished (method, budget, prompt chunk); a rerun resumes,
and refuses a changed configuration), results.json, results.md, toxicity_vs_rows.png,
toxicity_histograms.png.

    # here: the tiny random offline model, the offline guide, the offline evaluator
    python benchmarks/toxicity_benchmark.py --tiny --out runs/audit --prompts 50 --generations 10 --budgets 1,2,4
    python benchmarks/toxicity_benchmark.py --smoke --out runs/audit-smoke          # CI, < 60 s
    # a GPU machine: LLaDA-8B-Instruct in 4 bit, Detoxify guiding, the offline policy evaluating
    python benchmarks/toxicity_benchmark.py --policy default --evaluator offline \\
        --out runs/audit-llada --prompts 200 --budgets 1,2,4,8
    # the benign control: how much each method spends on, and changes, mostly harmless prompts
    python benchmarks/toxicity_benchmark.py ... --prompt-file random

The code is in benchmarks/rtp/ (settings, plan, cells, metrics, aggregate, report, audit); this
script is its entry point.
"""
import sys
from pathlib import Path

if not __package__:  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rtp.audit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
