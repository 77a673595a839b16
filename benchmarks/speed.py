"""Fast sampling, measured: model FLOPs and CPU wall time per sample of plain and cached sampling, and
of targeted IterRef with and without the cache; the threshold's saving in steps on the exact toys; and,
on paper, what each setting's forwards would cost LLaDA-8B on an H100 (a roofline).

Two shapes (`--shape`):

* `llada8b` (the default): FLOPs are counted by the sampler at the model (safegen.models.flops: the query
  positions, attention pairs and head positions of every forward it runs), for LLaDA-8B's full
  configuration (32 layers of d_model 4096, 32 heads, MLP 12288, head 126464 wide): `flops_per_sample`.
  Counting needs no weights, so the forwards run on a narrower random model that fits this machine
  (`--width`, `--layers`, `--vocab`), whose time is `seconds_per_sample`. Random weights are never
  confident, so the threshold's saving in steps is measured on the exact toys (safegen.research.toy),
  where confidence is real, together with its cost in exactness (total variation to p0, against the
  noise floor of as many exact samples).
* `cpu`: a compute-bound random LLaDA that runs here (d_model 512, 4 layers of 4 heads, MLP 1536,
  vocabulary 8192 by default), 4 prompts a batch (`--samples`), one torch thread (`--threads`; on a
  shared 2-core machine two threads contend), the five settings plain, prefix, dual, dual+threshold0.9
  and iterref_targeted_budget4+dual. `flops_per_sample` is counted for the model that ran, for the
  forwards that ran, and the achieved FLOP rate (`gflops_per_second`: FLOPs run / wall seconds) is
  compared with uncached plain's (`rate_ratio_to_plain`); `model_gflops_per_second` is the rate inside
  the model's calls alone (`forward_seconds_per_sample`), the rest being the sampler's own work around
  them. `--plain-blocks K` runs only uncached plain's first K blocks and scales its seconds, FLOPs and
  forwards by blocks / K: every block of uncached plain makes the same forwards (one of every position
  per step), so only its seconds are an estimate. No toys (they do not depend on the shape).

Both shapes use the issue's sequence shapes: G = 256, blocks of 32, a 64-token prompt, one token per
step (`--quick`: tiny shapes for tests, seconds).

Every forward the model runs is logged (`ForwardLog`: rows, queries, keys, head positions, cached keys
and its seconds), and priced for LLaDA-8B's full shapes on an H100 (`roofline`): per forward, FLOPs at
batch b and the bytes it must read (the weights once whatever the batch, NF4 4-bit as safegen loads it
or bf16, plus, for a forward of queries against the block cache, the cached keys and values of every
row), and a time max(FLOPs / peak, bytes / bandwidth); summed over one sample's forwards as if b
samples alike ran together, divided by b. Per setting: `forwards_per_sample` (the logged shapes, each
with its count per sample) and `roofline` (per batch b in 1, 16 and format: seconds, FLOPs and bytes
per sample, the bound of the larger share of the time, and each forward kind's count by bound).

    python -m benchmarks.speed [--json OUT] [--quick] [--shape llada8b|cpu] [--plain-blocks K]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional

import torch

from safegen.models import flops, memory
from safegen.research import planner
from safegen.models.llada import LLaDAConfig, LLaDAModelLM
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig
from safegen.research.toy import TableDenoiser, expected_tv_noise, random_distribution, tv_distance

LLADA_8B = flops.dims_of(LLaDAConfig())  # the defaults are LLaDA-8B-Instruct's
TOXIC = (5, 6, 7)  # the reward's "toxic" tokens: IterRef's reward is minus their count

# The GPU of the roofline: NVIDIA H100 SXM, the vendor's spec sheet (dense BF16 tensor-core peak,
# without sparsity; HBM3 bandwidth). Paper figures: no measured kernel reaches them.
H100 = "NVIDIA H100 SXM"
H100_PEAK_FLOPS = 989e12  # FLOP/s, dense bf16 (NVIDIA's H100 datasheet)
H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3 (NVIDIA's H100 datasheet)
ROOFLINE_BATCHES = (1, 16)
CACHE_BYTES = 2  # a cached key or value element in bf16
CPU_SETTINGS = ("plain", "prefix", "dual", "dual+threshold0.9", "iterref_targeted_budget4+dual")


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


# ------------------------------------------------------------------------------ what the model ran
@dataclass(frozen=True)
class Forward:
    """A forward's shape for one row: `queries` positions run through the blocks, against `keys` real
    keys, the head on `heads` positions, `cached` of the keys (and values) read from the block cache
    (0 for a full forward or a prefill, which compute every key)."""

    kind: str  # "full" (model(...)), "prefill" (keeps keys and values), "queries" (forward_queries)
    queries: int
    keys: int
    heads: int
    cached: int


class ForwardLog:
    """Logs every forward a LLaDAModelLM runs (its `forward`, `prefill` and `forward_queries`, wrapped on
    the instance): rows by shape, and seconds inside the model."""

    def __init__(self, model: LLaDAModelLM):
        self.rows: dict[Forward, float] = defaultdict(float)
        self.calls = 0
        self.seconds = 0.0
        forward, prefill, queries = model.forward, model.prefill, model.forward_queries

        def timed(fn, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        def full(input_ids, attention_mask=None, **kwargs):
            keys = flops.real_positions(input_ids, attention_mask)
            self._add("full", keys, keys, keys, 0)
            return timed(forward, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

        def prefill_(input_ids, attention_mask=None, logits_from: int = 0):
            keys = flops.real_positions(input_ids, attention_mask)
            heads = torch.full_like(keys, float(input_ids.shape[1] - logits_from))
            self._add("prefill", keys, keys, heads, 0)
            return timed(prefill, input_ids, attention_mask, logits_from)

        def queries_(query_ids, positions, cache):
            n, q = query_ids.shape
            keys = (torch.full((n,), float(cache.length), dtype=torch.float64) if cache.key_mask is None
                    else cache.key_mask.reshape(n, -1).sum(1).double().cpu())
            qs = torch.full_like(keys, float(q))
            self._add("queries", qs, keys, qs, keys - qs)
            return timed(queries, query_ids, positions, cache)

        model.forward, model.prefill, model.forward_queries = full, prefill_, queries_

    def _add(self, kind, queries, keys, heads, cached):
        for row in zip(queries.tolist(), keys.tolist(), heads.tolist(),
                       cached.tolist() if torch.is_tensor(cached) else [cached] * len(keys)):
            self.rows[Forward(kind, *(int(v) for v in row))] += 1.0

    def reset(self) -> None:
        self.rows.clear()
        self.calls, self.seconds = 0, 0.0

    def flops(self, dims: flops.Dims) -> float:
        """FLOPs of every logged row, at `dims` (safegen.models.flops' count)."""
        return sum(n * forward_row_flops(dims, f) for f, n in self.rows.items())


def forward_row_flops(dims: flops.Dims, f: Forward) -> float:
    return float(flops.forward_flops(dims, f.queries, f.queries * f.keys, f.heads))


# ------------------------------------------------------------------------------ the roofline on paper
def weight_bytes_read(config: LLaDAConfig) -> dict:
    """Bytes of weights one forward reads, per quantization, as safegen loads them (models/memory.py:
    NF4 with its scales for the blocks' linears, the head and norms in 16 bits): every weight but the
    embedding table, of which a forward reads only its tokens' rows (left out). `head` is the output
    head's share, which a forward with no head position (a pool's keys-and-values prefill) skips."""
    model = memory.meta_model(config)
    t = model.model.transformer
    embedding = t.wte.weight.numel() * 2
    head = t.ff_out.weight.numel() * 2
    return {"4bit": memory.weight_bytes(model, "4bit") - embedding,
            "bf16": memory.weight_bytes(model, "bf16") - embedding,
            "head": head}


def roofline_forward(dims: flops.Dims, f: Forward, batch: int, weights: float, head_bytes: float,
                     peak: float = H100_PEAK_FLOPS, bandwidth: float = H100_BANDWIDTH) -> dict:
    """One forward of `batch` rows of shape `f`: its FLOPs, the bytes it must read (the weights once,
    the head only if a position needs it; the cached keys and values of every row: K and V, each
    layer's n_kv_heads·head_dim per cached position, 2 bytes), and max(FLOPs / peak, bytes / bandwidth)."""
    fl = batch * forward_row_flops(dims, f)
    cache = 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * f.cached * CACHE_BYTES * batch
    read = weights - (head_bytes if f.heads == 0 else 0.0) + cache
    compute_s, memory_s = fl / peak, read / bandwidth
    return {"flops": fl, "bytes": read, "cache_bytes": cache, "seconds": max(compute_s, memory_s),
            "bound": "compute" if compute_s >= memory_s else "memory"}


def roofline(log_rows: dict, samples: float, dims: flops.Dims = LLADA_8B, wbytes: Optional[dict] = None,
             batches=ROOFLINE_BATCHES) -> dict:
    """Per sample, for each batch b and weight format: the seconds, FLOPs and bytes of the forwards one
    sample runs (`log_rows`: rows by shape, for `samples` samples), each forward run for b samples alike
    (its time divided by b), and the share of that time in memory-bound forwards."""
    wbytes = wbytes or weight_bytes_read(LLaDAConfig())
    out = {"gpu": H100, "peak_flops": H100_PEAK_FLOPS, "bandwidth_bytes_per_s": H100_BANDWIDTH,
           "weight_bytes": {"4bit": wbytes["4bit"], "bf16": wbytes["bf16"]}}
    for b in batches:
        for fmt in ("4bit", "bf16"):
            sec = fl = rd = mem = 0.0
            bounds: dict = defaultdict(lambda: {"compute": 0.0, "memory": 0.0})
            for f, n in log_rows.items():
                per_sample = n / samples  # this shape's forwards per sample
                r = roofline_forward(dims, f, b, wbytes[fmt], wbytes["head"])
                sec += per_sample * r["seconds"] / b
                fl += per_sample * r["flops"] / b
                rd += per_sample * r["bytes"] / b
                mem += per_sample * r["seconds"] / b if r["bound"] == "memory" else 0.0
                bounds[f.kind][r["bound"]] += per_sample
            out[f"b{b}_{fmt}"] = {"seconds_per_sample": sec, "flops_per_sample": fl, "bytes_per_sample": rd,
                                  "memory_bound_share": mem / sec if sec else 0.0,
                                  "bound": "memory" if mem > sec / 2 else "compute",
                                  "forwards_by_bound": {k: dict(v) for k, v in bounds.items()}}
    return out


# ------------------------------------------------------------------------------ measuring
def measure(model, name, overrides, rc, G, block, prompt, samples, dims=LLADA_8B, log: Optional[ForwardLog] = None,
            blocks: Optional[int] = None):
    """One setting: `samples` prompts in one batch. FLOPs counted at `dims` (default LLaDA-8B's: counting
    reads only the config, not the weights; None: the model's own). `blocks`: stop after that many
    blocks and scale seconds, FLOPs, rows and logged forwards by n_blocks / blocks (only for settings
    whose every block makes the same forwards: uncached plain)."""
    vocab = model.config.vocab_size
    cfg = SamplingConfig(max_new_tokens=G, steps=G, block_length=block, **overrides)
    sampler = DiffusionSampler(model, vocab - 1, cfg)
    hook = None
    if rc is not None:
        toxic = torch.tensor(TOXIC)
        hook = IterRef(rc, lambda ids: -torch.isin(ids.cpu(), toxic).sum(1).double(),
                       blame=lambda ids: torch.isin(ids.cpu(), toxic).double())
    ids = torch.randint(0, vocab - 3, (samples, prompt), generator=torch.Generator().manual_seed(1))
    if dims is not None:
        sampler.dims = dims
    if log is not None:
        log.reset()
    n_blocks = cfg.n_blocks
    with torch.inference_mode():
        t0 = time.perf_counter()
        if blocks is None or blocks >= n_blocks:
            out = sampler.run(ids, seeds=0, hook=hook)
            scale = 1.0
        else:
            if rc is not None or overrides:
                raise ValueError("a partial run is for uncached plain sampling only")
            steps = sampler.run_steps(ids, seeds=0)
            for _ in range(sum(cfg.steps_in_block(k) + 1 for k in range(blocks))):
                next(steps)
            steps.close()
            out, scale = None, n_blocks / blocks
        seconds = (time.perf_counter() - t0) * scale
    row = {"setting": name, "seconds_per_sample": seconds / samples}
    if out is not None:
        row.update(flops_per_sample=float(out.flops.mean()), rows_per_sample=float(out.rows.mean()),
                   proposed_per_sample=float(out.proposed.mean()), accepted_per_sample=float(out.accepted.mean()))
    else:  # no SampleOutput: the logged forwards, which are what the sampler counts uncached
        row.update(flops_per_sample=log.flops(sampler.dims) * scale / samples,
                   rows_per_sample=sum(log.rows.values()) * scale / samples, proposed_per_sample=0.0,
                   accepted_per_sample=0.0, measured_blocks=blocks, measured_seconds=seconds / scale)
    if log is not None:
        row["forward_seconds_per_sample"] = log.seconds * scale / samples
        row["forward_calls"] = log.calls * scale  # model calls for the whole batch
        if scale != 1.0:
            for f in list(log.rows):
                log.rows[f] *= scale
        row["logged_flops_per_sample"] = log.flops(sampler.dims) / samples
        row["forwards_per_sample"] = [
            dict(kind=f.kind, queries=f.queries, keys=f.keys, heads=f.heads, cached=f.cached, count=n / samples)
            for f, n in sorted(log.rows.items(), key=lambda kv: -kv[1])]
        row["roofline"] = roofline(log.rows, samples)
    return row


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


# ------------------------------------------------------------------------------ tables
def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["setting"] == "plain")
    lines = ["| setting | GFLOPs/sample (LLaDA-8B shapes) | x fewer than plain | rows/sample | proposals/sample "
             "| s/sample (run model) |", "|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flops_per_sample"]
        lines.append(f"| {r['setting']} | {f / 1e9:,.0f} | {base['flops_per_sample'] / f:.2f} | "
                     f"{r['rows_per_sample']:.0f} | {r['proposed_per_sample']:.0f} | {r['seconds_per_sample']:.2f} |")
    return "\n".join(lines)


def rate_table(rows: list[dict]) -> str:
    """The cpu shape: FLOPs run (the run model's), seconds, the achieved rate and its ratio to plain's."""
    lines = ["| setting | GFLOPs/sample (run model) | x fewer than plain | s/sample | x faster than plain "
             "| in the model's calls | GFLOP/s achieved | rate / plain's | in the model's calls: GFLOP/s (/ plain's) "
             "| proposals/sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = next(r for r in rows if r["setting"] == "plain")
    for r in rows:
        part = " (*)" if "measured_blocks" in r else ""
        lines.append(f"| {r['setting']}{part} | {r['flops_per_sample'] / 1e9:,.0f} | "
                     f"{base['flops_per_sample'] / r['flops_per_sample']:.2f} | {r['seconds_per_sample']:.1f} | "
                     f"{base['seconds_per_sample'] / r['seconds_per_sample']:.2f} | "
                     f"{r['forward_seconds_per_sample'] / r['seconds_per_sample']:.0%} | "
                     f"{r['gflops_per_second']:.1f} | {r['rate_ratio_to_plain']:.2f} | "
                     f"{r['model_gflops_per_second']:.1f} ({r['model_rate_ratio_to_plain']:.2f}) | "
                     f"{r['proposed_per_sample']:.1f} |")
    lines += [f"(*) measured on its first {r['measured_blocks']} blocks, seconds and FLOPs scaled to all"
              for r in rows if "measured_blocks" in r]
    return "\n".join(lines)


def roofline_table(rows: list[dict]) -> str:
    """Roofline seconds per sample for LLaDA-8B on the H100, per batch and weight format, the bound
    (the format's larger share of time), and x faster than uncached plain at the same batch and format."""
    head = "| setting | " + " | ".join(f"batch {b}, {fmt}: ms/sample, bound (memory-bound share), x plain"
                                       for b in ROOFLINE_BATCHES for fmt in ("4bit", "bf16")) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(ROOFLINE_BATCHES))]
    base = next(r for r in rows if r["setting"] == "plain")["roofline"]
    for r in rows:
        cells = []
        for b in ROOFLINE_BATCHES:
            for fmt in ("4bit", "bf16"):
                c, p = r["roofline"][f"b{b}_{fmt}"], base[f"b{b}_{fmt}"]
                cells.append(f"{c['seconds_per_sample'] * 1e3:,.1f}, {c['bound']} ({c['memory_bound_share']:.0%}), "
                             f"{p['seconds_per_sample'] / c['seconds_per_sample']:.2f}x")
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write one object per setting to this file")
    ap.add_argument("--quick", action="store_true", help="small shapes for CI and tests (seconds)")
    ap.add_argument("--shape", choices=("llada8b", "cpu"), default="llada8b",
                    help="llada8b: FLOPs counted for LLaDA-8B, run on a narrow model (default); cpu: a compute-"
                         "bound random LLaDA, FLOPs and rates of the model that ran, the five cpu settings")
    ap.add_argument("--width", type=int, help="d_model of the run model (default 512)")
    ap.add_argument("--layers", type=int, help="default 1 (llada8b), 4 (cpu)")
    ap.add_argument("--vocab", type=int, help="default 4096 (llada8b), 8192 (cpu)")
    ap.add_argument("--samples", type=int, help="prompts in the batch: default 1 (llada8b), 4 (cpu)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 for cpu and --quick)")
    ap.add_argument("--plain-blocks", type=int, help="run only uncached plain's first K blocks and scale by "
                                                     "blocks / K (every block makes the same forwards)")
    ap.add_argument("--toy-samples", type=int, default=4000)
    args = ap.parse_args(argv)
    cpu = args.shape == "cpu"
    width, layers, vocab, samples = 512, 4 if cpu else 1, 8192 if cpu else 4096, 4 if cpu else 1
    G, block, prompt = 256, 32, 64
    threads = 1 if cpu else None
    if args.quick:
        G, block, prompt, width, vocab, args.toy_samples = 16, 4, 4, 64, 128, 200
        layers, samples = (2, 2) if cpu else (layers, samples)
        threads = 1  # tiny matrices: threads only contend
    width, layers, vocab = args.width or width, args.layers or layers, args.vocab or vocab
    samples, threads = args.samples or samples, args.threads or threads
    if threads:
        torch.set_num_threads(threads)
    model = build_model(width, layers, vocab)
    log = ForwardLog(model)
    chosen = [s for s in settings(G, block, prompt) if not cpu or s[0] in CPU_SETTINGS]
    if cpu:  # a warm-up forward, so that plain (first) does not pay for the first allocations
        with torch.inference_mode():
            model(input_ids=torch.zeros((samples, prompt + G), dtype=torch.long))
    t_all = time.perf_counter()
    rows = []
    for name, ov, rc in chosen:
        blocks = args.plain_blocks if name == "plain" else None
        rows.append(measure(model, name, ov, rc, G, block, prompt, samples, dims=None if cpu else LLADA_8B,
                            log=log, blocks=blocks))
        print(f"{name}: {rows[-1]['flops_per_sample'] / 1e9:,.0f} GFLOPs, {rows[-1]['rows_per_sample']:.0f} rows, "
              f"{rows[-1]['seconds_per_sample']:.2f} s per sample", flush=True)
    base = rows[0]
    run_shape = dict(G=G, block=block, prompt=prompt, run_width=width, run_layers=layers, run_vocab=vocab)
    if cpu:
        run_shape.update(samples=samples, threads=threads, flops_counted_for="run model",
                         plain_blocks=args.plain_blocks, wall_seconds=time.perf_counter() - t_all)
    for r in rows:
        r["flops_ratio_to_plain"] = base["flops_per_sample"] / r["flops_per_sample"]
        r.update(shape=dict(run_shape))
        if cpu:  # rates only where the FLOPs are those of the model that ran
            r["gflops_per_second"] = r["flops_per_sample"] / r["seconds_per_sample"] / 1e9
            # The rate inside the model's calls alone (ForwardLog's seconds): the rest of the time is the
            # sampler's own work around them.
            r["model_gflops_per_second"] = r["flops_per_sample"] / r["forward_seconds_per_sample"] / 1e9
    for r in rows if cpu else ():
        r["rate_ratio_to_plain"] = r["gflops_per_second"] / base["gflops_per_second"]
        r["model_rate_ratio_to_plain"] = r["model_gflops_per_second"] / base["model_gflops_per_second"]
    print(rate_table(rows) if cpu else table(rows))
    print(f"\nRoofline: LLaDA-8B's forwards of each setting on an {H100} ({H100_PEAK_FLOPS / 1e12:.0f} TFLOP/s, "
          f"{H100_BANDWIDTH / 1e12:.2f} TB/s)")
    print(roofline_table(rows))
    toys = []
    if not cpu:
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
