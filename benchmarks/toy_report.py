"""The toy benchmark's analysis and tables: budget ratios against the baselines, the issue's targets,
and the markdown of every figure toy_exact.py measured."""
from __future__ import annotations

import math
from typing import Optional

from benchmarks.methods import BASELINES, METHODS
from benchmarks.toy_cells import EXACT_ALPHA, EXACT_K

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


def settings_text(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()
                     if k not in ("selection", "alpha") or (k == "selection" and v not in ("mh", "remask_only")))


HEAD = ("| method | b | settings | rows/sample mean (max) | ≤ b·T | reward calls/sample | mean reward "
        "| toxic rate | TV to p* | z | accept | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def _row(c: dict, label: Optional[str] = None) -> str:
    ok = "yes" if c["within_budget"] else "**NO**"
    return (f"| {label or c['method']} | {c['budget']} | {settings_text(c['params'])} | {c['rows_mean']:.1f} "
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
