"""The command-line arguments `safegen generate`, `detoxify` and `serve` share: the model and policy,
and one flag per field of SamplingConfig and RefineConfig, derived from the dataclasses so that a new
field gets its flag (tests/test_cli.py checks every field has one). Help comes from FIELD_HELP below;
a field without an entry still gets a flag with a generic help. Imports nothing heavy (the two config
modules are torch-free), so `--help` and argument errors stay quick."""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields

from .refine.config import PRESETS, PROPOSAL_ORDERS, REMASKS, SCHEDULES, SCOPES, SELECTIONS, RefineConfig
from .sampling.config import CACHES, FAST, REMASKING, SAMPLERS, TRANSFERS, SamplingConfig

MAX_SEED = 2**32 - 1

# What a user needs to choose a value; the defaults are appended from the configs (or named).
FIELD_HELP = {
    "max_new_tokens": "generation length G",
    "steps": "denoising steps T (default: G)",
    "block_length": "block length (a last block may be shorter; G if G is shorter)",
    "temperature": "0: greedy",
    "remasking": "commit order within a step: LLaDA's (low_confidence, random) or Dream's (maskgit_plus, topk_margin, "
                 "entropy: on the tempered, truncated distribution)",
    "alg_temp": "Dream's alg_temp: commit positions drawn in proportion to softmax(confidence / alg_temp) ('none': "
                "the most confident)",
    "top_p": "Dream's top_p: draw tokens from the smallest set of most likely ones reaching this probability "
             "(proposals too: 'p' is then the truncated model; 'none': off)",
    "top_k": "Dream's top_k: draw tokens from the k most likely (proposals too; 'none': off)",
    "transfer": "tokens committed per step: linear (LLaDA's, constant) or dream (Dream's floor(n(1 - s/t)) on its "
                "time grid)",
    "cfg_scale": "classifier-free guidance; > 0 refines towards the guided model, not the model",
    "logits_eos_inf": "forbid EOS as a candidate token (proposals too: not exact)",
    "confidence_eos_eot_inf": "commit EOS/EOT only when nothing else is left",
    "sampler": "llada (blocks, fixed commits per step) or mdlm (MDLM's ancestral sampler, at temperature 1 "
               "unless --temperature); default: mdlm for MDLM models, else llada",
    "cache": "Fast-dLLM's block-wise key/value cache: prefix (prompt and finished blocks) or dual (the "
             "masked suffix too); approximate, and IterRef's proposals then run only their holes ('none': "
             "exact, LLaDA's sampler)",
    "threshold": "Fast-dLLM's parallel decoding: each step commits the block's most confident candidate and every "
                 "other one whose probability is at least this, until the block is done (--steps is ignored; "
                 "e.g. 0.9; 'none': off)",
    "n_proposals": "N, proposals per pool",
    "iterations": "k, kernel applications per refined step",
    "rho": "share of the decoded tokens a proposal re-masks",
    "alpha": "α, the target's temperature (default: the policy's)",
    "schedule": "where to refine (final: once each block is decoded)",
    "start": "late: refine once this share of a block is decoded",
    "every": "evenly: refine after every m-th step",
    "at_steps": "schedule steps: comma-separated base steps, e.g. 16,32",
    "scope": "re-mask the current block or all of the answer so far",
    "proposal_holes": "which tokens a proposal re-masks: targeted (those the policy blames) or uniform (the paper's)",
    "blame_floor": "targeted: every token's least re-mask weight, in (0, 1]",
    "selection": "mh: Metropolis-Hastings acceptance; mtm / mtm_reuse: Multiple-Try Metropolis over N tries "
                 "(with backward draws / the other tries as backward draws; exact); greedy and remask_only are "
                 "ablations, not exact",
    "bar_blamed": "targeted: a proposal may not re-draw the token at its most blamed hole (exact, no extra forward)",
    "gibbs_share": "share of iterations that make the Metropolised-Gibbs move (every hole re-drawn with its "
                   "current token barred; exact): helps when a toxic token is not implied by its context",
    "gibbs_holes": "holes a Gibbs move re-draws (each after the first costs one more forward)",
    "proposal_temperature": "temperature of the proposals' draws; only 1 is exact",
    "proposal_order": "order a proposal's holes are committed in: max_prob or random (exact), "
                      "low_confidence (LLaDA's rule on the sampled token: not exact)",
    "adaptive": "refine only samples the policy rejects (not exact); --exact is --no-adaptive",
    "accept_reward": "adaptive: the bar for a reward that gives no verdict ('none': no bar)",
    "budget": "cap on the cost per sample, x plain sampling in the same sampling settings: model FLOPs where counted (LLaDA), else denoiser rows ('none': no cap); a cap that stops the chain early "
              "is not exact",
}
CHOICES = {"transfer": TRANSFERS, "remasking": REMASKING, "sampler": SAMPLERS, "cache": tuple(c for c in CACHES if c is not None), "schedule": SCHEDULES, "scope": SCOPES,
           "selection": SELECTIONS, "proposal_holes": REMASKS, "proposal_order": PROPOSAL_ORDERS}
# Older spellings kept working: --proposals, --remask (the field's former name) and --exact (adaptive off).
ALIASES = {"n_proposals": ("--proposals",), "proposal_holes": ("--remask",)}


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}, not {text!r}")
    return value


def step_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated step numbers such as 16,32, not {text!r}") from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


# "none" on the command line: set the field to None (argparse's None means "not given").
NONE = type("NoneGiven", (), {"__repr__": lambda self: "none"})()


def _or_none(kind):
    def parse(text: str):
        return NONE if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(group, config_class, defaults: dict) -> None:
    """One flag per field of `config_class`; parsed values default to None (not given), so that only
    what the user typed overrides the preset."""
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X] or X | None
            kind, optional = next(a for a in typing.get_args(kind) if a is not type(None)), True
        default = defaults.get(f.name, f.default if f.default is not MISSING else f.default_factory())
        help_text = FIELD_HELP.get(f.name, f.name.replace("_", " "))
        if f.name not in ("steps", "alpha", "sampler"):  # their help names the default already
            help_text += f" (default {'none' if default is None else default})"
        names = (flag(f.name),) + ALIASES.get(f.name, ())
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif kind is tuple:
            group.add_argument(*names, dest=f.name, type=step_list, default=None, help=help_text)
        else:
            parse = _or_none(kind) if optional else kind
            choices = CHOICES.get(f.name)
            if choices is not None and optional:
                choices = (*choices, NONE)  # listed as "none" in the usage
            group.add_argument(*names, dest=f.name, type=parse, choices=choices, default=None, help=help_text)


def options(args, config_class) -> dict:
    """The fields of `config_class` the command line set."""
    given = {f.name: getattr(args, f.name, None) for f in fields(config_class)}
    return {name: None if value is NONE else value for name, value in given.items() if value is not None}


def model_arguments(parser: argparse.ArgumentParser, many_policies: bool = False) -> None:
    from .models.loading import DEFAULT_MODEL, QUANTIZATIONS

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id or local folder (default {DEFAULT_MODEL}, at a pinned revision)")
    g.add_argument("--revision", default=None, help="hub revision (commit) to load")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default="4bit", help="default 4bit (NF4)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own code, for models safegen and transformers do not "
                        "implement (LLaDA does not need it; it runs code from the hub)")
    g.add_argument("--device-map", default="auto", help="accelerate device map (default auto)")
    g.add_argument("--threads", type=positive, default=None,
                   help="torch's CPU threads (default: the cores this process may use, minus one, at least 1: "
                        "on a small or shared machine torch's own default of one per core is several times "
                        "slower; divide the cores when several processes share a machine)")
    if many_policies:  # a server offers several; a request picks one by this name (the first by default)
        g.add_argument("--policy", action="append", default=None,
                       help="a policy name in policies/ or a YAML path; repeat to offer several (default: default)")
    else:
        g.add_argument("--policy", default="default",
                       help="a policy name in policies/ or a YAML path (default: default)")

    s = parser.add_argument_group("sampling (SamplingConfig)")
    add_config_flags(s, SamplingConfig, {})
    s.add_argument("--fast", action="store_true",
                   help="--cache dual, which the command line uses by default for LLaDA and Dream models anyway (about 7.8x "
                        "fewer model FLOPs at 256 tokens; approximate: IterRef's chain is then not exact); "
                        "--cache and --threshold given beside it win")
    r = parser.add_argument_group("refinement (IterRef's RefineConfig; defaults: the 'middleware' preset)")
    r.add_argument("--no-refine", action="store_true", help="plain sampling, scored by the policy")
    r.add_argument("--preset", choices=sorted(PRESETS), default="middleware",
                   help="the settings the flags below start from: middleware (default: targeted re-masking, "
                        "adaptive, budget 4) or exact (uniform, every sample, no budget, and LLaDA's reference "
                        "sampler: no cache, which it refuses); see safegen/refine/config.py")
    add_config_flags(r, RefineConfig, PRESETS["middleware"])
    r.add_argument("--exact", action="store_true",
                   help="refine every sample, even those the policy already accepts (--no-adaptive), on LLaDA's "
                        "reference sampler (no cache; --cache prefix/dual beside it is refused). Exact in the "
                        "limit of many iterations also needs --selection mh and a --budget that does not cut the "
                        "last point short (docs/method.md, 'When the chain is exact')")
    r.add_argument("--no-before", action="store_true",
                   help="do not compute the unrefined 'before' sample (saves its denoiser rows)")


def revision(args):
    from .models.loading import PINNED_REVISIONS

    return args.revision or PINNED_REVISIONS.get(args.model)


def wants_exact(args) -> bool:
    """The flags promise IterRef's exact chain: --preset exact or --exact."""
    return getattr(args, "preset", None) == "exact" or bool(getattr(args, "exact", False))


def sampling_options(args) -> dict:
    """The sampling fields the flags set, over the command line's defaults: MDLM's own sampler for
    MDLM models; for LLaDA and Dream models the dual cache (the command line is where users want speed; the
    Python API keeps LLaDA's reference sampler), unless --cache says otherwise or the flags ask for
    an exact chain, which the cache would break (refused if --cache or --fast asks for one anyway)."""
    chosen = options(args, SamplingConfig)
    if getattr(args, "fast", False):
        chosen = {**FAST, **chosen}
    model_type = None
    if getattr(args, "model", None) is not None:
        from .models.loading import model_type_of

        model_type = model_type_of(args.model, revision(args))
    if model_type == "mdlm":
        from .sampling.mdlm import DEFAULT_SAMPLING  # MDLM's own sampler, unless the flags say otherwise

        chosen = {**DEFAULT_SAMPLING, **chosen}
    if wants_exact(args):
        if chosen.get("cache") is not None:
            from .config import ConfigError

            raise ConfigError(f"{'--preset exact' if args.preset == 'exact' else '--exact'} asks for IterRef's exact "
                              f"chain, which the {chosen['cache']} cache makes approximate: drop --cache/--fast, or "
                              "the exactness flag")
    elif model_type in ("llada", "Dream") and "cache" not in chosen and not chosen.get("cfg_scale"):
        chosen = {**FAST, **chosen}
    return chosen


def refine_options(args) -> dict:
    chosen = options(args, RefineConfig)
    if getattr(args, "exact", False):
        chosen["adaptive"] = False
    return chosen
