"""Fast sampling, measured: model FLOPs and CPU wall time per sample of plain and cached sampling, and
of targeted IterRef with and without the cache; the threshold's saving in steps on the exact toys.

FLOPs are counted by the sampler at the model (safegen.models.flops: the query positions, attention pairs
and head positions of every forward it runs), for LLaDA-8B's full configuration (32 layers of
d_model 4096, 32 heads, MLP 12288, head 126464 wide): `flops_per_sample`. Counting needs no weights,
so the forwards run on a narrower random model that fits this machine (`--width`, `--layers`,
`--vocab`), whose time is `seconds_per_sample`; the
shapes (G, block, prompt) are the issue's: G = 256, blocks of 32, a 64-token prompt, one token per
step. Random weights are never confident, so the threshold's saving in steps is measured on the
exact toys (safegen.research.toy), where confidence is real, together with its cost in exactness (total
variation to p0, against the noise floor of as many exact samples).

    python -m benchmarks.speed [--json OUT] [--quick]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from safegen.models import flops
from safegen.research import planner
from safegen.models.llada import LLaDAConfig, LLaDAModelLM
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig
from safegen.research.toy import TableDenoiser, expected_tv_noise, random_distribution, tv_distance

LLADA_8B = flops.dims_of(LLaDAConfig())  # the defaults are LLaDA-8B-Instruct's
TOXIC = (5, 6, 7)  # the reward's "toxic" tokens: IterRef's reward is minus their count


def settings(G: int, block: int, prompt: int, budgets=(2.0, 4.0)):
    """(name, sampling overrides, refine config or None). IterRef's budget b: b times plain sampling in
    the same settings; "+dual" at b is b times the dual-cached plain run, and "+dual_equal_flops" is
    given the FLOPs of b times the uncached plain run."""
    out = [("plain", {}, None), ("prefix", dict(cache="prefix"), None), ("dual", dict(cache="dual"), None),
           ("dual+threshold0.9", dict(cache="dual", threshold=0.9), None)]
    uncached = SamplingConfig(max_new_tokens=G, steps=G, block_length=block)
    for b in budgets:
        rc = RefineConfig(proposal_holes="targeted", budget=b, iterations=64)
        equal, _ = planner.equal_flops_budget(uncached, "dual", b, LLADA_8B, prompt + G)
        out.append((f"iterref_targeted_budget{b:g}", {}, rc))
        out.append((f"iterref_targeted_budget{b:g}+dual", dict(cache="dual"), rc))
        out.append((f"iterref_targeted_budget{b:g}+dual_equal_flops", dict(cache="dual"),
                    replace(rc, budget=equal)))
    return out


def build_model(width: int, layers: int, vocab: int) -> LLaDAModelLM:
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=width, n_layers=layers, n_heads=max(1, width // 128), mlp_hidden_size=3 * width,
                      vocab_size=vocab, embedding_size=vocab, mask_token_id=vocab - 1, eos_token_id=vocab - 2,
                      pad_token_id=vocab - 2, max_sequence_length=4096)
    return LLaDAModelLM(cfg).eval()


def measure(model, name, overrides, rc, G, block, prompt, samples):
    vocab = model.config.vocab_size
    cfg = SamplingConfig(max_new_tokens=G, steps=G, block_length=block, **overrides)
    sampler = DiffusionSampler(model, vocab - 1, cfg)
    hook = None
    if rc is not None:
        toxic = torch.tensor(TOXIC)
        hook = IterRef(rc, lambda ids: -torch.isin(ids.cpu(), toxic).sum(1).double(),
                       blame=lambda ids: torch.isin(ids.cpu(), toxic).double())
    ids = torch.randint(0, vocab - 3, (samples, prompt), generator=torch.Generator().manual_seed(1))
    # The forwards are counted for LLaDA-8B's shapes: counting reads only the config, not the weights.
    sampler.dims = LLADA_8B
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = sampler.run(ids, seeds=0, hook=hook)
        seconds = time.perf_counter() - t0
    return {"setting": name, "flops_per_sample": float(out.flops.mean()), "rows_per_sample": float(out.rows.mean()),
            "seconds_per_sample": seconds / samples, "proposed_per_sample": float(out.proposed.mean()),
            "accepted_per_sample": float(out.accepted.mean())}


def toy_threshold(samples: int, thresholds=(None, 0.9, 0.7, 0.5)) -> list[dict]:
    """Forwards per sample and TV to p0 of the base sampler on exact toys (V = 3, L = 6 in 2 blocks
    of 3, temperature 1): peaked p0 (sharpness 8) and flat (sharpness 0.5)."""
    V, L = 3, 6
    out = []
    for kind, sharp in (("peaked", 8.0), ("flat", 0.5)):
        p0 = random_distribution(V, L, seed=2, sharpness=sharp)
        toy = TableDenoiser(p0, V, L)
        for th in thresholds:
            cfg = SamplingConfig(max_new_tokens=L, steps=L, block_length=3, temperature=1.0, threshold=th)
            res = DiffusionSampler(toy, toy.mask_id, cfg).run(torch.zeros((samples, 1), dtype=torch.long), seeds=0)
            out.append({"setting": f"toy_{kind}_threshold{th}", "forwards_per_sample": float(res.rows.mean()),
                        "tv_to_p0": tv_distance(res.sequences[:, 1:], p0, V),
                        "tv_noise_floor": expected_tv_noise(p0, samples), "samples": samples})
    return out


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["setting"] == "plain")
    lines = ["| setting | GFLOPs/sample (LLaDA-8B shapes) | x fewer than plain | rows/sample | proposals/sample "
             "| s/sample (run model) |", "|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flops_per_sample"]
        lines.append(f"| {r['setting']} | {f / 1e9:,.0f} | {base['flops_per_sample'] / f:.2f} | "
                     f"{r['rows_per_sample']:.0f} | {r['proposed_per_sample']:.0f} | {r['seconds_per_sample']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write one object per setting to this file")
    ap.add_argument("--quick", action="store_true", help="small shapes for CI and tests (seconds)")
    ap.add_argument("--width", type=int, default=512, help="d_model of the run model (default 512)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--toy-samples", type=int, default=4000)
    args = ap.parse_args(argv)
    G, block, prompt = 256, 32, 64
    if args.quick:
        G, block, prompt, args.width, args.vocab, args.toy_samples = 16, 4, 4, 64, 128, 200
        torch.set_num_threads(1)  # tiny matrices: threads only contend
    model = build_model(args.width, args.layers, args.vocab)
    rows = []
    for name, ov, rc in settings(G, block, prompt):
        rows.append(measure(model, name, ov, rc, G, block, prompt, args.samples))
        print(f"{name}: {rows[-1]['flops_per_sample'] / 1e9:,.0f} GFLOPs, {rows[-1]['rows_per_sample']:.0f} rows, "
              f"{rows[-1]['seconds_per_sample']:.2f} s per sample", flush=True)
    base = rows[0]["flops_per_sample"]
    for r in rows:
        r["flops_ratio_to_plain"] = base / r["flops_per_sample"]
        r.update(shape=dict(G=G, block=block, prompt=prompt, run_width=args.width, run_layers=args.layers,
                            run_vocab=args.vocab))
    print(table(rows))
    toys = toy_threshold(args.toy_samples)
    for t in toys:
        print(f"{t['setting']}: {t['forwards_per_sample']:.2f} forwards/sample, TV to p0 {t['tv_to_p0']:.4f} "
              f"(noise floor {t['tv_noise_floor']:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows + toys, f, indent=1)
    return rows + toys


if __name__ == "__main__":
    main()
