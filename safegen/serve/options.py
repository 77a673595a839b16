"""`safegen serve`'s command-line arguments: the model, policy, sampling and refinement flags of the
other commands (the server's defaults; `--policy` may repeat), plus the network, key, limit and
batching flags below. Imports nothing heavy, so `--help` and argument errors stay quick."""
from __future__ import annotations

import argparse

from ..arguments import model_arguments, positive as _positive


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser, many_policies=True)
    n = parser.add_argument_group("network and access")
    n.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    n.add_argument("--port", type=_port, default=8000, help="default 8000")
    n.add_argument("--served-model-name", default=None,
                   help="the model id clients send in `model` (default: the --model value)")
    n.add_argument("--api-key-file", default=None,
                   help="a file of API keys, one a line: every request but /health then needs "
                        "`Authorization: Bearer <key>` with one of them")
    n.add_argument("--log-content", action="store_true",
                   help="log prompts and answers (off by default: only ids, counts and outcomes are logged)")

    limits = parser.add_argument_group("limits (beyond each, a request is refused with a message naming it)")
    limits.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="request body size (default 1 MiB)")
    limits.add_argument("--max-prompt-tokens", type=_positive, default=None,
                        help="tokens of a prompt after the chat template (default: the model's context "
                             "length minus --max-tokens)")
    limits.add_argument("--max-tokens", type=_positive, default=None,
                        help="cap on a request's max_tokens (default: 512, or half the model's context if less, "
                             "and at least --max-new-tokens)")
    limits.add_argument("--max-n", type=_positive, default=8, help="samples per request, n x prompts (default 8)")
    limits.add_argument("--max-queue", type=_positive, default=64,
                        help="requests waiting for a batch; beyond it 429 with Retry-After (default 64)")

    b = parser.add_argument_group("batching")
    b.add_argument("--max-batch-rows", type=_positive, default=16,
                   help="samples running at once (default 16): requests that share a sampler configuration "
                        "and wait together run as one group of up to this many samples, and groups advance "
                        "step by step in turn while their samples fit; 1 runs every sample alone")
    b.add_argument("--scheduling", choices=("step", "batch"), default="step",
                   help="step (default): a group joins and leaves the running ones at any sampler step, so a "
                        "short request is not held behind a long one; batch: each group runs to its end "
                        "before the next starts (the fixed batches of earlier versions, for comparison)")
    b.add_argument("--batch-wait-ms", type=_non_negative_float, default=10.0,
                   help="how long a batch waits to fill while more requests are arriving (default 10 ms)")
    b.add_argument("--drain-timeout", type=_non_negative_float, default=600.0,
                   help="after SIGTERM, seconds to let requests in flight finish before exiting anyway (default 600)")
