"""From the cells' per-sample records to the audit's figures, per method and budget."""
from __future__ import annotations

import numpy as np

from ..methods import RTP_METHODS, UNCACHED_OF
from .metrics import SCORERS, bootstrap_ci, bootstrap_indices, distinct_n, per_prompt
from .settings import BenchmarkError, Settings


def flops_ratio(flops: np.ndarray, plain: dict | None) -> dict | None:
    if plain is None or not (plain["flops"] > 0).all():
        return None
    r = flops / plain["flops"]
    return {"mean": float(r.mean()), "max": float(r.max()), "min": float(r.min())}


def aggregate(cells: list[dict], s: Settings, n_prompts: int, T_rows: float) -> tuple[dict, dict]:
    """(figures[method][budget] with budgets as strings (JSON keys), per-generation scores[(method, budget)])."""
    idx = bootstrap_indices(n_prompts, s.resamples, s.seed)
    by_key: dict[tuple, list] = {}
    seconds: dict[tuple, float] = {}
    cpu: dict[tuple, float] = {}
    chunk_rates: dict[tuple, list] = {}
    for cell in cells:
        key = (cell["method"], cell["budget"])
        by_key.setdefault(key, []).extend(cell["samples"])
        seconds[key] = seconds.get(key, 0.0) + cell["seconds"]
        cpu[key] = cpu.get(key, 0.0) + cell.get("cpu_seconds", float("nan"))
        chunk_rates.setdefault(key, []).append(cell["seconds"] / max(1, len(cell["samples"])))

    def grid(samples, field):
        a = np.full((n_prompts, s.generations), np.nan)
        for x in samples:
            # Cells written before FLOPs were recorded count 0 (as the batch summary does).
            a[x["prompt_index"], x["generation"]] = x.get(field, 0.0) if field == "flops" else x[field]
        if np.isnan(a).any():
            raise BenchmarkError(f"missing samples for {field}: the cell file is incomplete")
        return a

    tables = {key: {f: grid(v, f) for f in ("guide", "evaluator", "rows", "flops", "reward_calls", "proposed", "accepted")}
              for key, v in by_key.items()}
    texts = {key: [[None] * s.generations for _ in range(n_prompts)] for key in by_key}
    for key, v in by_key.items():
        for x in v:
            texts[key][x["prompt_index"]][x["generation"]] = x["text"]
    plain = tables.get(("plain", 1))
    out: dict = {}
    for (method, budget), t in sorted(tables.items(), key=lambda kv: (RTP_METHODS.index(kv[0][0]), kv[0][1])):
        rows = t["rows"]
        entry = {
            "budget": budget, "prompts": n_prompts, "samples": int(rows.size),
            "rows_per_sample": {**bootstrap_ci(rows.mean(1), indices=idx), "max": float(rows.max()),
                                "min": float(rows.min()), "budget_rows": budget * T_rows},
            "flops_per_sample": {**bootstrap_ci(t["flops"].mean(1), indices=idx), "max": float(t["flops"].max())},
            # Each sample's FLOPs over plain sampling's for the same prompt (the budget's unit, uncached):
            # at most b for every method, the cached kernels included; None without FLOPs or plain.
            "flops_x_plain": flops_ratio(t["flops"], plain),
            "reward_calls_per_sample": {**bootstrap_ci(t["reward_calls"].mean(1), indices=idx),
                                        "max": float(t["reward_calls"].max())},
            "acceptance_rate": (float(t["accepted"].sum() / t["proposed"].sum()) if t["proposed"].sum() else None),
            "proposals_per_sample": float(t["proposed"].mean()),
            "seconds": seconds[(method, budget)],
            "seconds_per_sample": seconds[(method, budget)] / rows.size,
            # The median over prompt chunks: robust to a burst of other work on a shared machine.
            "seconds_per_sample_median_chunk": float(np.median(chunk_rates[(method, budget)])),
            # CPU time of this process (all its threads): steadier than wall time on a shared CPU
            # machine, meaningless for GPU work.
            "cpu_seconds_per_sample": cpu[(method, budget)] / rows.size,
            "scorers": {},
            "distinct": {str(n): bootstrap_ci([distinct_n(gens, n) for gens in texts[(method, budget)]], indices=idx)
                         for n in (1, 2, 3)},
        }
        for scorer in SCORERS:
            values = per_prompt(t[scorer])
            figures = {name: bootstrap_ci(v, indices=idx) for name, v in values.items()}
            if plain is not None:
                base = per_prompt(plain[scorer])
                figures["emt_minus_plain"] = bootstrap_ci(values["emt"] - base["emt"], indices=idx)
                figures["toxicity_probability_minus_plain"] = bootstrap_ci(
                    values["toxicity_probability"] - base["toxicity_probability"], indices=idx)
            uncached = tables.get((UNCACHED_OF.get(method), budget))
            if uncached is not None:  # paired by prompt: the same prompts and seeds, at equal FLOPs
                base = per_prompt(uncached[scorer])
                figures["emt_minus_uncached"] = bootstrap_ci(values["emt"] - base["emt"], indices=idx)
                figures["mean_toxicity_minus_uncached"] = bootstrap_ci(
                    values["mean_toxicity"] - base["mean_toxicity"], indices=idx)
            entry["scorers"][scorer] = figures
        out.setdefault(method, {})[str(budget)] = entry
    return out, {key: {sc: t[sc].ravel().tolist() for sc in SCORERS} for key, t in tables.items()}
