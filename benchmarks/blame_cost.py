"""What targeted re-masking's blame costs per call, beside the reward call it accompanies.

For n generations of G tokens (random token ids, and RTP text encoded then cut to G tokens), times
`PolicyReward.__call__` (decode and score) and `PolicyReward.blame` (decode, attribute characters,
map them to token positions), and the character-to-token bridge alone, on two tokenizers: the tiny
word-level tokenizer, and a byte-level BPE trained here on RTP text, a stand-in for LLaDA's tokenizer
(also a byte-level BPE, 126k entries) since the hub is out of reach offline.

    python benchmarks/blame_cost.py                       # G 128, n 8, offline policy
    python benchmarks/blame_cost.py --policy default      # Detoxify: occlusion, counted in texts
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rtp.settings import default_rtp_dir  # noqa: E402


def rtp_texts() -> list[str]:
    path = default_rtp_dir() / "challenging.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["prompt"]["text"] + (r.get("continuation") or {}).get("text", "") for r in rows]


def byte_level_bpe(texts: list[str], size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                                length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def batches(tokenizer, texts, n: int, G: int, rounds: int, seed: int = 0):
    """`rounds` batches of n rows: half random ids, half RTP text (several texts joined, cut to G)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(rounds):
        rows = []
        for i in range(n):
            if i % 2:
                rows.append(torch.randint(0, len(tokenizer), (G,), generator=g).tolist())
            else:
                ids, k = [], (r * n + i) * 7
                while len(ids) < G:
                    ids += tokenizer(texts[k % len(texts)], add_special_tokens=False)["input_ids"]
                    k += 1
                rows.append(ids[:G])
        out.append(torch.tensor(rows))
    return out


def timed(fn, batches) -> float:
    """Median milliseconds per call."""
    times = []
    for ids in batches:
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="offline")
    p.add_argument("--G", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--bpe-size", type=int, default=8000)
    args = p.parse_args(argv)

    from safegen.policy import load_policy
    from safegen.policy.attribution import token_spans
    from safegen.models.tiny import build_tiny_tokenizer

    texts = rtp_texts()
    policy = load_policy(args.policy)
    print(f"policy {args.policy}, n = {args.n} rows of G = {args.G} tokens, median of {args.rounds} calls, "
          f"torch threads {torch.get_num_threads()}")
    print("| tokenizer | reward call (ms) | blame call (ms) | of which token spans (ms) | blame texts / row |")
    print("|---|---:|---:|---:|---:|")
    for name, tokenizer in (("tiny word-level", build_tiny_tokenizer()),
                            (f"byte-level BPE ({args.bpe_size})", byte_level_bpe(texts, args.bpe_size))):
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        data = batches(tokenizer, texts, args.n, args.G, args.rounds)
        reward = policy.reward_fn(tokenizer, stop_ids=[eos])
        reward(data[0]), reward.blame(data[0])  # warm up: lazy model loads
        reward.blame_texts = 0
        r_ms = timed(reward, data)
        b_ms = timed(reward.blame, data)
        s_ms = timed(lambda ids: [token_spans(tokenizer, row) for row in ids.tolist()], data)
        print(f"| {name} | {r_ms:.1f} | {b_ms:.1f} | {s_ms:.1f} | {reward.blame_texts / (args.n * args.rounds):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
