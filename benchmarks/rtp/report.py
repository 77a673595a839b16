"""The audit's report: the markdown tables and the two figures."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import SCORERS, THRESHOLD


def _ci(f: dict, digits: int = 3) -> str:
    if f is None or math.isnan(f["point"]):
        return "n/a"
    return f"{f['point']:.{digits}f} [{f['low']:.{digits}f}, {f['high']:.{digits}f}]"


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"Prompts: {results['prompts']} from `{cfg['prompt_file_name']}` x {cfg['generations']} generations; "
             f"G = {cfg['sampling']['max_new_tokens']} tokens, T = {cfg['sampling']['steps']} steps "
             f"(block {cfg['sampling']['block_length']}, temperature {cfg['sampling']['temperature']}); "
             f"model `{cfg['model']}`; guide `{cfg['policy']}`, evaluator `{cfg['evaluator']}`. "
             f"95% bootstrap intervals over prompts ({cfg['resamples']} resamples).", ""]
    methods = results["methods"]
    for scorer, title in (("guide", f"guide `{cfg['policy']}` (steered the methods)"),
                          ("evaluator", f"evaluator `{cfg['evaluator']}` (did not steer)")):
        lines += [f"Scored by the {title}:", "",
                  "| method | budget | rows/sample (max) | EMT [95% CI] | EMT - plain [95% CI] | tox. prob. [95% CI] "
                  "| mean tox. | toxic rate |",
                  "| --- | ---: | ---: | --- | --- | --- | ---: | ---: |"]
        for method, budgets in methods.items():
            for b, e in budgets.items():
                f = e["scorers"][scorer]
                lines.append(
                    f"| {method} | {b} | {e['rows_per_sample']['point']:.1f} ({e['rows_per_sample']['max']:.0f}) "
                    f"| {_ci(f['emt'])} | {_ci(f.get('emt_minus_plain'))} | {_ci(f['toxicity_probability'])} "
                    f"| {f['mean_toxicity']['point']:.3f} | {f['toxic_rate']['point']:.3f} |")
        lines.append("")
    paired = [(m, b, e) for m, budgets in methods.items() for b, e in budgets.items()
              if "emt_minus_uncached" in e["scorers"]["guide"]]
    if paired:
        lines += ["The cached kernel against the same kernel uncached, at the same budget (equal FLOPs), paired by "
                  "prompt (negative: the cached one is less toxic):", "",
                  "| method | budget | guide: EMT diff. [95% CI] | guide: mean tox. diff. | evaluator: EMT diff. [95% CI] "
                  "| evaluator: mean tox. diff. |", "| --- | ---: | --- | --- | --- | --- |"]
        for m, b, e in paired:
            g, v = e["scorers"]["guide"], e["scorers"]["evaluator"]
            lines.append(f"| {m} | {b} | {_ci(g['emt_minus_uncached'])} | {_ci(g['mean_toxicity_minus_uncached'])} "
                         f"| {_ci(v['emt_minus_uncached'])} | {_ci(v['mean_toxicity_minus_uncached'])} |")
        lines.append("")
    lines += ["Compute and diversity (rows: denoiser forward rows per sample; FLOPs x plain: a sample's model "
              "FLOPs over uncached plain sampling's for its prompt, mean (max), which budget b caps at b, for the "
              "cached kernels too; reward: texts the guide scored per sample):", "",
              "| method | budget | rows/sample | FLOPs x plain (max) | reward/sample | accept. | distinct-1 | distinct-2 "
              "| distinct-3 | wall s/sample (median chunk) | CPU s/sample |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, budgets in methods.items():
        for b, e in budgets.items():
            acc = "-" if e["acceptance_rate"] is None else f"{e['acceptance_rate']:.2f}"
            d = e["distinct"]
            fx = e.get("flops_x_plain")
            fx = "n/a" if fx is None else f"{fx['mean']:.2f} ({fx['max']:.2f})"
            lines.append(f"| {method} | {b} | {e['rows_per_sample']['point']:.1f} | {fx} "
                         f"| {e['reward_calls_per_sample']['point']:.1f} | {acc} | {d['1']['point']:.3f} "
                         f"| {d['2']['point']:.3f} | {d['3']['point']:.3f} | {e['seconds_per_sample']:.3f} "
                         f"({e['seconds_per_sample_median_chunk']:.3f}) "
                         f"| {e['cpu_seconds_per_sample']:.3f} |")
    plans = results.get("plans") or {}
    plans = plans.get("iterref") or plans.get("remask_only") or {}
    if plans:
        lines += ["", "IterRef and remask-only plans (the same for both: N proposals, k iterations at each "
                  "listed base step; planned rows per sample, the worst case):", ""]
        for b, p in plans.items():
            lines.append(f"- budget {b}: N={p['n_proposals']}, k={p['iterations']}, rho={p['rho']}, "
                         f"steps {p['points'] or 'none'}, planned rows {p['planned_rows']:.0f}")
    for method, budgets in (results.get("cached_plans") or {}).items():
        lines += ["", f"{method} plans (the dual-cached sampler, at the FLOPs of the uncached budget: planned per "
                  "prompt length n, real positions, as a multiple of the cached plain run):", ""]
        for b, by_length in budgets.items():
            ps = list(by_length.values())
            lines.append(f"- budget {b}: n {min(p['length'] for p in ps)}..{max(p['length'] for p in ps)}, "
                         f"x cached plain {min(p['budget_multiple'] for p in ps):.2f}..{max(p['budget_multiple'] for p in ps):.2f}, "
                         f"k {min(p['iterations'] for p in ps)}..{max(p['iterations'] for p in ps)}, N={ps[0]['n_proposals']}")
    return "\n".join(lines) + "\n"


def compute_x_plain(entry: dict, T_rows: float) -> float:
    """A method's measured compute per sample as a multiple of plain sampling: its FLOPs over plain's,
    prompt by prompt, where FLOPs are counted (LLaDA); else its rows over T."""
    fx = entry.get("flops_x_plain")
    return fx["mean"] if fx is not None else entry["rows_per_sample"]["point"] / T_rows


def plot(results: dict, scores: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, methods = results["config"], results["methods"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for col, scorer in enumerate(SCORERS):
        name = cfg["policy"] if scorer == "guide" else cfg["evaluator"]
        for row, (metric, label) in enumerate((("emt", "Expected Maximum Toxicity"),
                                               ("toxicity_probability", "toxicity probability"))):
            ax = axes[row][col]
            for method, budgets in methods.items():
                xs = [compute_x_plain(e, results["T_rows"]) for e in budgets.values()]
                fs = [e["scorers"][scorer][metric] for e in budgets.values()]
                ys = [f["point"] for f in fs]
                err = [[y - f["low"] for y, f in zip(ys, fs)], [f["high"] - y for y, f in zip(ys, fs)]]
                style = dict(marker="s", markersize=9, linestyle="none") if method == "plain" else dict(marker="o")
                ax.errorbar(xs, ys, yerr=err, capsize=3, label=method, **style)
            ax.set_xscale("log", base=2)
            budgets = sorted({float(b) for bs in methods.values() for b in bs})
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:g}x" for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("compute per sample, x plain (measured FLOPs where counted, else rows; ticks at the budgets)")
            ax.set_ylabel(label)
            ax.set_title(f"{label}: {scorer} `{name}`", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"RTP audit, {results['prompts']} prompts x {cfg['generations']} generations, "
                 f"model {Path(str(cfg['model'])).name} (95% bootstrap CIs)", fontsize=11)
    fig.tight_layout()
    rows_png = out / "toxicity_vs_rows.png"
    fig.savefig(rows_png, dpi=110)
    plt.close(fig)

    after_key = None
    if "iterref" in methods:
        after_key = ("iterref", max(methods["iterref"], key=float))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for col, scorer in enumerate(SCORERS):
        ax = axes[0][col]
        before = scores.get(("plain", 1))
        if before is not None:
            ax.hist(before[scorer], bins=bins, alpha=0.55, label="before: plain sampling")
        if after_key is not None:
            b = after_key[1]
            key = (after_key[0], int(b) if float(b).is_integer() else float(b))
            ax.hist(scores[key][scorer], bins=bins, alpha=0.55, label=f"after: IterRef, budget {b}")
        ax.axvline(THRESHOLD, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel(f"toxicity ({scorer} `{cfg['policy'] if scorer == 'guide' else cfg['evaluator']}`)")
        ax.set_ylabel("generations")
        ax.legend(fontsize=8)
    fig.tight_layout()
    hist_png = out / "toxicity_histograms.png"
    fig.savefig(hist_png, dpi=110)
    plt.close(fig)
    return [rows_png, hist_png]
