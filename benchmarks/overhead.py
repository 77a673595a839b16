"""The middleware's own cost, on a mid-size random LLaDA-shaped model (tens of millions of parameters).

Measures
  1. the share of IterRef's wall time spent outside model forwards and classifier calls (the
     policy's scorers, scoring or blaming): sampling, re-masking, Metropolis bookkeeping, decoding,
     the policy's own aggregation: target <= 3%;
  2. peak memory of plain and of refined sampling, above the loaded model (each in a fresh process:
     VmHWM − VmRSS after loading on CPU, torch.cuda.max_memory_allocated on a GPU);
  3. weight memory of 4-bit and 8-bit loads as a ratio to full precision, for the quantized layers
     (the transformer blocks' linear layers) and for the whole model: target 4-bit < 0.35×.

    python benchmarks/overhead.py                 # a few minutes on 2 CPU cores
    python benchmarks/overhead.py --layers 3      # the same model with 3 blocks: 14.4 M parameters
    python benchmarks/overhead.py --quick         # the CI smoke size
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MID_SIZE = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536)  # 31.5 M parameters
QUICK_SIZE = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=256)
PROMPTS = ["Go suck a", "People think that we are just a bunch of idiots who",
           "On this late November afternoon,", "When you give too many fucks what your family thinks"]


class Stopwatch:
    """Accumulated seconds spent inside wrapped callables, their calls, and the items (rows of
    `input_ids`, or texts) those calls were given. A call made from inside another call of the same
    stopwatch (a scorer's blame that scores) is part of the outer one: counted once."""

    def __init__(self):
        self.reset()
        self._depth = 0

    def reset(self):
        self.seconds, self.calls, self.items = 0.0, 0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self.items += len(kwargs["input_ids"] if "input_ids" in kwargs else args[0])
        return timed


def build_generator(model_dir: str, args, quantization: str = "none"):
    from safegen.generator import SafeGenerator
    from safegen.models.loading import load_model

    model, tokenizer, profile = load_model(model_dir, quantization=quantization)
    G = args.max_new_tokens
    return SafeGenerator(model, tokenizer, policy=args.policy, profile=profile,
                         sampling=dict(max_new_tokens=G, steps=G, block_length=min(G, 32), temperature=1.0),
                         # The defaults, exact mode and no budget cap: every sample is refined.
                         refinement=dict(adaptive=False, budget=None))


def time_shares(model_dir: str, args) -> dict:
    """Wall time of refined generation split into model forwards, classifier calls and the rest."""
    gen = build_generator(model_dir, args)
    forward, classify, scoring, blaming = Stopwatch(), Stopwatch(), Stopwatch(), Stopwatch()
    gen.model.forward = forward.wrap(gen.model.forward)
    # Classifier time is the time inside the policy's classifiers, on every path that calls them:
    # scoring texts, and attributing blame for targeted re-masking (the generator's default), whose
    # scorers score the text again. Timing Policy.score alone billed the blame's classifier calls
    # to the middleware and the policy's own bookkeeping to the classifiers.
    for c in gen.policy.classifiers:
        c.scorer.score = classify.wrap(c.scorer.score)
        c.scorer.blame = classify.wrap(c.scorer.blame)
    # The policy layer around them (de-duplication, aggregation, verdicts), for the record.
    gen.policy.score = scoring.wrap(gen.policy.score)
    gen.policy.blame = blaming.wrap(gen.policy.blame)
    prompts = (PROMPTS * args.batch)[: args.batch]
    gen.generate_text(prompts[:1], seed=0)  # warm-up: first-call costs are not the middleware's
    for watch in (forward, classify, scoring, blaming):
        watch.reset()
    total, reports = 0.0, []
    for _ in range(args.repeats):  # the same work again: the shares of the summed times
        t0 = time.perf_counter()
        reports += gen.generate_text(prompts, seed=0)
        total += time.perf_counter() - t0
    rest = total - forward.seconds - classify.seconds
    return {"wall_s": total, "forward_s": forward.seconds, "classifier_s": classify.seconds,
            "other_s": rest, "other_share": rest / total, "forward_calls": forward.calls,
            "classifier_calls": classify.calls,
            # Policy.score and Policy.blame, classifiers included: the old accounting counted the
            # first as classifier time and the second as overhead.
            "policy_score_s": scoring.seconds, "policy_blame_s": blaming.seconds,
            "other_share_old_accounting": (total - forward.seconds - scoring.seconds) / total,
            "rows_per_sample": sum(r.rows for r in reports) / len(reports),
            # Rows the model was given, and rows the sampler charged (refined and "before" samples).
            "forward_rows": forward.items, "charged_rows": sum(r.rows + r.rows_before for r in reports)}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_memory_child(model_dir: str, args, refine: bool) -> dict:
    """Runs in a fresh process: the peak above the loaded model's footprint."""
    gen = build_generator(model_dir, args)
    prompts = (PROMPTS * args.batch)[: args.batch]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    gen.policy.score(["warm up the classifier"])
    rss0 = _rss_kib("VmRSS")
    gen.generate_text(prompts, seed=0, refine=refine, report_before=False)
    out = {"peak_above_model_mib": (_rss_kib("VmHWM") - rss0) / 1024, "device": "cpu"}
    if torch.cuda.is_available():
        out = {"peak_above_model_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20, "device": "cuda"}
    return out


def peak_memory(model_dir: str, args, refine: bool) -> dict:
    cmd = [sys.executable, __file__, "--child-peak", model_dir, "--refine" if refine else "--plain",
           "--max-new-tokens", str(args.max_new_tokens), "--batch", str(args.batch), "--policy", args.policy]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def weight_bytes(model) -> dict:
    """Bytes of the blocks' linear layers (what quantization touches) and of the whole model,
    counting bitsandbytes' packed weights and their quantization statistics."""
    def module_bytes(m) -> int:
        n = sum(t.numel() * t.element_size() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:  # 4-bit: absmax (and the double-quantization's second level)
            for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None),
                      getattr(getattr(state, "state2", None), "code", None), getattr(state, "code", None)):
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):  # 8-bit: per-row scales
            n += scb.numel() * scb.element_size()
        return n

    layers = sum(module_bytes(m) for name, m in model.named_modules() if ".blocks." in name and not list(m.children())
                 and "norm" not in name)
    total = sum(module_bytes(m) for m in model.modules())
    return {"blocks_linear_bytes": layers, "total_bytes": total}


def weight_memory(model_dir: str) -> dict:
    from safegen.models.loading import load_model

    out = {}
    for q in ("none", "8bit", "4bit"):
        model, _, _ = load_model(model_dir, quantization=q)
        out[q] = weight_bytes(model)
        del model
    full = out["none"]
    for q in ("8bit", "4bit"):
        out[q]["blocks_linear_ratio_fp32"] = out[q]["blocks_linear_bytes"] / full["blocks_linear_bytes"]
        out[q]["blocks_linear_ratio_bf16"] = 2 * out[q]["blocks_linear_bytes"] / full["blocks_linear_bytes"]
        out[q]["total_ratio_fp32"] = out[q]["total_bytes"] / full["total_bytes"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (default: a random mid-size tiny-LLaDA written to a temp dir)")
    p.add_argument("--policy", default="offline")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=MID_SIZE["n_layers"],
                   help="transformer blocks of the random model (default %(default)s: 31.5 M parameters)")
    p.add_argument("--repeats", type=int, default=1, help="timed generations whose times are summed")
    p.add_argument("--quick", action="store_true", help="small model and sizes (CI smoke)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--child-peak", help=argparse.SUPPRESS)
    p.add_argument("--refine", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_peak:
        print(json.dumps(peak_memory_child(args.child_peak, args, refine=args.refine)))
        return 0
    for name in ("layers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.max_new_tokens, args.batch = 8, 2

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from safegen.models.tiny import write_tiny_model
            size = QUICK_SIZE if args.quick else dict(MID_SIZE, n_layers=args.layers)
            model_dir = str(write_tiny_model(Path(tmp) / "mid", seed=0, **size))
        n_params = sum(p.numel() for p in build_generator(model_dir, args).model.parameters())
        shares = time_shares(model_dir, args)
        memory = {"plain": peak_memory(model_dir, args, refine=False),
                  "refined": peak_memory(model_dir, args, refine=True)}
        weights = weight_memory(model_dir)

    results = {"parameters": n_params, "max_new_tokens": args.max_new_tokens, "batch": args.batch,
               "repeats": args.repeats,
               "time": shares, "peak_memory": memory, "weights": weights,
               "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"}
    print(f"model: {n_params / 1e6:.1f} M parameters, batch {args.batch}, {args.max_new_tokens} new tokens, "
          f"{args.repeats} timed run(s), {results['device']}")
    print("\n| IterRef wall time | seconds | share |\n|---|---|---|")
    for k in ("forward_s", "classifier_s", "other_s"):
        print(f"| {k[:-2]} | {shares[k]:.2f} | {shares[k] / shares['wall_s']:.1%} |")
    print(f"| total ({shares['forward_calls']} forwards, {shares['classifier_calls']} classifier calls, "
          f"{shares['rows_per_sample']:.0f} rows/sample) | {shares['wall_s']:.2f} | 100% |")
    print(f"\nmiddleware overhead: {shares['other_share']:.1%} of wall time (target <= 3%; "
          f"{shares['other_share_old_accounting']:.1%} counting only Policy.score as classifier time)")
    print("\n| sampling | peak memory above the model (MiB) |\n|---|---|")
    for k, v in memory.items():
        print(f"| {k} | {v['peak_above_model_mib']:.1f} |")
    print("\n| weights | blocks' linear layers (MiB) | × fp32 | × bf16 | whole model (MiB) | × fp32 |\n|---|---|---|---|---|---|")
    for q in ("none", "8bit", "4bit"):
        w = weights[q]
        print(f"| {q} | {w['blocks_linear_bytes'] / 2**20:.2f} | {w.get('blocks_linear_ratio_fp32', 1):.3f} | "
              f"{w.get('blocks_linear_ratio_bf16', 2):.3f} | {w['total_bytes'] / 2**20:.2f} | {w.get('total_ratio_fp32', 1):.3f} |")
    ratio = weights["4bit"]["blocks_linear_ratio_bf16"]
    print(f"\n4-bit quantized layers: {ratio:.3f}× bf16 full precision, "
          f"{weights['4bit']['blocks_linear_ratio_fp32']:.3f}× fp32 (target < 0.35×)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
