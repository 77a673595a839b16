"""Regenerate safegen/data/tiny_vocab.txt, the word list of the tiny offline tokenizer.

The words are the most frequent lowercase word tokens of the RealToxicityPrompts samples (prompt and
continuation texts of challenging.jsonl and random.jsonl), split exactly as the tiny tokenizer splits
text. Taking them from toxic and benign web text keeps the profanity in, so that a detoxification demo
on the tiny model has toxic words to remove.

    python benchmarks/build_tiny_vocab.py ../shared/data/rtp [--size 4000] [--out safegen/data/tiny_vocab.txt]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from safegen.models.tiny import TINY_VOCAB_FILE, split_words

RTP_FILES = ("challenging.jsonl", "random.jsonl")
# Punctuation and digits, each its own token under the tokenizer's split.
SYMBOLS = list(".,!?'\"-:;()[]/*&%$#@\u2014\u2013") + [str(d) for d in range(10)]
WORD = re.compile(r"[a-z]+")


def count_words(rtp_dir: Path) -> Counter:
    counts = Counter()
    for name in RTP_FILES:
        path = rtp_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: rtp_dir must hold {', '.join(RTP_FILES)}")
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err})") from None
            for part in ("prompt", "continuation"):
                text = (row.get(part) or {}).get("text") or ""
                counts.update(w for w in split_words(text) if WORD.fullmatch(w))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rtp_dir", type=Path, help="folder holding the RealToxicityPrompts jsonl files")
    parser.add_argument("--size", type=int, default=4000, help="number of words to keep (default 4000)")
    parser.add_argument("--out", type=Path, default=TINY_VOCAB_FILE, help="file to write")
    args = parser.parse_args(argv)

    counts = count_words(args.rtp_dir)
    # Ties broken alphabetically so the file is the same on every run.
    words = sorted(counts, key=lambda w: (-counts[w], w))[:args.size]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(SYMBOLS + words) + "\n", encoding="utf-8")
    print(f"wrote {len(SYMBOLS) + len(words)} tokens to {args.out} "
          f"(least frequent kept word seen {counts[words[-1]]} times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
