"""Exact-denoiser toy benchmark: IterRef against test-time alignment baselines at equal compute.

A known distribution p0 over every sequence of a small vocabulary, a perfect mask predictor for it,
a "toxicity" reward r = -(number of toxic tokens), its blame (1 at each toxic token) and the aligned
target p* ∝ p0 · exp(r / α), enumerated exactly. Two parts:

Exactness (EXACT_SETUPS, alpha 0.5): IterRef with RefineConfig's defaults (only k = 32 and alpha set)
on LLaDA's default sampler (low_confidence order, temperature 1), uniform and targeted re-masking,
N = 1 and 3, one block and three. Per cell: TV to p* against the simulated noise floor, and the
z-score of the mean reward against E_p*[r]. Also the proposals' commit order (refine.PROPOSAL_ORDER)
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
IterRef with uniform re-masking (the paper's kernel) and IterRef with targeted re-masking, with the
settings of DEFAULT_ITERREF / DEFAULT_TARGETED (the sweeps printed with the results are how they
were chosen) and k = the largest number of iterations whose worst-case rows (every proposal
accepted, one pool per iteration) fit in b · T; RefineConfig.budget = b caps it in any case. With
N = 1 every iteration draws one proposal, so the rows are deterministic: T + k · Σ_points N · (m +
scoring forward), m = max(1, round(rho · decoded in scope)); k is an integer, so IterRef may spend a
little less than b · T (printed).

The budget ratio: the budget Best-of-N / FK-steering / SVDD need to reach a method's toxic rate at
b = 2 and 4, interpolating their toxic rate linearly in log2(budget) between measured budgets
("> 8" when never reached), divided by that method's b: > 1 means the method needs less compute.

    python benchmarks/toy_exact.py                      # full run (~5 min on 2 busy CPU cores, 10,000 samples/cell)
    python benchmarks/toy_exact.py --quick              # CI smoke (< 30 s)
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

from safegen import refine, toy
from safegen.toy import TableDenoiser
from safegen.baselines import best_of_n, fk_steering, svdd
from safegen.refine import IterRef, RefineConfig
from safegen.sampler import DiffusionSampler, SampleOutput, SamplingConfig

BUDGETS = (1, 2, 4, 8)
METHODS = ("plain", "best_of_n", "svdd", "fk_steering", "remask_only", "iterref", "iterref_targeted")
BASELINES = ("best_of_n", "fk_steering", "svdd")
DEFAULT_ALPHA = 0.25
FK_EVERY = 2
SVDD_ALPHA = 0.0
SWEEP_BUDGET = 4  # the budget at which the IterRef sweeps run
EXACT_ALPHA, EXACT_K = 0.5, 32
ORDERS = ("max_prob", "low_confidence", "random")  # proposal commit orders compared


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
    remasking: str = "random"  # the base sampler's order; random: plain sampling is exact for p0

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
EXACT_SETUPS = (
    Setup("exact-1", V=3, L=6, block_length=6, sharpness=1.0, bias=0.0, seed=2, remasking="low_confidence"),
    Setup("exact-3", V=3, L=6, block_length=2, sharpness=1.0, bias=0.0, seed=2, remasking="low_confidence"),
)


def make_p0(setup: Setup) -> torch.Tensor:
    base = toy.random_distribution(setup.V, setup.L, seed=setup.seed, sharpness=setup.sharpness)
    if not setup.bias:
        return base
    values = toy.toxic_count_reward(setup.V, setup.L, toxic=setup.toxic).values
    return toy.target(base, values, 1.0 / setup.bias)  # p0 · exp(-bias · count), normalised


def sampling_config(setup: Setup) -> SamplingConfig:
    """One token per step at temperature 1, in the setup's order."""
    return SamplingConfig(max_new_tokens=setup.L, steps=setup.T, block_length=setup.block_length,
                          temperature=1.0, remasking=setup.remasking)


class Problem:
    """A setup made concrete at a temperature α: p0, the reward, the target, the sampler."""

    def __init__(self, setup: Setup, alpha: float, denoiser: Optional[TableDenoiser] = None):
        self.setup, self.alpha = setup, alpha
        V, L = setup.V, setup.L
        self.reward = toy.toxic_count_reward(V, L, toxic=setup.toxic)
        self.blame = toy.toxic_blame(setup.toxic)
        self.p0 = make_p0(setup)
        self.p_star = toy.target(self.p0, self.reward.values, alpha)
        self.cfg = sampling_config(setup)
        self.denoiser = denoiser if denoiser is not None else TableDenoiser(self.p0, V, L)
        self.sampler = DiffusionSampler(self.denoiser, V, self.cfg)

    def exact_stats(self, p: torch.Tensor) -> dict:
        v = self.reward.values
        return {"mean_reward": float((p * v).sum()), "toxic_rate": float(p[v < 0].sum())}

    def measure(self, seqs: torch.Tensor) -> dict:
        r = self.reward(seqs)
        return {"mean_reward": float(r.mean()), "toxic_rate": float((r < 0).double().mean()),
                "tv": toy.tv_distance(seqs, self.p_star, self.setup.V),
                "z": toy.mean_z(r, self.reward.values, self.p_star)}


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
    if block == cfg.n_blocks - 1 and step == S:  # the last point spans the whole answer
        decoded = cfg.max_new_tokens
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
    """IterRef's settings at a budget; k is fitted to the budget unless given. Schedule "last": only
    the point after the last step (the same as "final" with one block)."""

    n_proposals: int = 1
    rho: float = 0.5
    schedule: str = "final"
    start: float = 0.75
    every: int = 1
    iterations: Optional[int] = None  # None: the largest k whose worst case fits the budget
    selection: str = "mh"
    remask: str = "uniform"
    blame_floor: float = RefineConfig.blame_floor

    def config(self, cfg: SamplingConfig, alpha: float, budget: float) -> RefineConfig:
        last = self.schedule == "last"
        rc = RefineConfig(n_proposals=self.n_proposals, iterations=1, rho=self.rho, alpha=alpha,
                          schedule="steps" if last else self.schedule, at_steps=(cfg.steps,) if last else (),
                          start=self.start, every=self.every, selection=self.selection, budget=budget,
                          remask=self.remask, blame_floor=self.blame_floor)
        k = self.iterations if self.iterations is not None else fit_iterations(cfg, rc, budget)
        return rc.updated(iterations=k)


DEFAULT_ITERREF = IterRefChoice()
DEFAULT_TARGETED = IterRefChoice(remask="targeted", rho=0.5, blame_floor=0.05)


# ----------------------------------------------------------------------------- running a cell
@dataclass(frozen=True)
class Task:
    setup: str
    table: str  # "main" or a sweep's name
    method: str
    budget: int
    alpha: float
    choice: Optional[IterRefChoice] = None  # None: the method's default
    label: str = ""


def run_method(problem: Problem, method: str, budget: int, samples: int, seed: int,
               choice: Optional[IterRefChoice] = None) -> tuple[dict, SampleOutput]:
    sampler, reward, alpha = problem.sampler, problem.reward, problem.alpha
    if choice is None:
        choice = DEFAULT_TARGETED if method == "iterref_targeted" else DEFAULT_ITERREF
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
    elif method in ("iterref", "iterref_targeted", "remask_only"):
        if method == "remask_only":
            choice = replace(choice, selection="remask_only")
        rc = choice.config(problem.cfg, alpha, budget)
        params = {"N": rc.n_proposals, "k": rc.iterations, "rho": rc.rho,
                  "schedule": "last" if choice.schedule == "last" else rc.schedule, "selection": rc.selection}
        if rc.schedule == "late":
            params["start"] = rc.start
        if rc.schedule == "evenly":
            params["every"] = rc.every
        if rc.remask == "targeted":
            params["floor"] = rc.blame_floor
        hook = IterRef(rc, reward, problem.blame)
        run = lambda: sampler.run(ids, seeds=seed, hook=hook)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    seqs = out.sequences
    if seqs.shape != (samples, problem.setup.L):
        raise RuntimeError(f"{method}: expected ({samples}, {problem.setup.L}) sequences, got {tuple(seqs.shape)}")
    T = problem.cfg.steps
    proposed = float(out.proposed.sum())
    cell = {
        "method": method, "budget": budget, "params": params, "samples": samples, **problem.measure(seqs),
        "rows_mean": float(out.rows.mean()), "rows_max": float(out.rows.max()),
        "rows_budget": float(budget * T), "within_budget": bool(float(out.rows.max()) <= budget * T + 1e-9),
        "reward_calls_mean": float(out.reward_calls.mean()),
        "accept_rate": float(out.accepted.sum()) / proposed if proposed > 0 else None,
        "seconds": seconds,
    }
    return cell, out


def exactness_cell(problem: Problem, remask: str, n_proposals: int, order: str, samples: int,
                   seed: int) -> dict:
    """IterRef with RefineConfig's defaults but k, alpha, remask, N; proposals in `order`."""
    rc = RefineConfig(iterations=EXACT_K, alpha=problem.alpha, remask=remask, n_proposals=n_proposals)
    hook = IterRef(rc, problem.reward, problem.blame)
    shipped, refine.PROPOSAL_ORDER = refine.PROPOSAL_ORDER, order
    try:
        t0 = time.perf_counter()
        out = problem.sampler.run(torch.empty((samples, 0), dtype=torch.long), seeds=seed, hook=hook)
    finally:
        refine.PROPOSAL_ORDER = shipped
    return {"setup": problem.setup.name, "remask": remask, "N": n_proposals, "order": order,
            "k": EXACT_K, **problem.measure(out.sequences), "rows_mean": float(out.rows.mean()),
            "accept_rate": float(out.accepted.sum() / out.proposed.sum()),
            "seconds": time.perf_counter() - t0}


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
    cells = [(s, rm, n, refine.PROPOSAL_ORDER) for s in EXACT_SETUPS for rm in ("uniform", "targeted")
             for n in (1, 3)]
    if not quick:
        cells += [(s, "uniform", 1, o) for s in EXACT_SETUPS for o in ORDERS if o != refine.PROPOSAL_ORDER]
    return cells


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
    """For every method at b in at_budgets: the budget each baseline needs to reach its toxic rate."""
    rows = []
    main = {(c["method"], c["budget"]): c for c in cells}
    plain = main[("plain", 1)]["toxic_rate"]
    for method in METHODS[1:]:
        for at in at_budgets:
            if (method, at) not in main:
                continue
            target = main[(method, at)]["toxic_rate"]
            for m in BASELINES:
                curve = [(b, c["toxic_rate"]) for (mm, b), c in main.items() if mm == m] or [(1, plain)]
                need = budget_to_reach(curve, target)
                rows.append({"method": method, "budget": at, "toxic_rate": target, "baseline": m,
                             "budget_needed": need, "max_budget": max(b for b, _ in curve),
                             "ratio": None if need is None else need / at})
    return rows


def targets(cells: list[dict], setup: str) -> dict:
    """The issue's figures: targeted IterRef at b = 4 below every baseline at b = 4; on "dense",
    targeted at b = 2 at or below Best-of-N at b = 8."""
    main = {(c["method"], c["budget"]): c["toxic_rate"] for c in cells}
    t4 = main.get(("iterref_targeted", 4))
    out = {f"below_{m}_at_4": t4 < main[(m, 4)] for m in BASELINES if t4 is not None and (m, 4) in main}
    if setup == "dense" and ("iterref_targeted", 2) in main and ("best_of_n", 8) in main:
        out["b2_reaches_best_of_n_8"] = main[("iterref_targeted", 2)] <= main[("best_of_n", 8)]
    return out


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
        "| toxic rate | TV to p* | z | accept | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def _row(c: dict, label: Optional[str] = None) -> str:
    ok = "yes" if c["within_budget"] else "**NO**"
    return (f"| {label or c['method']} | {c['budget']} | {_params(c['params'])} | {c['rows_mean']:.1f} "
            f"({c['rows_max']:.0f}) | {ok} ({c['rows_budget']:.0f}) | {c['reward_calls_mean']:.1f} | "
            f"{c['mean_reward']:.3f} | {c['toxic_rate']:.3f} | {c['tv']:.3f} | {c['z']:+.1f} | "
            f"{_fmt(c['accept_rate'], 2)} | {c['seconds']:.1f} |\n")


SWEEP_TITLES = {
    "N_k": "Targeted IterRef: proposals N against iterations k at fixed N·k (worst-case rows fixed)",
    "rho": "Targeted IterRef: re-mask ratio rho",
    "floor": "Targeted IterRef: blame floor ε (1 is uniform re-masking)",
    "schedule": "Targeted IterRef: where to refine (k fitted to the budget per schedule; last: only after the last step)",
    "alpha": "Targeted IterRef: temperature alpha (TV and z are to that alpha's own target)",
}


def exactness_markdown(result: dict) -> str:
    ex = result["exactness"]
    out = [f"\n### Exactness (IterRef defaults, k = {EXACT_K}, alpha = {EXACT_ALPHA}, LLaDA's low_confidence "
           "base order, temperature 1)\n\n"]
    for name, info in ex["setups"].items():
        out.append(f"- {name}: {info['description']}; p* toxic rate {info['target']['toxic_rate']:.3f}; "
                   f"simulated noise floor {info['noise_floor_sim']:.3f}; plain samples (low_confidence) TV to "
                   f"p0 {info['plain_tv_p0']:.3f} (floor {info['noise_floor_p0_sim']:.3f})\n")
    out.append("\n| setup | re-mask | N | proposal order | TV to p* | floor | z of mean reward | toxic rate "
               "| accept | rows/sample | s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    for c in ex["cells"]:
        floor = ex["setups"][c["setup"]]["noise_floor_sim"]
        out.append(f"| {c['setup']} | {c['remask']} | {c['N']} | {c['order']} | {c['tv']:.3f} | {floor:.3f} | "
                   f"{c['z']:+.2f} | {c['toxic_rate']:.3f} | {c['accept_rate']:.2f} | {c['rows_mean']:.0f} | "
                   f"{c['seconds']:.1f} |\n")
    return "".join(out)


def efficiency_markdown(eff: list[dict]) -> str:
    out = ["\nBudget ratio: the budget (× T rows) each baseline needs to reach a method's toxic rate, divided "
           "by the method's b (log-linear interpolation; > 1: the method needs less compute):\n\n"
           "| method | b | its toxic rate | " + " | ".join(BASELINES) + " |\n|---|---|---|" + "---|" * len(BASELINES) + "\n"]
    by = {}
    for e in eff:
        by.setdefault((e["method"], e["budget"], e["toxic_rate"]), {})[e["baseline"]] = e
    for (method, b, rate), row in by.items():
        cols = []
        for m in BASELINES:
            e = row.get(m)
            if e is None or e["baseline"] == method:
                cols.append("-")
            elif e["ratio"] is None:
                cols.append(f"> {e['max_budget'] / b:g} (> {e['max_budget']})")
            else:
                cols.append(f"{e['ratio']:.2f} ({e['budget_needed']:.2f})")
        out.append(f"| {method} | {b} | {rate:.3f} | " + " | ".join(cols) + " |\n")
    return "".join(out)


def markdown(result: dict) -> str:
    cfg = result["config"]
    out = [f"Samples per cell: {cfg['samples']}, seed {cfg['seed']}, alpha = {cfg['alpha']} "
           f"(target p* ∝ p0·exp(r/alpha), r = -toxic count), budgets {cfg['budgets']} × T rows. "
           f"IterRef (uniform): {cfg['iterref_default']}; targeted: {cfg['targeted_default']}. "
           f"SVDD alpha = {cfg['svdd_alpha']} (argmax); FK-steering every {cfg['fk_every']} steps, lam = "
           f"1/alpha. 1 s.e. of a toxic rate ≤ {0.5 / math.sqrt(cfg['samples']):.3f}; z: the mean reward's "
           f"distance to E_p*[r] in standard errors.\n"]
    if result.get("exactness"):
        out.append(exactness_markdown(result))
    for name, res in result["setups"].items():
        st, tg = res["p0"], res["target"]
        out.append(f"\n### {name}: {res['description']}\n\n"
                   f"Exact: p0 toxic rate {st['toxic_rate']:.3f}, mean reward {st['mean_reward']:.3f}; "
                   f"p* toxic rate {tg['toxic_rate']:.3f}, mean reward {tg['mean_reward']:.3f}; "
                   f"TV(p0, p*) = {res['tv_p0_target']:.3f}. Noise floor, E[TV] of {cfg['samples']} exact "
                   f"samples of p*: {res['noise_floor_sim']:.3f} (simulated multinomial draws). Plain samples: "
                   f"TV to p0 {res['plain_tv_p0']:.3f} (floor {res['noise_floor_p0_sim']:.3f}).\n\n")
        out.append(HEAD + "".join(_row(c) for c in res["main"]))
        if res["efficiency"]:
            out.append(efficiency_markdown(res["efficiency"]))
        if res["targets"]:
            out.append("\nTargets: " + ", ".join(f"{k} {'yes' if v else '**no**'}" for k, v in res["targets"].items()) + "\n")
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
                         "iterref_default": _params(asdict(DEFAULT_ITERREF) | {"iterations": "fitted"}),
                         "targeted_default": _params(asdict(DEFAULT_TARGETED) | {"iterations": "fitted"}),
                         "proposal_order": refine.PROPOSAL_ORDER,
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
