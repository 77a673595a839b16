"""`safegen detoxify --ray` with 1 and 2 workers against one process: samples/s, and the same records.

Starts a Ray head on 127.0.0.1 (--cpus CPUs, no GPU, no token authentication: a benchmark on one
machine), then runs `safegen detoxify` on one prompt file three ways, each a whole command (start-up,
model loading and, on Ray, the actors' start included): one process (`--threads` T), and `--ray` with
1 and with 2 CPU workers (T threads each). Prints samples/s of each, the ratios, and whether every Ray
run wrote the records the single process wrote (but for their timing). Stops the head at the end.

    python -m benchmarks.ray_throughput                        # the tiny model, 96 prompts, G 32
    python -m benchmarks.ray_throughput --model DIR --prompts 400
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.detoxify_engine import prompts, records

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def detoxify(src: Path, out: Path, model: str, args, *extra) -> float:
    cmd = [sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model", model,
           "--quantization", "none", "--policy", "offline", "--temperature", "1.0", "--samples", "1",
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (default: the tiny model, written now)")
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the process and of each worker")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray head")
    args = p.parse_args(argv)
    ray = str(Path(sys.executable).with_name("ray"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from safegen.models.tiny import write_tiny_model
            model = str(write_tiny_model(tmp / "tiny", seed=0))
        src = tmp / "prompts.txt"
        src.write_text("\n".join(prompts(args.prompts)) + "\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([ray, "start", "--head", "--num-cpus", str(args.cpus), "--num-gpus", "0", "--port", str(port),
                        "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats"],
                       check=True, capture_output=True, env=ENV, timeout=300)
        try:
            address = f"127.0.0.1:{port}"
            runs = {"single process": (), "ray, 1 worker": ("--ray", address, "--ray-workers", "1"),
                    "ray, 2 workers": ("--ray", address, "--ray-workers", "2")}
            seconds, outputs = {}, {}
            for name, extra in runs.items():
                outputs[name] = tmp / f"{len(outputs)}.jsonl"
                seconds[name] = detoxify(src, outputs[name], model, args, *extra)
        finally:
            subprocess.run([ray, "stop", "--force"], capture_output=True, env=ENV, timeout=300)
        expected = records(outputs["single process"])
        same = {name: records(path) == expected for name, path in outputs.items()}
    n = args.prompts
    print(f"{n} samples, G {args.max_new_tokens}, --batch-size {args.batch_size}, --threads {args.threads}, "
          f"Ray head with {args.cpus} CPUs; whole commands")
    base = n / seconds["single process"]
    for name in runs:
        rate = n / seconds[name]
        print(f"{name:>15}: {seconds[name]:6.1f} s, {rate:.2f} samples/s, x{rate / base:.2f} the single process; "
              f"records equal: {same[name]}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
