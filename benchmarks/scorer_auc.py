"""How well the offline scorers rank real text: ROC AUC against Perspective's labels on RTP.

The texts are every prompt and continuation of the RealToxicityPrompts samples in ../shared/data/rtp
(challenging.jsonl and random.jsonl; `$SAFEGEN_RTP_DIR` overrides) that has a Perspective toxicity;
a text is toxic when that toxicity is >= 0.5. Each scorer's score ranks the texts, and ROC AUC is the
probability that a random toxic text outranks a random non-toxic one (ties count half).

    python benchmarks/scorer_auc.py            # prints a Markdown table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RTP_FILES = ("challenging.jsonl", "random.jsonl")


def rtp_dir() -> Path:
    if os.environ.get("SAFEGEN_RTP_DIR"):
        return Path(os.environ["SAFEGEN_RTP_DIR"]).expanduser()
    return REPO.parent / "shared" / "data" / "rtp"


def rtp_texts(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, Perspective toxicity, source) for every prompt and continuation with a toxicity."""
    texts, toxicity, source = [], [], []
    for name in RTP_FILES:
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for part in ("prompt", "continuation"):
                item = row.get(part) or {}
                if item.get("toxicity") is not None and item.get("text") is not None:
                    texts.append(item["text"])
                    toxicity.append(item["toxicity"])
                    source.append(part)
    return texts, np.array(toxicity), source


def scores_by_name(texts: list[str]) -> dict[str, np.ndarray]:
    from safegen.policy import load_policy
    from safegen.policy.scorers import ProfanityCheckScorer, ToxicLSTMScorer

    lstm = ToxicLSTMScorer.from_options({}).score(texts)
    neural = load_policy("eval-neural").score(texts).aggregate
    lexicon = load_policy("eval-offline").score(texts).aggregate
    out = {f"toxic_lstm {label}": values for label, values in lstm.items()}
    out["eval-neural (toxic_lstm, highest label)"] = neural
    out["profanity_check"] = ProfanityCheckScorer.from_options({}).score(texts)["profanity"]
    out["eval-offline (word list, 0/1)"] = lexicon
    # Does the word list add anything to the network? Its hits moved to the top of the ranking.
    out["eval-neural, word-list hits set to 1"] = np.maximum(neural, lexicon)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rtp-dir", type=Path, default=None, help="default ../shared/data/rtp or $SAFEGEN_RTP_DIR")
    args = p.parse_args(argv)
    folder = args.rtp_dir or rtp_dir()
    if not all((folder / name).is_file() for name in RTP_FILES):
        print(f"scorer_auc: no RTP samples in {folder} (set SAFEGEN_RTP_DIR or --rtp-dir)", file=sys.stderr)
        return 2
    from sklearn.metrics import roc_auc_score

    texts, toxicity, source = rtp_texts(folder)
    toxic = toxicity >= 0.5
    is_prompt = np.array([s == "prompt" for s in source])
    print(f"{len(texts)} texts ({is_prompt.sum()} prompts, {(~is_prompt).sum()} continuations), "
          f"{toxic.sum()} with Perspective toxicity >= 0.5\n")
    print("| scorer | ROC AUC, all | prompts | continuations |")
    print("| --- | ---: | ---: | ---: |")
    for name, score in scores_by_name(texts).items():
        cells = [roc_auc_score(toxic[m], score[m]) for m in (slice(None), is_prompt, ~is_prompt)]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
