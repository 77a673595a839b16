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

Two more scenarios compare the step-level scheduler (`--scheduling step`, the default) with fixed
batches run to their end (`--scheduling batch`, the scheduling of earlier versions), both servers
batching up to --max-batch-rows samples:

    python -m benchmarks.serve_load --scenario short-behind-long   # a 16-token request behind a 256-token one
    python -m benchmarks.serve_load --scenario mixed               # 16 clients, answers of 4, 16 and 64 tokens

`short-behind-long` times a --short-tokens request alone, a --long-tokens request alone, and the
short one sent once the long one is in flight; `mixed` sends --requests chat requests from
--mixed-clients threads, request i asking for (4, 16, 64)[i % 3] tokens, and checks that both
schedules give every request the same answer.

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


def timed(server: Client, model: str, max_tokens: int, seed: int) -> tuple[float, str]:
    started = time.monotonic()
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": model, "messages": prompt(seed), "seed": seed, "max_tokens": max_tokens}, timeout=600)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body}")
    return time.monotonic() - started, body["choices"][0]["message"]["content"]


def short_behind_long(server: Client, model: str, short: int, long: int, repeats: int = 3) -> dict:
    """The short request alone (median of `repeats`), the long one alone, and the short one sent
    while the long one runs (it is sent 0.3 s after the long one: in flight by then)."""
    alone = sorted(timed(server, model, short, 7 + k)[0] for k in range(repeats))[repeats // 2]
    long_alone = timed(server, model, long, 1)[0]
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(timed, server, model, long, 1)
        time.sleep(0.3)
        behind = timed(server, model, short, 7)[0]
        long_beside = running.result(600)[0]
    return {"short_alone": alone, "long_alone": long_alone, "short_behind_long": behind, "long_beside": long_beside}


def mixed(server: Client, model: str, clients: int, requests: int) -> dict:
    """`requests` chat requests from `clients` threads, request i of (4, 16, 64)[i % 3] tokens."""
    lengths = (4, 16, 64)

    def one(i: int):
        seconds, text = timed(server, model, lengths[i % 3], 500 + i)
        return i, seconds, text

    started = time.monotonic()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.monotonic() - started
    latencies = sorted(r[1] for r in results)
    short = sorted(r[1] for r in results if lengths[r[0] % 3] == 4)
    return {"rps": requests / wall, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "p50_4_tokens": percentile(short, 50), "answers": {r[0]: r[2] for r in results}}


def scenarios(args, env) -> int:
    """short-behind-long or mixed, on a step-level server and a fixed-batch one."""
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from safegen.models.tiny import write_tiny_model
            model = str(write_tiny_model(Path(tmp) / "tiny-model", seed=0))
        common = ["--policy", args.policy, "--temperature", "1", "--max-new-tokens", "4", "--max-tokens", "256",
                  "--max-queue", "256", "--quantization", args.quantization, "--max-batch-rows",
                  str(args.max_batch_rows), "--batch-wait-ms", str(args.batch_wait_ms)]
        if args.threads:
            common += ["--threads", args.threads]
        servers = {mode: ServerProcess(model, Path(tmp) / f"{mode}.log", *common, "--scheduling", mode, env=env,
                                       wait=False) for mode in ("step", "batch")}
        try:
            for server in servers.values():
                server.wait_ready()
            results = {}
            for mode, server in servers.items():
                timed(server, model, 4, 0)  # warm-up
                if args.scenario == "short-behind-long":
                    r = results[mode] = short_behind_long(server, model, args.short_tokens, args.long_tokens)
                    print(f"{mode:>6}: short alone {r['short_alone']:.3f} s, long alone {r['long_alone']:.2f} s, "
                          f"short behind long {r['short_behind_long']:.3f} s = {r['short_behind_long'] / r['long_alone']:.3f}"
                          f" of the long one's time ({r['short_behind_long'] / r['short_alone']:.1f}x alone); "
                          f"the long one beside it {r['long_beside']:.2f} s", flush=True)
                else:
                    r = results[mode] = mixed(server, model, args.mixed_clients, args.requests)
                    print(f"{mode:>6}: {r['rps']:.2f} req/s, p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s, "
                          f"p50 of the 4-token requests {r['p50_4_tokens']:.2f} s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    if args.scenario == "mixed":
        same = results["step"]["answers"] == results["batch"]["answers"]
        s, b = results["step"], results["batch"]
        print(f"step / batch: throughput x{s['rps'] / b['rps']:.2f}, p50 x{s['p50'] / b['p50']:.2f}, "
              f"p95 x{s['p95'] / b['p95']:.2f}, 4-token p50 x{s['p50_4_tokens'] / b['p50_4_tokens']:.2f}")
        print(f"answers equal under both schedules: {same} ({len(s['answers'])} requests)")
        return 0 if same else 1
    return 0


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
    parser.add_argument("--scenario", choices=("levels", "short-behind-long", "mixed"), default="levels",
                        help="levels (default): concurrency levels, batching against one by one; the others: "
                             "the step-level schedule against fixed batches")
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--mixed-clients", type=int, default=16)
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.max_tokens = "1,4", 8, 8
    levels = [int(c) for c in args.concurrency.split(",")]
    env = {"OMP_NUM_THREADS": args.threads} if args.threads else None
    if args.scenario != "levels":
        return scenarios(args, env)

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
