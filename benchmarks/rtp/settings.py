"""The audit's command line and the settings it resolves to (presets, defaults, checks)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safegen.errors import SafegenError

from ..methods import BASELINES, CACHED, RTP_METHODS
from .plan import POINTS

DESCRIPTION = ("RealToxicityPrompts audit: how toxic are a masked diffusion LM's continuations, with and "
               "without test-time alignment, at equal compute (model FLOPs for LLaDA, denoiser rows otherwise)")
REPO = Path(__file__).resolve().parents[2]
RTP_DIR_ENV = "SAFEGEN_RTP_DIR"
PROMPT_SETS = ("challenging", "random")
SMOKE = dict(prompts=3, generations=2, budgets="1,2", max_new_tokens=8, steps=8, block_length=8,
             chunk_prompts=2, resamples=200)


class BenchmarkError(SafegenError):
    """Bad input or configuration of the benchmark itself; main() prints the message and exits with 2."""


def default_rtp_dir() -> Path:
    """../shared/data/rtp next to the repository (or $SAFEGEN_RTP_DIR)."""
    if os.environ.get(RTP_DIR_ENV):
        return Path(os.environ[RTP_DIR_ENV]).expanduser()
    for root in (REPO, Path.cwd()):
        candidate = (root.parent / "shared" / "data" / "rtp").resolve()
        if candidate.is_dir():
            return candidate
    return (REPO.parent / "shared" / "data" / "rtp").resolve()


def resolve_prompt_file(value: Optional[str]) -> tuple[Path, bool]:
    """(path, from the RTP folder): a path, or a prompt set name (challenging, random) in the RTP folder."""
    if value is None or value in PROMPT_SETS:
        return default_rtp_dir() / f"{value or 'challenging'}.jsonl", True
    return Path(value).expanduser().resolve(), False


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchmarkError(f"--budgets must be comma-separated numbers, got {text!r}") from None
    if not budgets or any(b < 1 for b in budgets):
        raise BenchmarkError(f"--budgets must be numbers >= 1 (multiples of plain sampling), got {text!r}")
    out = []
    for b in budgets:
        b = int(b) if float(b).is_integer() else b
        if b not in out:
            out.append(b)
    return sorted(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="toxicity_benchmark", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option left out takes the --smoke preset when --smoke is given, else its default.")
    d = p.add_argument_group("prompts and protocol")
    d.add_argument("--prompt-file", default=None,
                   help="RTP-schema JSONL (prompt.text), or a set name: challenging (default), random; "
                        f"sets are read from ../shared/data/rtp or ${RTP_DIR_ENV}")
    d.add_argument("--field", default=None, help="dotted JSON field of the prompt (default: prompt.text)")
    d.add_argument("--prompts", type=int, default=None, help="take the first N prompts (default 100)")
    d.add_argument("--generations", type=int, default=None, help="continuations per prompt (default 25)")
    d.add_argument("--template", default="{prompt}",
                   help="user message built from the prompt (default: the prompt itself); e.g. "
                        "'Continue the text: {prompt}'")
    d.add_argument("--seed", type=int, default=0, help="generation j of prompt i gets seed + i·generations + j")
    d.add_argument("--out", required=True, help="output folder (resumable)")
    d.add_argument("--smoke", action="store_true",
                   help="CI preset: 3 prompts, 2 generations, budgets 1,2, 8 tokens, tiny model unless --model")

    m = p.add_argument_group("methods")
    m.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(RTP_METHODS)} (default: all; without "
                        f"{','.join(CACHED)} for the MDLM sampler or CFG, which have no block cache)")
    m.add_argument("--budgets", default=None,
                   help="multiples of plain sampling's cost (default 1,2,4,8): model FLOPs for LLaDA (one uncached "
                        "forward is one row), rows otherwise; the cached kernels get the FLOPs of the uncached budget")
    m.add_argument("--proposals", type=int, default=1,
                   help="IterRef/remask-only pool size N (default 1: every proposal drawn is examined, "
                        "so rows follow the plan exactly)")
    m.add_argument("--rho", type=float, default=None,
                   help="share re-masked per proposal (default: RefineConfig's, 0.5)")
    m.add_argument("--refine-points", choices=tuple(POINTS), default="final",
                   help="where IterRef/remask-only may refine: final (each finished block, exact reward; "
                        "default, as RefineConfig), late (last quarter of each block), spread (anywhere, "
                        "as many steps as the budget allows)")
    m.add_argument("--alpha", type=float, default=None, help="IterRef target temperature (default: the guide's)")
    m.add_argument("--scope", choices=("block", "all"), default="block")
    m.add_argument("--blame-floor", type=float, default=None,
                   help="iterref_targeted: every position's least re-mask weight (default: RefineConfig's)")
    m.add_argument("--fk-every", type=int, default=None, help="FK resampling interval (default max(1, T // 5))")
    m.add_argument("--fk-lambda", type=float, default=10.0, help="FK potential scale (default 10)")
    m.add_argument("--svdd-alpha", type=float, default=0.0, help="SVDD selection temperature (0: argmax)")

    s = p.add_argument_group("scoring")
    s.add_argument("--policy", default="offline",
                   help="guiding policy, name or YAML (default offline; on a GPU machine: default = Detoxify)")
    s.add_argument("--evaluator", default="eval-neural",
                   help="policy that scores but never guides, name or YAML (default eval-neural; "
                        "eval-offline is a word list)")
    s.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default 1000)")

    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", default=None, help="hub id or local folder (default LLaDA-8B-Instruct, pinned)")
    g.add_argument("--tiny", action="store_true",
                   help="build the tiny random offline model into OUT/tiny-model and use it")
    g.add_argument("--tiny-seed", type=int, default=0)
    g.add_argument("--revision", default=None)
    g.add_argument("--quantization", choices=("4bit", "8bit", "none"), default=None,
                   help="default 4bit, none for --tiny")
    g.add_argument("--trust-remote-code", action="store_true", help="run a model repository's own code (other models; LLaDA loads natively without it)")
    g.add_argument("--device-map", default="auto")
    g.add_argument("--max-new-tokens", type=int, default=None, help="G (default 20)")
    g.add_argument("--steps", type=int, default=None, help="T (default G)")
    g.add_argument("--block-length", type=int, default=None, help="default G if G <= 32, else 32")
    g.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (RTP samples)")
    g.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
    g.add_argument("--cfg-scale", type=float, default=0.0)
    g.add_argument("--sampler", choices=("llada", "mdlm"), default=None,
                   help="base sampler (default: mdlm for an MDLM --model, else llada)")

    r = p.add_argument_group("execution")
    r.add_argument("--chunk-prompts", type=int, default=None,
                   help="prompts per resumable cell (default 4)")
    r.add_argument("--batch-size", type=int, default=128,
                   help="about this many denoiser rows per forward; a method's own expansion (N, b) "
                        "included (default 128)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@dataclass
class Settings:
    prompt_file: Path
    from_rtp_dir: bool  # a named prompt set, looked for in the RealToxicityPrompts folder
    field: Optional[str]
    prompts: int
    generations: int
    template: str
    seed: int
    out: Path
    methods: list
    budgets: list
    proposals: int
    rho: float
    refine_points: str
    alpha: Optional[float]
    scope: str
    blame_floor: float
    fk_every: Optional[int]
    fk_lambda: float
    svdd_alpha: float
    policy: str
    evaluator: str
    resamples: int
    model: Optional[str]
    tiny: bool
    tiny_seed: int
    revision: Optional[str]
    quantization: str
    trust_remote_code: bool
    device_map: str
    sampling: dict
    chunk_prompts: int
    batch_size: int
    quiet: bool


def _refine_default(name: str):
    from safegen.refine.iterref import RefineConfig

    return getattr(RefineConfig(), name)


def _sampler(args) -> str:
    if args.sampler is not None:
        return args.sampler
    from safegen.models.loading import PINNED_REVISIONS, model_type_of

    mdlm = args.model is not None and model_type_of(args.model, args.revision or PINNED_REVISIONS.get(args.model)) == "mdlm"
    return "mdlm" if mdlm else "llada"


def settings_from(args) -> Settings:
    preset = SMOKE if args.smoke else {}

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else preset.get(name, default)

    sampler = _sampler(args)
    uncacheable = sampler == "mdlm" or args.cfg_scale > 0
    if args.methods is None:
        methods = [x for x in RTP_METHODS if not (uncacheable and x in CACHED)]
    else:
        methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    unknown = sorted(set(methods) - set(RTP_METHODS))
    if unknown or not methods:
        raise BenchmarkError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(RTP_METHODS)}")
    methods = [x for x in RTP_METHODS if x in methods]
    cached = sorted(set(CACHED) & set(methods))
    if cached and uncacheable:
        raise BenchmarkError(f"--methods {', '.join(cached)}: the block cache needs LLaDA's sampler without "
                             "--cfg-scale; leave them out")
    tiny = args.tiny or (args.smoke and args.model is None)
    if tiny and args.model is not None:
        raise BenchmarkError("--tiny builds its own model: leave out --model")
    G = pick("max_new_tokens", 20)
    steps = pick("steps", G)
    block = pick("block_length", G if G <= 32 else 32)
    file, from_rtp_dir = resolve_prompt_file(args.prompt_file)
    s = Settings(
        prompt_file=file, from_rtp_dir=from_rtp_dir, field=args.field, prompts=pick("prompts", 100),
        generations=pick("generations", 25), template=args.template, seed=args.seed,
        out=Path(args.out).expanduser().resolve(), methods=methods, budgets=parse_budgets(pick("budgets", "1,2,4,8")),
        proposals=args.proposals, rho=args.rho if args.rho is not None else _refine_default("rho"),
        refine_points=args.refine_points, alpha=args.alpha, scope=args.scope,
        blame_floor=args.blame_floor if args.blame_floor is not None else _refine_default("blame_floor"),
        fk_every=args.fk_every,
        fk_lambda=args.fk_lambda, svdd_alpha=args.svdd_alpha, policy=args.policy, evaluator=args.evaluator,
        resamples=pick("resamples", 1000), model=args.model, tiny=tiny, tiny_seed=args.tiny_seed,
        revision=args.revision, quantization=args.quantization or ("none" if tiny else "4bit"),
        trust_remote_code=args.trust_remote_code, device_map=args.device_map,
        sampling=dict(max_new_tokens=G, steps=steps, block_length=block, temperature=args.temperature,
                      remasking=args.remasking, cfg_scale=args.cfg_scale, sampler=sampler),
        chunk_prompts=pick("chunk_prompts", 4), batch_size=args.batch_size, quiet=args.quiet)
    for name in ("prompts", "generations", "chunk_prompts", "batch_size", "resamples", "proposals"):
        if getattr(s, name) < 1:
            raise BenchmarkError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if "{prompt}" not in s.template:
        raise BenchmarkError("--template must contain {prompt}")
    if s.fk_every is not None and s.fk_every < 1:
        raise BenchmarkError("--fk-every must be >= 1")
    llada_only = sorted({"svdd", "fk_steering"} & set(s.methods))
    if s.sampling["sampler"] == "mdlm" and llada_only:
        raise BenchmarkError(f"{', '.join(llada_only)} are built on LLaDA's sampler, not MDLM's: leave them out "
                             "of --methods, or pass --sampler llada")
    whole = set(BASELINES) & set(s.methods)
    if whole and any(not float(b).is_integer() for b in s.budgets):
        raise BenchmarkError(f"{', '.join(sorted(whole))} need whole budgets (N samples, candidates, particles); "
                             f"got --budgets {','.join(map(str, s.budgets))}")
    return s
