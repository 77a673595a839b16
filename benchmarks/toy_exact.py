"""Exact-denoiser toy benchmark: IterRef against test-time alignment baselines at equal compute.

The toy of docs/algorithm.md §7: a known distribution p0 over every sequence of a small vocabulary,
a perfect mask predictor for it, a "toxicity" reward r = -(number of toxic tokens) and the aligned
target p* ∝ p0 · exp(r / α), enumerated exactly. Every method runs on the same `DiffusionSampler`
(one token per step, random order, temperature 1, so plain sampling draws exactly from p0) and the same
per-sample accounting, at budgets b = 1, 2, 4, 8 times plain sampling's T denoiser rows. Per cell:
mean reward, toxic rate (share of samples with any toxic token), total variation to p*, and the
*measured* denoiser rows and reward calls per sample.

Three problems, all enumerable:
  single  V=4, L=6, one block (T=6), peaked p0 tilted away from toxicity: ~56% of plain samples toxic
  blocks  V=3, L=8, two semi-autoregressive blocks of 4 (T=8, so "late"/"evenly" differ from
          "final"), peaked p0 tilted away from toxicity: ~54% toxic
  dense   V=3, L=6, one block, flat p0 (sharpness 1), no tilt: ~90% toxic, often several toxic tokens
p0 = random_distribution(V, L, seed, sharpness) · exp(-bias · toxic count), renormalised.

The denoiser is `toy.ExactDenoiser`'s exact conditional marginals, precomputed once for all
(V + 1)**L partially masked states (`TableDenoiser`): the same logits (tests/test_toy_benchmark.py
checks it), a table lookup instead of a scan over all V**L sequences per row, which costs
O(rows · V**L · L) per forward and made a single Best-of-8 cell take minutes.

Methods at budget b (algorithm.md §5-§6): Best-of-N with N = b; SVDD-PM with b candidates per step,
argmax selection (its α = 0: softmax selection at α = 0.25 had a higher toxic rate in all 9
problem × budget cells we tried); FK-steering with b particles, λ = 1/α, resampling every 2 steps
(resampling every step was worse in all 9; every T steps was within 0.007 on single/blocks and worse
on dense);
remask-only and IterRef with the settings below.

IterRef's settings per budget (DEFAULT_ITERREF; the sweeps printed with the results are how they were
chosen): N = 1 proposal per pool, rho = 0.5, schedule "final" (after each block is complete; the exact
reward after the last one), scope "block", alpha = 0.25, and k = the largest number of iterations whose
worst-case rows (every proposal accepted, one pool per iteration) fit in b · T; RefineConfig.budget = b
caps it in any case. With N = 1 every iteration draws exactly one proposal, so the rows are
deterministic: T + k · Σ_points N · (m + scoring forward), m = max(1, round(rho · decoded)); k is an
integer, so IterRef may spend a little less than b · T (printed). N = 1 is the cheapest way to buy MH
steps: with the uniform MTM weights and pool reuse the chain is the same whatever N is; only the rows
spent on pool members never examined differ. rho = 0.5 had the lowest mean toxic rate over the three
problems at b = 4 (0.75 was as good; small rho wins on "dense", large rho on the peaked ones).

The efficiency ratio: the budget Best-of-N / FK-steering / SVDD need to reach IterRef's toxic rate at
b = 2 (and 4), interpolating their toxic rate linearly in log2(budget) between measured budgets
("> 8" when never reached), divided by IterRef's budget: > 1 means IterRef needs less compute.

    python benchmarks/toy_exact.py                      # full run (~1.5 min on 2 CPU cores, 10,000 samples/cell)
    python benchmarks/toy_exact.py --quick              # CI smoke (< 20 s)
    python benchmarks/toy_exact.py --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from safegen import toy
from safegen.toy import TableDenoiser
from safegen.baselines import best_of_n, fk_steering, svdd
from safegen.refine import IterRef, RefineConfig
from safegen.sampler import DiffusionSampler, SampleOutput, SamplingConfig

BUDGETS = (1, 2, 4, 8)
METHODS = ("plain", "best_of_n", "svdd", "fk_steering", "remask_only", "iterref")
DEFAULT_ALPHA = 0.25
FK_EVERY = 2
SVDD_ALPHA = 0.0
SWEEP_BUDGET = 4  # the budget at which the IterRef sweeps run


# ----------------------------------------------------------------------------- the toy problem
@dataclass(frozen=True)
class Setup:
    name: str
    V: int
    L: int
    block_length: int
    toxic: tuple = (0,)
    sharpness: float = 3.0  # random_distribution's sharpness: how peaked p0 is
    bias: float = 1.0  # p0 tilted by exp(-bias · toxic count): the base model avoids toxicity a bit
    seed: int = 1

    @property
    def T(self) -> int:
        return self.L  # one token per step: the regime in which plain sampling is exact

    def describe(self) -> str:
        blocks = self.L // self.block_length
        return (f"V={self.V}, L={self.L} ({self.V ** self.L} sequences), {blocks} block(s) of "
                f"{self.block_length}, T={self.T}, toxic tokens {list(self.toxic)}, p0 = "
                f"random_distribution(seed={self.seed}, sharpness={self.sharpness})"
                + (f" · exp(-{self.bias} · toxic count)" if self.bias else ""))


SETUPS = (
    Setup("single", V=4, L=6, block_length=6, sharpness=3.0, bias=1.0),
    Setup("blocks", V=3, L=8, block_length=4, sharpness=3.0, bias=2.0),
    Setup("dense", V=3, L=6, block_length=6, sharpness=1.0, bias=0.0),
)


def make_p0(setup: Setup) -> torch.Tensor:
    base = toy.random_distribution(setup.V, setup.L, seed=setup.seed, sharpness=setup.sharpness)
    if not setup.bias:
        return base
    values = toy.toxic_count_reward(setup.V, setup.L, toxic=setup.toxic).values
    return toy.target(base, values, 1.0 / setup.bias)  # p0 · exp(-bias · count), normalised


def sampling_config(setup: Setup) -> SamplingConfig:
    """One token per step, random order, temperature 1: plain sampling is exact for p0."""
    return SamplingConfig(max_new_tokens=setup.L, steps=setup.T, block_length=setup.block_length,
                          temperature=1.0, remasking="random")


class Problem:
    """A setup made concrete at a temperature α: p0, the reward, the target, the sampler."""

    def __init__(self, setup: Setup, alpha: float, denoiser: Optional[TableDenoiser] = None):
        self.setup, self.alpha = setup, alpha
        V, L = setup.V, setup.L
        self.reward = toy.toxic_count_reward(V, L, toxic=setup.toxic)
        self.p0 = make_p0(setup)
        self.p_star = toy.target(self.p0, self.reward.values, alpha)
        self.cfg = sampling_config(setup)
        self.denoiser = denoiser if denoiser is not None else TableDenoiser(self.p0, V, L)
        self.sampler = DiffusionSampler(self.denoiser, V, self.cfg)

    def exact_stats(self, p: torch.Tensor) -> dict:
        v = self.reward.values
        return {"mean_reward": float((p * v).sum()), "toxic_rate": float(p[v < 0].sum())}


# ----------------------------------------------------------------------------- IterRef settings
def refined_points(cfg: SamplingConfig, rc: RefineConfig):
    """(block, step) of every point where the kernel applies."""
    S = cfg.steps_per_block
    return [(b, s) for b in range(cfg.n_blocks) for s in range(1, S + 1) if rc.applies(b, s, S)]


def pool_rows(cfg: SamplingConfig, rc: RefineConfig, block: int, step: int) -> int:
    """Denoiser rows of one pool at a point: N · (m re-denoising sub-steps + one scoring forward
    unless nothing is masked any more). Mirrors IterRef.pool_cost."""
    S = cfg.steps_per_block
    done = step * cfg.tokens_per_step
    decoded = done if rc.scope == "block" else block * cfg.block_length + done
    m = max(1, int(torch.round(torch.tensor(rc.rho * decoded, dtype=torch.float64))))
    rate = cfg.tokens_per_step
    scoring = 0 if (block == cfg.n_blocks - 1 and step == S) else 1
    return rc.n_proposals * ((m + rate - 1) // rate + scoring)


def worst_case_rows(cfg: SamplingConfig, rc: RefineConfig) -> int:
    """Rows per sample if every examined proposal is accepted (one pool per iteration)."""
    return cfg.steps + rc.iterations * sum(pool_rows(cfg, rc, b, s) for b, s in refined_points(cfg, rc))


def fit_iterations(cfg: SamplingConfig, rc: RefineConfig, budget: float) -> int:
    """The largest k whose worst-case rows fit in budget · T (0 when not even one fits)."""
    per_k = worst_case_rows(cfg, replace(rc, iterations=1)) - cfg.steps
    return max(0, int((budget * cfg.steps - cfg.steps) // per_k)) if per_k > 0 else 0


@dataclass(frozen=True)
class IterRefChoice:
    """IterRef's settings at a budget; k is fitted to the budget unless given."""

    n_proposals: int = 1
    rho: float = 0.5
    schedule: str = "final"
    start: float = 0.75
    every: int = 1
    iterations: Optional[int] = None  # None: the largest k whose worst case fits the budget
    selection: str = "mh"

    def config(self, cfg: SamplingConfig, alpha: float, budget: float) -> RefineConfig:
        rc = RefineConfig(n_proposals=self.n_proposals, iterations=1, rho=self.rho, alpha=alpha,
                          schedule=self.schedule, start=self.start, every=self.every,
                          selection=self.selection, budget=budget)
        k = self.iterations if self.iterations is not None else fit_iterations(cfg, rc, budget)
        return rc.updated(iterations=k)


DEFAULT_ITERREF = IterRefChoice()


# ----------------------------------------------------------------------------- running a cell
@dataclass(frozen=True)
class Task:
    setup: str
    table: str  # "main" or a sweep's name
    method: str
    budget: int
    alpha: float
    choice: IterRefChoice = DEFAULT_ITERREF
    label: str = ""


def run_method(problem: Problem, method: str, budget: int, samples: int, seed: int,
               choice: IterRefChoice = DEFAULT_ITERREF) -> tuple[dict, SampleOutput]:
    sampler, reward, alpha = problem.sampler, problem.reward, problem.alpha
    ids = torch.empty((samples, 0), dtype=torch.long)
    if method == "plain":
        params = {}
        run = lambda: sampler.run(ids, seeds=seed)  # noqa: E731
    elif method == "best_of_n":
        params = {"N": budget}
        run = lambda: best_of_n(sampler, ids, reward, n=budget, seeds=seed)  # noqa: E731
    elif method == "svdd":
        params = {"M": budget, "alpha": SVDD_ALPHA}
        run = lambda: svdd(sampler, ids, reward, n_candidates=budget, alpha=SVDD_ALPHA, seeds=seed)  # noqa: E731
    elif method == "fk_steering":
        params = {"K": budget, "every": FK_EVERY, "lam": 1 / alpha}
        run = lambda: fk_steering(sampler, ids, reward, n_particles=budget, every=FK_EVERY,  # noqa: E731
                                  lam=1 / alpha, seeds=seed)
    elif method in ("iterref", "remask_only"):
        if method == "remask_only":
            choice = replace(choice, selection="remask_only")
        rc = choice.config(problem.cfg, alpha, budget)
        params = {"N": rc.n_proposals, "k": rc.iterations, "rho": rc.rho, "schedule": rc.schedule,
                  "selection": rc.selection, "alpha": alpha}
        if rc.schedule == "late":
            params["start"] = rc.start
        if rc.schedule == "evenly":
            params["every"] = rc.every
        hook = IterRef(rc, reward)
        run = lambda: sampler.run(ids, seeds=seed, hook=hook)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    seqs = out.sequences
    if seqs.shape != (samples, problem.setup.L):
        raise RuntimeError(f"{method}: expected ({samples}, {problem.setup.L}) sequences, got {tuple(seqs.shape)}")
    r = problem.reward(seqs)
    T = problem.cfg.steps
    proposed = float(out.proposed.sum())
    cell = {
        "method": method, "budget": budget, "params": params, "samples": samples,
        "mean_reward": float(r.mean()), "toxic_rate": float((r < 0).double().mean()),
        "tv": toy.tv_distance(seqs, problem.p_star, problem.setup.V),
        "rows_mean": float(out.rows.mean()), "rows_max": float(out.rows.max()),
        "rows_budget": float(budget * T), "within_budget": bool(float(out.rows.max()) <= budget * T + 1e-9),
        "reward_calls_mean": float(out.reward_calls.mean()),
        "accept_rate": float(out.accepted.sum()) / proposed if proposed > 0 else None,
        "seconds": seconds,
    }
    return cell, out


# ----------------------------------------------------------------------------- the plan
def nk_pairs(total: int) -> list[tuple[int, int]]:
    """(N, k) with N · k = total, N ascending."""
    return [(n, total // n) for n in range(1, total + 1) if total % n == 0]


def plan(setups, alpha: float, budgets, sweep_setups=None) -> list[Task]:
    """Every cell to run: the main grid of each setup, then the IterRef sweeps of the setups named
    in `sweep_setups` (None: all)."""
    tasks = []
    for s in setups:
        tasks.append(Task(s.name, "main", "plain", 1, alpha))
        for b in budgets:
            for m in METHODS[1:]:
                tasks.append(Task(s.name, "main", m, b, alpha))
        if sweep_setups is not None and s.name not in sweep_setups:
            continue
        B = SWEEP_BUDGET
        total = DEFAULT_ITERREF.config(sampling_config(s), alpha, B).iterations
        for n, k in nk_pairs(total):
            tasks.append(Task(s.name, "N_k", "iterref", B, alpha,
                              replace(DEFAULT_ITERREF, n_proposals=n, iterations=k), f"N={n}, k={k}"))
        for rho in (0.2, 0.35, 0.5, 0.75, 1.0):
            tasks.append(Task(s.name, "rho", "iterref", B, alpha, replace(DEFAULT_ITERREF, rho=rho),
                              f"rho={rho}"))
        for sched in ("final", "late", "evenly"):
            for b in (B, 8):
                tasks.append(Task(s.name, "schedule", "iterref", b, alpha,
                                  replace(DEFAULT_ITERREF, schedule=sched), sched))
        for sel in ("mh", "greedy", "remask_only"):
            # greedy takes the best of a pool: it needs N > 1 to differ from mh at alpha -> 0
            n = 1 if sel != "greedy" else 2
            tasks.append(Task(s.name, "selection", "iterref", B, alpha,
                              replace(DEFAULT_ITERREF, selection=sel, n_proposals=n), f"{sel} (N={n})"))
        for a in (0.5, 0.25, 0.1):
            for b in (2, B):
                tasks.append(Task(s.name, "alpha", "iterref", b, a, DEFAULT_ITERREF, f"alpha={a}"))
    return tasks


# ----------------------------------------------------------------------------- efficiency
def budget_to_reach(curve: list[tuple[float, float]], target: float):
    """The budget at which a toxic-rate curve [(budget, rate)] first gets to `target` or below,
    interpolating the rate linearly in log2(budget) between measured budgets. None: never (> max)."""
    curve = sorted(curve)
    if curve[0][1] <= target:
        return curve[0][0]
    for (b0, r0), (b1, r1) in zip(curve, curve[1:]):
        if r1 <= target:
            f = (r0 - target) / (r0 - r1) if r0 != r1 else 1.0
            return 2 ** (math.log2(b0) + f * (math.log2(b1) - math.log2(b0)))
    return None


def simulated_floor(p: torch.Tensor, n: int, reps: int = 20, seed: int = 0) -> float:
    """Mean TV of n exact (multinomial) samples of p to p, over `reps` draws: the noise floor
    without toy.expected_tv_noise's normal approximation, which overestimates it when many
    sequences have n·p << 1."""
    g = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(reps):
        counts = torch.bincount(torch.multinomial(p.double(), n, replacement=True, generator=g),
                                minlength=p.numel()).double()
        tvs.append(0.5 * float((counts / n - p.double()).abs().sum()))
    return sum(tvs) / reps


def efficiency(cells: list[dict], at_budgets=(2, 4)) -> list[dict]:
    rows = []
    main = {(c["method"], c["budget"]): c for c in cells}
    plain = main[("plain", 1)]["toxic_rate"]
    for at in at_budgets:
        if ("iterref", at) not in main:
            continue
        target = main[("iterref", at)]["toxic_rate"]
        for m in ("best_of_n", "fk_steering", "svdd"):
            curve = [(b, c["toxic_rate"]) for (mm, b), c in main.items() if mm == m] or [(1, plain)]
            need = budget_to_reach(curve, target)
            max_b = max(b for b, _ in curve)
            rows.append({"iterref_budget": at, "iterref_toxic_rate": target, "baseline": m,
                         "budget_needed": need, "reached": need is not None,
                         "text": f"> {max_b}" if need is None else f"{need:.2f}",
                         "ratio": None if need is None else need / at})
    return rows


# ----------------------------------------------------------------------------- report
def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()
                     if k not in ("selection", "alpha") or (k == "selection" and v not in ("mh", "remask_only")))


HEAD = ("| method | b | settings | rows/sample mean (max) | ≤ b·T | reward calls/sample | mean reward "
        "| toxic rate | TV to p* | accept | s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


def _row(c: dict, label: Optional[str] = None) -> str:
    ok = "yes" if c["within_budget"] else "**NO**"
    return (f"| {label or c['method']} | {c['budget']} | {_params(c['params'])} | {c['rows_mean']:.1f} "
            f"({c['rows_max']:.0f}) | {ok} ({c['rows_budget']:.0f}) | {c['reward_calls_mean']:.1f} | "
            f"{c['mean_reward']:.3f} | {c['toxic_rate']:.3f} | {c['tv']:.3f} | {_fmt(c['accept_rate'], 2)} | "
            f"{c['seconds']:.1f} |\n")


SWEEP_TITLES = {
    "N_k": "IterRef: proposals N against iterations k at fixed N·k (worst-case rows fixed)",
    "rho": "IterRef: re-mask ratio rho",
    "schedule": "IterRef: where to refine (k fitted to the budget per schedule)",
    "selection": "IterRef: selection rule",
    "alpha": "IterRef: temperature alpha (TV is to that alpha's own target)",
}


def markdown(result: dict) -> str:
    cfg = result["config"]
    out = [f"Samples per cell: {cfg['samples']}, seed {cfg['seed']}, alpha = {cfg['alpha']} "
           f"(target p* ∝ p0·exp(r/alpha), r = -toxic count), budgets {cfg['budgets']} × T rows. "
           f"IterRef default: {cfg['iterref_default']}. SVDD alpha = {cfg['svdd_alpha']} (argmax); "
           f"FK-steering every {cfg['fk_every']} steps, lam = 1/alpha. 1 s.e. of a toxic rate ≤ "
           f"{0.5 / math.sqrt(cfg['samples']):.3f}.\n"]
    for name, res in result["setups"].items():
        st, tg = res["p0"], res["target"]
        out.append(f"\n### {name}: {res['description']}\n\n"
                   f"Exact: p0 toxic rate {st['toxic_rate']:.3f}, mean reward {st['mean_reward']:.3f}; "
                   f"p* toxic rate {tg['toxic_rate']:.3f}, mean reward {tg['mean_reward']:.3f}; "
                   f"TV(p0, p*) = {res['tv_p0_target']:.3f}. Noise floor, E[TV] of {cfg['samples']} exact "
                   f"samples of p*: {res['noise_floor']:.3f} by toy.expected_tv_noise, "
                   f"{res['noise_floor_sim']:.3f} simulated (multinomial draws). Plain samples: TV to p0 "
                   f"{res['plain_tv_p0']:.3f} (floor {res['noise_floor_p0']:.3f} / "
                   f"{res['noise_floor_p0_sim']:.3f} simulated).\n\n")
        out.append(HEAD + "".join(_row(c) for c in res["main"]))
        eff = res["efficiency"]
        if eff:
            out.append("\nBudget (× T rows) a baseline needs to reach IterRef's toxic rate "
                       "(log-linear interpolation between measured budgets):\n\n"
                       "| IterRef at b | its toxic rate | baseline | budget needed | ratio to IterRef's b |\n"
                       "|---|---|---|---|---|\n")
            for e in eff:
                out.append(f"| {e['iterref_budget']} | {e['iterref_toxic_rate']:.3f} | {e['baseline']} | "
                           f"{e['text']} | {_fmt(e['ratio'], 2) if e['reached'] else '> ' + format(8 / e['iterref_budget'], 'g')} |\n")
        for sweep, cells in res["sweeps"].items():
            out.append(f"\n{SWEEP_TITLES[sweep]}:\n\n")
            out.append(HEAD.replace("| method |", "| variant |") +
                       "".join(_row(c, c["label"]) for c in cells))
    return "".join(out)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=None, help="samples per cell (default 10000; 150 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="target temperature")
    ap.add_argument("--quick", action="store_true", help="small, fast configuration for CI smoke (< 20 s)")
    ap.add_argument("--setups", default=",".join(s.name for s in SETUPS), help="comma-separated setup names")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small tensors)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


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
                         "iterref_default": _params(asdict(DEFAULT_ITERREF) | {"iterations": "fitted"}),
                         "threads": args.threads, "torch": torch.__version__},
              "setups": {}}
    for s in setups:
        p = problem(s.name, args.alpha)
        plain = p.sampler.run(torch.empty((samples, 0), dtype=torch.long), seeds=args.seed + 10 ** 6)
        result["setups"][s.name] = {
            "description": s.describe(), "setup": asdict(s), "T": s.T,
            "p0": p.exact_stats(p.p0), "target": p.exact_stats(p.p_star),
            "tv_p0_target": 0.5 * float((p.p0 - p.p_star).abs().sum()),
            "noise_floor": toy.expected_tv_noise(p.p_star, samples),
            "noise_floor_p0": toy.expected_tv_noise(p.p0, samples),
            "noise_floor_sim": simulated_floor(p.p_star, samples),
            "noise_floor_p0_sim": simulated_floor(p.p0, samples),
            "plain_tv_p0": toy.tv_distance(plain.sequences, p.p0, s.V),
            "main": [], "sweeps": {}, "efficiency": []}

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(tasks), file=sys.stderr, desc="toy_exact", unit="cell")
        except ImportError:  # pragma: no cover
            bar = None
    for i, t in enumerate(tasks):
        if bar is not None:
            bar.set_postfix_str(f"{t.setup} {t.table} {t.method} b={t.budget}")
        elif not args.no_progress:
            print(f"[{i + 1}/{len(tasks)}] {t.setup} {t.table} {t.method} b={t.budget}", file=sys.stderr)
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
    for res in result["setups"].values():
        res["efficiency"] = efficiency(res["main"])
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
