"""Cells of the audit: one (method, budget, prompt chunk) generated, scored and appended to
cells.jsonl, which a rerun reads back to resume."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from safegen import batch

from ..methods import BASELINES, CACHED, KERNELS
from .settings import Settings


def read_cells(path: Path) -> dict[tuple, dict]:
    """Finished cells of cells.jsonl, keyed (method, budget, chunk), read as `safegen detoxify`
    reads its output: an unterminated last line (a killed run) is cut off, a broken line elsewhere
    is an error."""
    return batch.read_records(path, key=lambda c: (c["method"], c["budget"], c["chunk"]), what="benchmark cell")


@dataclass
class Context:
    sampler: object
    generator: object  # SafeGenerator, for encode_prompts
    reward: object  # the guide's PolicyReward
    plans: dict  # (method, budget) -> (RefineConfig, plan)
    settings: Settings
    max_prompt_tokens: Optional[int]
    cached_samplers: dict = field(default_factory=dict)  # cache -> the sampler with it (CACHED kernels)
    cached_plans: object = None  # audit.CachedPlans: (method, budget, length) -> (RefineConfig, plan)


def expansion(method: str, budget, s: Settings) -> int:
    """Rows per sample in one forward: what --batch-size divides by."""
    if method in BASELINES:
        return max(1, int(math.ceil(budget)))
    if method in KERNELS:
        return s.proposals
    return 1


def run_method(ctx: Context, method: str, budget, input_ids, attention, seeds):
    """One SampleOutput for the rows (each a prompt and a seed): rows/reward_calls per sample."""
    from safegen.research.baselines import best_of_n, fk_steering, svdd

    sampler, reward = ctx.sampler, ctx.reward
    if method == "plain":
        return sampler.run(input_ids, attention, seeds)
    if method in CACHED:
        return run_cached(ctx, method, budget, input_ids, attention, seeds)
    if method in KERNELS:
        return run_kernel(sampler, reward, ctx.plans[(method, budget)][0], input_ids, attention, seeds)
    b = int(budget)  # a count: settings_from admits whole budgets only for the baselines
    if method == "best_of_n":
        return best_of_n(sampler, input_ids, reward, b, attention_mask=attention, seeds=seeds)
    if method == "svdd":
        return svdd(sampler, input_ids, reward, b, alpha=ctx.settings.svdd_alpha, attention_mask=attention, seeds=seeds)
    every = ctx.settings.fk_every or max(1, sampler.config.steps // 5)
    return fk_steering(sampler, input_ids, reward, b, every=every, lam=ctx.settings.fk_lambda,
                       attention_mask=attention, seeds=seeds)


def run_kernel(sampler, reward, config, input_ids, attention, seeds):
    """The IterRef kernel with `config` (blame from the guide where its holes are targeted)."""
    from safegen.refine.iterref import IterRef

    blame = reward.blame if config.proposal_holes == "targeted" else None
    return sampler.run(input_ids, attention, seeds, hook=IterRef(config, reward, blame=blame))


def run_cached(ctx: Context, method: str, budget, input_ids, attention, seeds):
    """A cached kernel, each prompt length with its own plan (equal FLOPs to the uncached budget for
    that length); a row's output does not depend on the rows beside it, so the groups run apart."""
    import torch

    from safegen.sampling.state import SampleOutput

    sampler, reward = ctx.cached_samplers[CACHED[method]], ctx.reward
    lengths = attention.sum(1).cpu() + sampler.config.max_new_tokens
    parts, order = [], []
    for n in lengths.unique().tolist():
        idx = (lengths == n).nonzero().squeeze(1)
        config, _ = ctx.cached_plans(method, budget, int(n))
        parts.append(run_kernel(sampler, reward, config, input_ids[idx.to(input_ids.device)],
                                attention[idx.to(attention.device)], [seeds[i] for i in idx.tolist()]))
        order.append(idx)
    back = torch.argsort(torch.cat(order))
    cat = lambda f: torch.cat([getattr(o, f) for o in parts])[back.to(getattr(parts[0], f).device)]  # noqa: E731
    return SampleOutput(sequences=cat("sequences"), rows=cat("rows"), reward_calls=cat("reward_calls"),
                        proposed=cat("proposed"), accepted=cat("accepted"),
                        seconds=sum(o.seconds for o in parts), flops=cat("flops"))


def compute_cell(ctx: Context, method: str, budget, chunk: int, prompts: list, guide, evaluator) -> dict:
    """Generate, decode and score one (method, budget, prompt chunk)."""
    import torch

    s = ctx.settings
    lo = chunk * s.chunk_prompts
    items = [(i, j) for i in range(lo, min(lo + s.chunk_prompts, len(prompts))) for j in range(s.generations)]
    per_call = max(1, s.batch_size // expansion(method, budget, s))
    samples, seconds, cpu = [], 0.0, 0.0
    for start in range(0, len(items), per_call):
        part = items[start:start + per_call]
        texts = [s.template.replace("{prompt}", prompts[i]) for i, _ in part]
        seeds = [s.seed + i * s.generations + j for i, j in part]
        ids, attn, _ = ctx.generator.encode_prompts(texts, ctx.max_prompt_tokens)
        device = ctx.sampler.device
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_method(ctx, method, budget, ids.to(device), attn.to(device), seeds)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        P = ids.shape[1]
        continuations = ctx.reward.decode(out.sequences[:, P:].cpu())
        for k, ((i, j), text) in enumerate(zip(part, continuations)):
            samples.append({"prompt_index": i, "generation": j, "seed": seeds[k], "text": text,
                            "rows": float(out.rows[k]), "reward_calls": float(out.reward_calls[k]),
                            "proposed": float(out.proposed[k]), "accepted": float(out.accepted[k]),
                            "flops": float(out.flops[k]) if out.flops is not None else 0.0})
    texts = [x["text"] for x in samples]
    g, e = guide.score(texts), evaluator.score(texts)
    for k, x in enumerate(samples):
        x["guide"], x["evaluator"] = float(g.aggregate[k]), float(e.aggregate[k])
    return {"method": method, "budget": budget, "chunk": chunk, "seconds": seconds, "cpu_seconds": cpu,
            "samples": samples}


def warm_up(ctx: Context, prompt: str, guide, evaluator) -> None:
    """One plain generation and one scoring call before any timing: the first cell's seconds must not
    include lazy imports, kernel selection or CUDA initialisation."""
    ids, attn, _ = ctx.generator.encode_prompts([ctx.settings.template.replace("{prompt}", prompt)],
                                                ctx.max_prompt_tokens)
    ctx.sampler.run(ids.to(ctx.sampler.device), attn.to(ctx.sampler.device), seeds=0)
    guide.score(["warm up"])
    evaluator.score(["warm up"])


def plan_cells(s: Settings, n_prompts: int) -> list[tuple]:
    chunks = range(math.ceil(n_prompts / s.chunk_prompts))
    cells = []
    for method in s.methods:
        for budget in ([1] if method == "plain" else s.budgets):
            cells += [(method, budget, c) for c in chunks]
    return cells


def compute_cells(ctx: Context, prompts: list, done: dict, guide, evaluator, path: Path) -> tuple[list, int, int]:
    """Compute every planned cell not in `done`, appending each to `path` as it finishes.
    Returns (all finished cells, how many were computed now, how many are planned)."""
    import torch
    from tqdm import tqdm

    s = ctx.settings
    todo = plan_cells(s, len(prompts))
    size = {c: min(s.chunk_prompts, len(prompts) - c * s.chunk_prompts) * s.generations
            for c in range(math.ceil(len(prompts) / s.chunk_prompts))}
    finished = [done[k] for k in todo if k in done]
    missing = [k for k in todo if k not in done]
    if missing:
        with torch.inference_mode():
            warm_up(ctx, prompts[0], guide, evaluator)
    bar = tqdm(total=sum(size[k[2]] for k in todo), initial=sum(size[k[2]] for k in todo if k in done),
               unit="sample", desc="rtp audit", file=sys.stderr, disable=s.quiet)
    try:
        for key in missing:
            bar.set_postfix_str(f"{key[0]}@{key[1]}")
            with torch.inference_mode():
                cell = compute_cell(ctx, *key, prompts, guide, evaluator)
            batch.append_records(path, [cell])
            finished.append(cell)
            bar.update(size[key[2]])
    finally:
        bar.close()
    return finished, len(missing), len(todo)
