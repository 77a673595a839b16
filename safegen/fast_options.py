"""The command line's fast-sampling flags (--cache, --threshold, --fast); light: no torch, so that
`--help` and argument errors stay instant. The sampling itself is safegen/fast.py."""

# --fast: the dual cache alone. It cuts the model FLOPs of plain sampling about 7.8x at G = 256 and
# keeps the step count fixed, so IterRef's refinement points, budget plans and allowances stay as
# computed; the threshold makes the steps depend on the model's confidence and commits several tokens
# from their separate marginals, a further departure from LLaDA's sampler: it stays opt-in.
FAST = {"cache": "dual"}


def add_arguments(group) -> None:
    group.add_argument("--cache", choices=("prefix", "dual"), default=None,
                       help="Fast-dLLM block-wise key/value cache (approximate; default off: exact)")
    group.add_argument("--threshold", type=float, default=None,
                       help="also commit every block position whose candidate's probability exceeds this "
                            "(Fast-dLLM parallel decoding, e.g. 0.9; default off)")
    group.add_argument("--fast", action="store_true",
                       help="shorthand for --cache dual (about 7.8x fewer model FLOPs at 256 tokens)")


def options(args) -> dict:
    out = dict(FAST) if getattr(args, "fast", False) else {}
    for name in ("cache", "threshold"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out
