"""`safegen detoxify` on the step-level engine against an earlier checkout: seconds, and the same records.

Runs `safegen detoxify` as a subprocess on one prompt file with this checkout and with `--baseline`
(another checkout of safegen, e.g. `git worktree add /tmp/base 9d9a1a6`: before the engine, detoxify
ran fixed batches of --batch-size prompts, left padded together), the two interleaved over --rounds so
that a shared machine's drift hits both alike. Prints the samples/s of each, the ratio, and whether
the records are equal but for their timing (they must be: a sample's tokens depend only on its
prompt, seed and settings).

The prompts are --prompts lines of 2 to 24 words, so that lengths differ within a batch; the model is
the tiny one (written to a temporary folder; --width and --layers make it compute-bound) unless
--model names a folder. The settings are
detoxify's defaults (dual cache, IterRef under the middleware preset) at --max-new-tokens.

    python -m benchmarks.detoxify_engine --baseline /tmp/base
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

REPO = Path(__file__).resolve().parents[1]
WORDS = ("you are such a stupid idiot and i hate the way you talk about my family every single day "
         "the museum opens at nine in the morning and closes late on fridays during the summer").split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(7 * i) % 20:(7 * i) % 20 + 2 + (5 * i) % 23]) for i in range(n)]


def run(code: Path, src: Path, out: Path, model: str, args) -> float:
    for f in out.parent.glob(out.name + "*"):
        f.unlink()
    cmd = [sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model", model,
           "--quantization", "none", "--policy", "offline", "--temperature", "1.0", "--samples", str(args.samples),
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True, capture_output=True,
                   timeout=1800)
    return time.perf_counter() - t0


def records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("seconds", None)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, type=Path, help="another checkout of safegen to compare with")
    p.add_argument("--model", default=None, help="a model folder (default: the tiny model, written now)")
    p.add_argument("--width", type=int, default=None,
                   help="write the tiny model this wide instead (d_model; heads of 64, MLP 3x): compute-bound")
    p.add_argument("--layers", type=int, default=None, help="... with this many layers")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from safegen.models.tiny import write_tiny_model
            size = {} if args.width is None else dict(d_model=args.width, n_heads=args.width // 64,
                                                      mlp_hidden_size=3 * args.width)
            size.update({} if args.layers is None else dict(n_layers=args.layers))
            model = str(write_tiny_model(tmp / "tiny", seed=0, **size))
        src = tmp / "prompts.txt"
        src.write_text("\n".join(prompts(args.prompts)) + "\n")
        codes = {"engine": REPO, "baseline": args.baseline.resolve()}
        seconds = {name: [] for name in codes}
        outputs = {}
        for _ in range(args.rounds):
            for name, code in codes.items():
                outputs[name] = tmp / f"{name}.jsonl"
                seconds[name].append(run(code, src, outputs[name], model, args))
        n = args.prompts * args.samples
        rate = {name: n / min(s) for name, s in seconds.items()}  # the best round: the least disturbed
        same = records(outputs["engine"]) == records(outputs["baseline"])
    shape = "tiny model" if args.width is None else f"d_model {args.width}, {args.layers or 2} layers"
    print(f"{shape}: {n} samples ({args.prompts} prompts x {args.samples}), G {args.max_new_tokens}, "
          f"--batch-size {args.batch_size}, --threads {args.threads}, best of {args.rounds} rounds")
    for name in codes:
        print(f"{name:>8}: {rate[name]:.2f} samples/s  (runs: {', '.join(f'{s:.1f} s' for s in seconds[name])})")
    print(f"engine / baseline: x{rate['engine'] / rate['baseline']:.2f} samples/s; records equal but for timing: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
