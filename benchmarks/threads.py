"""How torch's CPU thread count changes a request's time in `safegen serve` (the --threads default).

Starts the real server once per thread count (127.0.0.1, a free port), sends a warm-up request, then
--requests sequential chat requests of --max-tokens tokens, each with its own seed, and prints the
median and p90 latency per thread count and the ratio to one thread. The counts compared are 1,
torch's own default on this machine (one per core it sees), and safegen's default (usable cores minus
one); counts are interleaved over --rounds rounds, so that a shared machine's drift hits each alike.
`--busy N` runs N processes that spin on the CPU for the whole measurement: a neighbour on a shared
machine, or the server's own scorers and event loop competing with torch's threads.

    python -m benchmarks.threads                      # the tiny model, written to a temporary folder
    python -m benchmarks.threads --model DIR --max-tokens 32 --threads 1 2 4

Requests are bounded in count and every wait has a timeout.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serve_process import ServerProcess


def measure(model: str, threads: int, requests: int, max_tokens: int, log: Path, seed0: int) -> list[float]:
    server = ServerProcess(model, log, "--policy", "offline", "--threads", str(threads), "--temperature", "1",
                           "--max-new-tokens", str(max_tokens))
    try:
        body = {"model": model, "messages": [{"role": "user", "content": "tell me about the weather"}],
                "max_tokens": max_tokens}
        server.request("POST", "/v1/chat/completions", {**body, "seed": 0}, timeout=600)  # warm-up
        times = []
        for i in range(requests):
            started = time.monotonic()
            status, _, answer = server.request("POST", "/v1/chat/completions", {**body, "seed": seed0 + i}, timeout=600)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {answer}")
            times.append(time.monotonic() - started)
        return times
    finally:
        server.terminate()


def spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def main(argv=None) -> int:
    import torch

    from safegen.threads import default_threads, usable_cores

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model folder (default: the tiny model, written now)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts (default: 1, torch's default and safegen's default)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile (default 0)")
    args = p.parse_args(argv)
    torch_default = torch.get_num_threads()
    counts = args.threads or sorted({1, torch_default, default_threads()})
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from safegen.models.tiny import write_tiny_model

            model = str(write_tiny_model(Path(tmp) / "tiny", seed=0))
        times = {n: [] for n in counts}
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
        for s in spinners:
            s.start()
        try:
            for r in range(args.rounds):
                for n in counts:
                    times[n] += measure(model, n, args.requests, args.max_tokens, Path(tmp) / f"serve-{n}.log",
                                        seed0=1000 * r + 1)
        finally:
            stop.set()
            for s in spinners:
                s.join(10)
    print(f"# usable cores {usable_cores()}, torch's default threads {torch_default}, safegen's default "
          f"{default_threads()}; {args.rounds} x {args.requests} sequential requests of {args.max_tokens} tokens; "
          f"{args.busy} busy process(es) beside")
    print("| threads | median s | p90 s | median / 1 thread |")
    print("|---|---|---|---|")
    base = statistics.median(times[counts[0]])
    for n in counts:
        t = sorted(times[n])
        print(f"| {n} | {statistics.median(t):.3f} | {t[int(0.9 * (len(t) - 1))]:.3f} | "
              f"{statistics.median(t) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
