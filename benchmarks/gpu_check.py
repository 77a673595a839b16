"""LLaDA-8B's architecture on a GPU, without the hub: plain sampling against IterRef at budget 4.

Builds the full LLaDA-8B configuration (safegen.models.llada, 8.0 B parameters) with random weights directly
in 4-bit, as safegen.models.loading would load the checkpoint: NF4 with double quantization for the blocks'
linear layers, the embedding, output head and norms in bf16. Each layer is drawn on the device and
quantized there, so neither the host nor the GPU ever holds the 16 GB bf16 model. Then it samples a
batch of random prompts (G = 64, T = 64) plainly and with IterRef (budget 4), and writes one JSON:
wall time per sample, denoiser rows per sample, peak GPU memory and the IterRef/plain wall ratio;
then `safegen serve`'s step-level scheduler under 1, 8 and 32 concurrent requests (tokens/s).

Random weights give the speed and memory of the real model, not its text: the reward is a cheap
token-count stand-in, so the figures measure the denoiser's cost, not a classifier's.

    python benchmarks/gpu_check.py --out gpu_check.json          # a CUDA machine (about 6 GB of weights)
    python benchmarks/gpu_check.py --small --out /tmp/check.json  # the same path on CPU, in seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safegen.models.llada import LLaDAConfig, LLaDAModelLM, RMSNorm  # noqa: E402
from safegen.models.memory import meta_model, quantized_linears, weight_bytes  # noqa: E402
from safegen.models.family import ModelProfile  # noqa: E402
from safegen.refine.iterref import IterRef, RefineConfig  # noqa: E402
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig  # noqa: E402

SMALL = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, vocab_size=500,
             embedding_size=512, mask_token_id=499, eos_token_id=498, pad_token_id=498)


def random_4bit_model(config: LLaDAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """LLaDAModelLM with random weights, its block linears NF4 (double quantization, blocks of 64)."""
    import bitsandbytes as bnb

    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(shape, std):
        return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype)

    with torch.device("meta"):
        model = LLaDAModelLM(config)
    for name, linear in quantized_linears(model).items():
        parent_name, _, child = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
        weight = normal((linear.out_features, linear.in_features), config.init_std)
        quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)
        setattr(model.get_submodule(parent_name), child, quantized.to(device))  # .to quantizes
        del weight
    transformer = model.model.transformer
    transformer.wte.weight = torch.nn.Parameter(normal(transformer.wte.weight.shape, config.init_std),
                                                requires_grad=False)
    # Head std d_model**-0.5, as LLaDAModelLM's own initialisation: logits of order 1.
    transformer.ff_out.weight = torch.nn.Parameter(normal(transformer.ff_out.weight.shape, config.d_model ** -0.5),
                                                   requires_grad=False)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight = torch.nn.Parameter(torch.ones(module.weight.shape, device=device, dtype=dtype),
                                               requires_grad=False)
    return model.eval()


def random_prompts(config: LLaDAConfig, n: int, length: int, seed: int = 0):
    """Left-padded random prompts of lengths length/2..length, ids below the special tokens."""
    g = torch.Generator().manual_seed(seed)
    top = min(config.vocab_size, config.mask_token_id, config.eos_token_id) - 1
    ids = torch.randint(0, top, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).long()
    return torch.where(mask.bool(), ids, torch.full_like(ids, config.pad_token_id)), mask


def flagged_share_reward(flag_every: int = 7):
    """Minus the share of generated ids divisible by `flag_every`: cheap, and it varies between samples."""
    def reward(gen: torch.Tensor) -> torch.Tensor:
        return -(gen % flag_every == 0).float().mean(1)
    return reward


# Fast sampling (safegen.sampling.fast), as benchmarks/speed.py measures it on CPU: name -> (sampling
# overrides, IterRef budget or None).
FAST_SETTINGS = {
    "prefix": (dict(cache="prefix"), None), "dual": (dict(cache="dual"), None),
    "dual+threshold0.9": (dict(cache="dual", threshold=0.9), None),
    "iterref_targeted_budget2": ({}, 2.0), "iterref_targeted_budget2+dual": (dict(cache="dual"), 2.0),
    "iterref_targeted_budget4": ({}, 4.0), "iterref_targeted_budget4+dual": (dict(cache="dual"), 4.0),
}


def flagged_blame(flag_every: int = 7):
    """The stand-in reward's blame: 1 at each flagged id (targeted re-masking)."""
    return lambda gen: (gen % flag_every == 0).double()


def fast_runs(model, profile, sampling, ids, mask, device) -> dict:
    out = {}
    for name, (overrides, budget) in FAST_SETTINGS.items():
        sampler = DiffusionSampler(model, profile, sampling.updated(**overrides))
        hook = None if budget is None else IterRef(RefineConfig(budget=budget, proposal_holes="targeted"),
                                                   flagged_share_reward(), blame=flagged_blame())
        out[name] = timed_run(sampler, ids, mask, hook, device)
    return out


def timed_run(sampler, ids, mask, hook, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = sampler.run(ids.to(device), mask.to(device), seeds=0, hook=hook)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "wall_per_sample_s": wall / ids.shape[0],
            "denoiser_rows_per_sample": out.rows.float().mean().item(),
            "model_flops_per_sample": out.flops.mean().item(),
            "tokens_per_s": ids.shape[0] * sampler.config.max_new_tokens / wall,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def engine_concurrency(model, profile, sampling, config, device, levels=(1, 8, 32), max_rows: int = 16,
                       prompt_len: int = 32) -> dict:
    """The step-level scheduler of `safegen serve` (serve.batcher.Batcher, groups advancing one
    sampler step a round) under `levels` concurrent requests of one sample each, all sent at once,
    with the dual cache: generated tokens per second, and each request's latency. No HTTP and no
    policy: the scheduler and the sampler on the device (dlmserve, for comparison: 32.9 tok/s at
    batch 1 and 110.6 at batch 8 for LLaDA-8B in INT4 on an RTX 5070)."""
    import asyncio

    from safegen.serve.batcher import Batcher

    sampler = DiffusionSampler(model, profile, sampling.updated(cache="dual"))

    def run_batch(payloads):  # a group: its requests' prompts, one sample each, seeds from the requests
        ids = torch.cat([p[0] for p in payloads]).to(device)
        mask = torch.cat([p[1] for p in payloads]).to(device)
        out = yield from sampler.run_steps(ids, mask, seeds=[p[2] for p in payloads])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return [out.sequences[k:k + 1].cpu() for k in range(len(payloads))]

    out = {}
    for level in levels:
        ids, mask = random_prompts(config, level, prompt_len, seed=level)

        async def send():
            batcher = Batcher(run_batch, max_queue=max(64, level), max_rows=max_rows, max_wait=0.0,
                              arriving=lambda: 0)
            started = time.perf_counter()

            async def one(k):
                job = batcher.submit(("plain",), 1, (ids[k:k + 1], mask[k:k + 1], 1000 + k))
                await job.future
                return time.perf_counter() - started

            latencies = await asyncio.gather(*(one(k) for k in range(level)))
            batcher.close()
            return time.perf_counter() - started, sorted(latencies)

        wall, latencies = asyncio.run(send())
        out[str(level)] = {"requests": level, "wall_s": wall, "tokens_per_s": level * sampling.max_new_tokens / wall,
                           "latency_p50_s": latencies[len(latencies) // 2], "latency_max_s": latencies[-1]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--small", action="store_true", help="a tiny configuration (CPU smoke test)")
    parser.add_argument("--prompts", type=int, default=8, help="batch of prompts (default 8)")
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt, tokens (default 32)")
    parser.add_argument("--gen", type=int, default=64, help="G, generation length (default 64)")
    parser.add_argument("--steps", type=int, default=64, help="T, denoising steps (default 64)")
    parser.add_argument("--budget", type=float, default=4.0, help="IterRef's budget, x plain sampling's model FLOPs (default 4)")
    parser.add_argument("--no-fast", action="store_true", help="skip the fast-sampling settings")
    parser.add_argument("--concurrency", default="1,8,32",
                        help="concurrent requests through the serving scheduler, comma-separated (default "
                             "1,8,32; 'none' to skip)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LLaDAConfig(**SMALL) if args.small else LLaDAConfig()
    t0 = time.perf_counter()
    model = random_4bit_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    profile = ModelProfile(mask_id=config.mask_token_id, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                           vocab_size=config.vocab_size)
    sampling = SamplingConfig(max_new_tokens=args.gen, steps=args.steps, block_length=min(args.gen, 32))
    sampler = DiffusionSampler(model, profile, sampling)
    ids, mask = random_prompts(config, args.prompts, args.prompt_len)
    with torch.inference_mode():  # warm-up: kernels and allocator, outside the timings
        model(ids[:1].to(device), attention_mask=mask[:1].to(device))

    plain = timed_run(sampler, ids, mask, None, device)
    iterref = timed_run(sampler, ids, mask, IterRef(RefineConfig(budget=args.budget), flagged_share_reward()), device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype),
        "config": {k: getattr(config, k) for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size",
                                                   "embedding_size")},
        "parameters": sum(p.numel() for p in meta_model(config).parameters()),
        "weights_estimated_bytes": weight_bytes(meta_model(config), "4bit", kept_bytes=dtype.itemsize),
        "weights_allocated_bytes": torch.cuda.memory_allocated() if device.type == "cuda" else None,
        "build_s": build_s,
        "batch": args.prompts, "prompt_len": args.prompt_len, "G": args.gen, "T": args.steps,
        "budget": args.budget,
        "plain": plain, "iterref": iterref,
        "iterref_over_plain_wall": iterref["wall_s"] / plain["wall_s"],
    }
    if not args.no_fast:
        result["fast"] = fast_runs(model, profile, sampling, ids, mask, device)
    if args.concurrency != "none":
        levels = tuple(int(c) for c in args.concurrency.split(","))
        result["engine"] = engine_concurrency(model, profile, sampling, config, device, levels,
                                              prompt_len=args.prompt_len)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
