"""Throughput and latency of `safegen serve` under concurrent clients, with batching and without.

Starts the real server twice on a free local port (127.0.0.1 only): with batching (batches of up to
--max-batch-rows samples, --batch-wait-ms to fill) and with batches of one sample. At each
concurrency level, that many client threads send chat requests back to back until --requests are
answered; every request has its own seed, and the first answers of both servers are checked equal
(batching must not change an answer). Prints requests/s and p50/p95 latency per level, and the ratios
batched / one-by-one.

    python -m benchmarks.serve_load                  # the tiny model, written to a temporary folder
    python -m benchmarks.serve_load --model DIR --quantization 4bit --max-tokens 64   # a real one
    python -m benchmarks.serve_load --quick          # the smoke test's size: seconds
    python -m benchmarks.serve_load --batched-url URL --one-by-one-url URL2 [--api-key K]   # running servers

Against running servers it measures what they were started with: one with batching, one with
`--max-batch-rows 1`, both with `--temperature 1` and queues of at least the top concurrency.

Requests are bounded in count (--requests per level) and every wait has a timeout.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serve_process import Client, ServerProcess

WORDS = "the neighbours dog was loud again today and i think we should talk about what happened".split()


def prompt(i: int) -> list:
    return [{"role": "user", "content": " ".join(WORDS[i % 5: i % 5 + 2 + i % 9])}]


def run_level(server: Client, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` chat requests from `concurrency` threads; latencies and answers by request index."""
    def one(i: int):
        started = time.monotonic()
        status, _, body = server.request("POST", "/v1/chat/completions", {
            "model": model, "messages": prompt(i), "seed": 100 + i, "max_tokens": max_tokens}, timeout=600)
        if status != 200:
            raise RuntimeError(f"request {i}: HTTP {status}: {body}")
        return i, time.monotonic() - started, body["choices"][0]["message"]["content"]

    started = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.monotonic() - started
    latencies = sorted(r[1] for r in results)
    return {"rps": requests / wall, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "answers": {r[0]: r[2] for r in results}}


def measure(servers: dict, levels: list, args) -> tuple[dict, dict]:
    """Each level on each server in turn (batched, one-by-one, next level, ...): on a shared machine
    the load drifts, and interleaving gives both modes the same drift."""
    table, answers, models = {}, {}, {}
    for mode, server in servers.items():
        status, listing = server.get("/v1/models")
        if status != 200:
            raise RuntimeError(f"{server.url}/v1/models: HTTP {status}: {listing}")
        models[mode] = listing["data"][0]["id"]
        run_level(server, models[mode], 1, 1, args.max_tokens)  # warm-up: first forward, first policy call
    for c in levels:
        for mode, server in servers.items():
            result = run_level(server, models[mode], c, args.requests, args.max_tokens)
            table[mode, c] = result
            answers.setdefault(mode, {}).update(result["answers"])
            print(f"{mode:>10}  concurrency {c:>2}: {result['rps']:6.2f} req/s   p50 {result['p50']:6.2f} s"
                  f"   p95 {result['p95']:6.2f} s", flush=True)
    return table, answers


def percentile(sorted_values: list, q: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the tiny model, written anew)")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--policy", default="offline")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level (default 48)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", default=None,
                        help="OMP_NUM_THREADS for the server (on a shared 2-core machine 1 is ~10x faster)")
    parser.add_argument("--quick", action="store_true", help="8 requests at concurrency 1 and 4, 8 tokens")
    parser.add_argument("--batched-url", default=None, help="measure this running server (batching on)")
    parser.add_argument("--one-by-one-url", default=None, help="... and this one (--max-batch-rows 1)")
    parser.add_argument("--api-key", default=None, help="bearer key for the running servers")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.max_tokens = "1,4", 8, 8
    levels = [int(c) for c in args.concurrency.split(",")]
    env = {"OMP_NUM_THREADS": args.threads} if args.threads else None

    if args.batched_url or args.one_by_one_url:
        if not (args.batched_url and args.one_by_one_url):
            parser.error("--batched-url and --one-by-one-url go together")
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        servers = {"batched": Client(args.batched_url, headers), "one-by-one": Client(args.one_by_one_url, headers)}
        table, answers = measure(servers, levels, args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model
            if model is None:
                from safegen.models.tiny import write_tiny_model
                model = str(write_tiny_model(Path(tmp) / "tiny-model", seed=0))
            common = ["--policy", args.policy, "--temperature", "1", "--max-new-tokens", str(args.max_tokens),
                      "--max-queue", str(max(levels) * 2), "--quantization", args.quantization]
            modes = {"batched": ["--max-batch-rows", str(args.max_batch_rows), "--batch-wait-ms",
                                 str(args.batch_wait_ms)],
                     "one-by-one": ["--max-batch-rows", "1", "--batch-wait-ms", "0"]}
            # Both servers start at once (start-up is most of a quick run); they are measured in turn.
            servers = {mode: ServerProcess(model, Path(tmp) / f"{mode}.log", *common, *flags, env=env, wait=False)
                       for mode, flags in modes.items()}
            try:
                for server in servers.values():
                    server.wait_ready()
                table, answers = measure(servers, levels, args)
            finally:
                for server in servers.values():
                    server.stop()
    same = answers["batched"] == answers["one-by-one"]
    print(f"answers equal with and without batching: {same} ({len(answers['batched'])} seeds)")
    print("ratios batched / one-by-one:")
    for c in levels:
        b, o = table["batched", c], table["one-by-one", c]
        print(f"  concurrency {c:>2}: throughput x{b['rps'] / o['rps']:.2f}   p50 x{b['p50'] / o['p50']:.2f}"
              f"   p95 x{b['p95'] / o['p95']:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
