"""CPU seconds per sample for MDLM-OWT's configuration (random weights): plain sampling with MDLM's
sampler and IterRef at budgets 2 and 4 (multiples of plain sampling's expected forwards).

The model is safegen.models.mdlm's at MDLM-OWT's config.json values (hidden 768, 12 blocks, 12 heads, cond 128,
vocab 50258, 169.6 M parameters, float32); weights are random, so the timings are the real model's and
the texts are not. Each sample continues a 20-token prompt by 32 tokens (52 positions a forward, not the
1024 MDLM pads to in training). The reward is a cheap stand-in (minus the share of tokens from a fixed
set of ids), so the figures are the denoiser's and the sampler's, not a toxicity classifier's.

    python benchmarks/mdlm_cpu.py                       # about 10 minutes on 2 loaded CPU cores
    python benchmarks/mdlm_cpu.py --threads 2 --batch 8
    python benchmarks/mdlm_cpu.py --quick               # a 2-block model, for a smoke run

CPU seconds are the process's (time.process_time: all threads' CPU time), printed beside wall seconds.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from safegen.refine import cost
from safegen.models.mdlm import MDLMConfig, MDLMModel
from safegen.sampling.mdlm import MDLMSampler, expected_forwards
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import SamplingConfig

PROMPT_TOKENS, NEW_TOKENS = 20, 32


def stand_in_reward(vocab: int):
    """Minus the share of tokens among 500 fixed ids: cheap, and low for some drafts."""
    flagged = torch.randperm(vocab - 1, generator=torch.Generator().manual_seed(1))[:500]
    return lambda ids: -torch.isin(ids, flagged.to(ids.device)).double().mean(1)


def measure(sampler, prompts, hook=None, seed=0):
    wall, cpu = time.perf_counter(), time.process_time()
    out = sampler.run(prompts, seeds=seed, hook=hook)
    n = prompts.shape[0]
    return {"cpu_s_per_sample": (time.process_time() - cpu) / n, "wall_s_per_sample": (time.perf_counter() - wall) / n,
            "rows_per_sample": float(out.rows.mean()), "proposals_per_sample": float(out.proposed.mean()),
            "accepted_per_sample": float(out.accepted.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="samples run together (default 4)")
    parser.add_argument("--steps", type=int, default=NEW_TOKENS, help=f"MDLM steps T (default {NEW_TOKENS})")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--quick", action="store_true", help="2 blocks instead of 12")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = MDLMConfig(**({"n_blocks": 2} if args.quick else {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MDLMModel(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, steps=args.steps, temperature=1.0, sampler="mdlm")
    sampler = MDLMSampler(model, config.mask_token_id, sampling)
    prompts = torch.randint(0, config.vocab_size - 1, (args.batch, PROMPT_TOKENS),
                            generator=torch.Generator().manual_seed(0))
    reward = stand_in_reward(config.vocab_size)

    # One forward first: the first call pays one-off allocation costs.
    with torch.inference_mode():
        model(input_ids=torch.cat([prompts[:1], prompts[:1, :NEW_TOKENS]], 1))
    results = {"parameters": parameters, "threads": args.threads, "batch": args.batch, "steps": args.steps,
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
               "expected_plain_forwards": expected_forwards(NEW_TOKENS, args.steps),
               "budget_unit_rows": cost.plain_rows(sampling), "runs": {}}
    results["runs"]["plain"] = measure(sampler, prompts)
    for budget in args.budgets:
        # As many iterations at the last point as the budget allows (uniform re-masking of half the answer).
        hook = IterRef(RefineConfig(iterations=1000, budget=budget, alpha=0.1, rho=0.5), reward)
        results["runs"][f"iterref_budget_{budget:g}"] = measure(sampler, prompts, hook)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
