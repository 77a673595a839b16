"""Peak memory of a batch run and of its resume against the number of records (issue 16, item 6).

Each measurement is a fresh Python process running safegen.batch.run_batch with a fake generator
that returns reports of about 900 bytes at once (the size of a real report line), so what is
measured is the batch bookkeeping, not a model. Peak resident memory is the process's ru_maxrss;
"over base" subtracts that of a process that imported safegen and built the same prompt list
(prompts are input, kept by any run). The resume reruns the same command on the finished output:
it reads every record and writes none. With --sharded, a world-2 run: rank 0 then rank 1 in one
process, the second merging the parts (a k-way merge of sorted files).

    python -m benchmarks.batch_memory --records 40000 200000 1000000 --sharded --dir /tmp/batch-memory
    python -m benchmarks.batch_memory --code /path/to/other/checkout ...   # another version of safegen
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog " * 7  # 308 characters


def fake_generate(lines, seeds):
    return [{"prompt": p.text, "seed": s, "text_before": TEXT, "text_after": TEXT, "text": TEXT,
             "toxic_before": s % 7 == 0, "toxic_after": False, "refined": s % 7 == 0, "action": "none",
             "toxicity_before": {"aggregate": 0.5, "labels": {"toxicity": 0.5}, "toxic": False},
             "toxicity_after": {"aggregate": 0.1, "labels": {"toxicity": 0.1}, "toxic": False},
             "rows": 64.0, "rows_before": 32.0, "reward_calls": 5.0, "acceptance_rate": 0.5, "seconds": 0.01}
            for p, s in zip(lines, seeds)]


def child(mode: str, output: str, records: int, samples: int) -> None:
    from safegen import batch

    prompts = [batch.PromptLine(i, i + 1, f"prompt number {i} is about") for i in range(records // samples)]
    t0 = time.perf_counter()
    # "sharded": two ranks one after the other in this process; the second merges the parts.
    shards = [batch.Shard(0, 2), batch.Shard(1, 2)] if mode == "sharded" else [batch.Shard()] * (mode != "base")
    for shard in shards:
        result = batch.run_batch(prompts, output, fake_generate, samples=samples, seed=0, batch_size=1000,
                                 fingerprint={"benchmark": "batch_memory", "samples": samples}, shard=shard,
                                 progress=False)
    if shards:
        assert batch.summarize(result)["samples"] == records
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - t0}))


def measure(code: Path, mode: str, output: Path, records: int, samples: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(output),
                          str(records), str(samples)], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[40_000, 200_000, 1_000_000])
    ap.add_argument("--samples", type=int, default=25, help="samples per prompt (RealToxicityPrompts: 25)")
    ap.add_argument("--dir", type=Path, default=Path("runs/batch-memory"))
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose safegen is measured")
    ap.add_argument("--sharded", action="store_true",
                    help="also measure a world-2 run (both ranks in one process, the second merges)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, output, records, samples = args.child
        child(mode, output, int(records), int(samples))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"safegen from {args.code}; {args.samples} samples per prompt; peak RSS (ru_maxrss) in MB")
    print(f"{'records':>9} {'file MB':>8} {'base':>7} {'run':>7} {'resume':>7} {'2 ranks':>8} {'run-base':>9} "
          f"{'resume-base':>12} {'2 ranks-base':>13} {'run s':>7} {'resume s':>9}")
    for records in args.records:
        output = args.dir / f"out-{records}.jsonl"
        for leftover in args.dir.glob(f"{output.name}*"):
            leftover.unlink()
        base = measure(args.code, "base", output, records, args.samples)
        run = measure(args.code, "run", output, records, args.samples)
        resume = measure(args.code, "resume", output, records, args.samples)
        size = output.stat().st_size / 1e6
        for leftover in args.dir.glob(f"{output.name}*"):
            leftover.unlink()
        sharded = measure(args.code, "sharded", output, records, args.samples) if args.sharded else {"peak_mb": 0}
        peaks = [base, run, resume, sharded]
        print(f"{records:>9} {size:>8.0f} " + " ".join(f"{p['peak_mb']:>{w}.0f}" for p, w in zip(peaks, (7, 7, 7, 8)))
              + " " + " ".join(f"{p['peak_mb'] - base['peak_mb']:>{w}.0f}" for p, w in zip(peaks[1:], (9, 12, 13)))
              + f" {run['seconds']:>7.1f} {resume['seconds']:>9.1f}", flush=True)
        for leftover in args.dir.glob(f"{output.name}*"):
            leftover.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
