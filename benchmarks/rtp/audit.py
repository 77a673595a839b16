"""The audit end to end: prompts, plans, model, the cells (resuming), figures, report; and main()."""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from safegen import batch
from safegen.refine import cost
from safegen.errors import SafegenError

from ..methods import CACHED, KERNELS
from .aggregate import aggregate
from .cells import Context, compute_cells, read_cells
from .plan import equal_flops_plan, plan_refinement
from .report import markdown, plot
from .settings import RTP_DIR_ENV, BenchmarkError, Settings, build_parser, settings_from

FORMAT_VERSION = 1

log = logging.getLogger("toxicity_benchmark")


def load_prompts(s: Settings) -> list[str]:
    """The first s.prompts prompts. A missing prompt file is an error: without data there is no audit."""
    if not s.prompt_file.is_file():
        if s.from_rtp_dir:
            raise BenchmarkError(f"no {s.prompt_file.name} in the RealToxicityPrompts folder {s.prompt_file.parent}: "
                                 f"set {RTP_DIR_ENV} to the folder that holds it, or pass --prompt-file")
        raise BenchmarkError(f"--prompt-file {s.prompt_file}: no such file")
    lines = batch.read_prompts(s.prompt_file, field=s.field)
    if len(lines) < s.prompts:
        log.warning("%s holds %d prompts; using all of them (asked for %d)", s.prompt_file, len(lines), s.prompts)
    return [p.text for p in lines[:s.prompts]]


def prepare_model(s: Settings):
    from safegen.models.loading import DEFAULT_MODEL, PINNED_REVISIONS, load_model

    if s.tiny:
        from safegen.models.tiny import write_tiny_model

        folder = s.out / "tiny-model"
        if not (folder / "config.json").is_file():
            write_tiny_model(folder, seed=s.tiny_seed)
        return load_model(str(folder), quantization="none", device_map=s.device_map), str(folder)
    model_id = s.model or DEFAULT_MODEL
    revision = s.revision or PINNED_REVISIONS.get(model_id)
    return load_model(model_id, quantization=s.quantization, revision=revision, device_map=s.device_map,
                      trust_remote_code=s.trust_remote_code), model_id


def plans_for(s: Settings, sampling, alpha: float) -> dict:
    """(method, budget) -> (RefineConfig, plan) for the IterRef-style methods asked for."""
    plans = {}
    for method, (selection, remask) in KERNELS.items():
        if method in s.methods and method not in CACHED:  # the cached kernels are planned per prompt length
            for b in s.budgets:
                config, plan = plan_refinement(sampling, b, s.proposals, s.rho, alpha, selection, s.scope,
                                               s.refine_points)
                plans[(method, b)] = config.updated(proposal_holes=remask, blame_floor=s.blame_floor), plan
    return plans


class CachedPlans:
    """(method, budget, real length) -> (RefineConfig, plan) of the cached kernels, made when first
    needed (plan.equal_flops_plan) and kept for the results."""

    def __init__(self, s: Settings, sampling, alpha: float, dims):
        self.s, self.sampling, self.alpha, self.dims, self.made = s, sampling, alpha, dims, {}

    def __call__(self, method: str, budget, length: int):
        key = (method, budget, int(length))
        if key not in self.made:
            s = self.s
            selection, remask = KERNELS[method]
            config, plan = equal_flops_plan(self.sampling, CACHED[method], budget, self.dims, int(length),
                                            n_proposals=s.proposals, rho=s.rho, alpha=self.alpha,
                                            selection=selection, scope=s.scope, points=s.refine_points)
            self.made[key] = config.updated(proposal_holes=remask, blame_floor=s.blame_floor), plan
        return self.made[key]

    def summary(self) -> dict:
        out: dict = {}
        for (m, b, n), (c, p) in sorted(self.made.items(), key=lambda kv: (kv[0][0], float(kv[0][1]), kv[0][2])):
            out.setdefault(m, {}).setdefault(str(b), {})[str(n)] = {**json.loads(json.dumps(asdict(c))), **p}
        return out


def write_atomic(path: Path, data: bytes) -> None:
    """A reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _digest(path):
    return batch.file_digest(path) if path else None


def fingerprint_of(s: Settings, prompts: list[str], model_name: str, guide, evaluator, sampling, plans) -> dict:
    return json.loads(json.dumps({
        "format": FORMAT_VERSION,
        "prompt_file": str(s.prompt_file), "prompt_file_name": s.prompt_file.name,
        "prompt_sha256": _digest(s.prompt_file), "field": s.field, "prompts": len(prompts),
        "generations": s.generations, "template": s.template, "seed": s.seed, "chunk_prompts": s.chunk_prompts,
        "methods": s.methods, "budgets": s.budgets,
        "model": s.model or ("tiny" if s.tiny else model_name), "tiny_seed": s.tiny_seed if s.tiny else None,
        "model_weights_sha256": _digest(Path(model_name) / "model.safetensors") if s.tiny else None,
        "revision": s.revision, "quantization": s.quantization,
        "policy": s.policy, "policy_sha256": _digest(guide.source),
        "evaluator": s.evaluator, "evaluator_sha256": _digest(evaluator.source),
        "sampling": asdict(sampling),
        "refinement": {"proposals": s.proposals, "rho": s.rho, "alpha": s.alpha, "scope": s.scope,
                       "points": s.refine_points, "blame_floor": s.blame_floor},
        "plans": {f"{m}@{b}": json.loads(json.dumps(asdict(c), default=list)) for (m, b), (c, _) in plans.items()},
        # The cached kernels: planned per prompt length at the FLOPs of the uncached budget (CachedPlans).
        "cached": {m: CACHED[m] for m in s.methods if m in CACHED},
        "fk_every": s.fk_every, "fk_lambda": s.fk_lambda, "svdd_alpha": s.svdd_alpha, "resamples": s.resamples,
    }))


def run(s: Settings) -> dict:
    """The whole benchmark; returns results (also written to s.out). Raises SafegenError on bad input."""
    import torch

    from safegen.generator import SafeGenerator
    from safegen.policy import load_policy
    from safegen.sampling.factory import make_sampler
    from safegen.sampling.sampler import SamplingConfig

    t_start = time.perf_counter()
    prompts = load_prompts(s)
    guide, evaluator = load_policy(s.policy), load_policy(s.evaluator)
    sampling = SamplingConfig(**s.sampling).validate()
    if guide.source is not None and guide.source == evaluator.source:
        log.warning("the evaluator is the guiding policy: its numbers only show that the methods can game it")
    alpha = s.alpha if s.alpha is not None else guide.alpha
    plans = plans_for(s, sampling, alpha)

    s.out.mkdir(parents=True, exist_ok=True)
    (model, tokenizer, profile), model_name = prepare_model(s)
    cached_plans = None
    if any(m in CACHED for m in s.methods):
        from safegen.models.flops import dims_of

        if dims_of(model) is None:
            raise BenchmarkError(f"--methods {', '.join(m for m in s.methods if m in CACHED)}: the block cache "
                                 f"and its FLOP budget need a LLaDA model; {model_name} is not one")
        cached_plans = CachedPlans(s, sampling, alpha, dims_of(model))
    fingerprint = fingerprint_of(s, prompts, model_name, guide, evaluator, sampling, plans)
    batch.check_fingerprint(s.out / "config.json", s.out / "cells.jsonl", fingerprint, writer="this benchmark")
    done = read_cells(s.out / "cells.jsonl")

    limit = getattr(model.config, "max_sequence_length", None) or getattr(model.config, "max_position_embeddings", None) \
        or getattr(model.config, "model_length", None)
    ctx = Context(sampler=make_sampler(model, profile, sampling),
                  cached_samplers={c: make_sampler(model, profile, replace(sampling, cache=c))
                                   for c in {CACHED[m] for m in s.methods if m in CACHED}},
                  cached_plans=cached_plans,
                  generator=SafeGenerator(model, tokenizer, policy=guide, profile=profile),
                  reward=guide.reward_fn(tokenizer, profile.stop_ids), plans=plans, settings=s,
                  max_prompt_tokens=None if limit is None else max(1, limit - sampling.max_new_tokens - 32))
    if cached_plans is not None:  # every prompt's plan, for the results also when every cell is resumed
        texts = [s.template.replace("{prompt}", p) for p in prompts]
        lengths = ctx.generator.encode_prompts(texts, ctx.max_prompt_tokens)[1].sum(1) + sampling.max_new_tokens
        for m in s.methods:
            if m in CACHED:
                for b in s.budgets:
                    for n in lengths.unique().tolist():
                        cached_plans(m, b, int(n))
    finished, computed, todo = compute_cells(ctx, prompts, done, guide, evaluator, s.out / "cells.jsonl")

    T_rows = cost.plain_rows(sampling)
    methods, scores = aggregate(finished, s, len(prompts), T_rows)
    results = {
        "config": fingerprint, "prompts": len(prompts), "T_rows": T_rows, "methods": methods,
        "plans": {m: {str(b): {**json.loads(json.dumps(asdict(c))), **p} for (m2, b), (c, p) in plans.items()
                      if m2 == m} for m in KERNELS if m in s.methods and m not in CACHED},
        # Per budget and prompt length (real positions).
        "cached_plans": cached_plans.summary() if cached_plans is not None else {},
        "run": {"cells": todo, "computed_cells": computed, "resumed_cells": todo - computed,
                "wall_seconds": time.perf_counter() - t_start,
                "generation_seconds": sum(c["seconds"] for c in finished)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(ctx.sampler.device),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    write_atomic(s.out / "results.md", markdown(results).encode("utf-8"))
    results["plots"] = [p.name for p in plot(results, scores, s.out)]
    write_atomic(s.out / "results.json", json.dumps(results, indent=1, allow_nan=True).encode("utf-8"))
    return results


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input or configuration (a missing prompt file included)."""
    logging.basicConfig(level=logging.WARNING, format="toxicity_benchmark: %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        s = settings_from(args)
        results = run(s)
    except SafegenError as e:
        print(f"toxicity_benchmark: error: {e}", file=sys.stderr)
        return 2
    print((s.out / "results.md").read_text())
    r = results["run"]
    print(f"{r['computed_cells']} cells computed, {r['resumed_cells']} resumed; wall {r['wall_seconds']:.1f} s. "
          f"Output: {s.out} (results.json, results.md, {', '.join(results['plots'])}, cells.jsonl)")
    return 0
