"""The `safegen` command line. Each subcommand is a function `(args) -> exit code` plus a line in
COMMANDS that declares its arguments, so adding one touches nothing else.

Everything a user can get wrong (arguments, policy, prompt file, output path, resume configuration)
is checked before the model loads, and reported in one line naming the flag, file or line at fault
(exit code 2). Nothing heavy is imported until a command runs, so `--help` and argument errors are
quick.
"""
from __future__ import annotations

import argparse
import sys

from .errors import SafegenError  # light: no torch

MAX_SEED = 2**32 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}, not {text!r}")
    return value


def _step_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated step numbers such as 16,32, not {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def tiny_model(args) -> int:
    from .tiny import write_tiny_mdlm, write_tiny_model

    write = write_tiny_mdlm if args.family == "mdlm" else write_tiny_model
    folder = write(args.directory, seed=args.seed)
    print(f"wrote a tiny {'MDLM' if args.family == 'mdlm' else 'LLaDA'}-shaped model and tokenizer to {folder}")
    return 0


def _tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--family", choices=("llada", "mdlm"), default="llada",
                        help="architecture: llada (LLaDA-8B's, default) or mdlm (MDLM-OWT's)")


# ------------------------------------------------------------------------------ model + policy
def _model_arguments(parser: argparse.ArgumentParser, many_policies: bool = False) -> None:
    from .loading import DEFAULT_MODEL, QUANTIZATIONS

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id or local folder (default {DEFAULT_MODEL}, at a pinned revision)")
    g.add_argument("--revision", default=None, help="hub revision (commit) to load")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default="4bit", help="default 4bit (NF4)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own code, for models safegen and transformers do not "
                        "implement (LLaDA does not need it; it runs code from the hub)")
    g.add_argument("--device-map", default="auto", help="accelerate device map (default auto)")
    if many_policies:  # a server offers several; a request picks one by this name (the first by default)
        g.add_argument("--policy", action="append", default=None,
                       help="a policy name in policies/ or a YAML path; repeat to offer several (default: default)")
    else:
        g.add_argument("--policy", default="default",
                       help="a policy name in policies/ or a YAML path (default: default)")

    s = parser.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=None, help="generation length G (default 128)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps T (default: G)")
    s.add_argument("--block-length", type=int, default=None,
                   help="block length (default 32, or G if shorter; a last block may be shorter)")
    s.add_argument("--temperature", type=float, default=None, help="0: greedy (default 0)")
    s.add_argument("--remasking", choices=("low_confidence", "random"), default=None)
    s.add_argument("--sampler", choices=("llada", "mdlm"), default=None,
                   help="llada (blocks, fixed commits per step) or mdlm (MDLM's ancestral sampler, at "
                        "temperature 1 unless --temperature); default: mdlm for MDLM models, else llada")
    s.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance (default 0); > 0 refines towards the guided model, not the model")

    _fast_arguments(s)
    r = parser.add_argument_group("refinement (IterRef)")
    r.add_argument("--no-refine", action="store_true", help="plain sampling, scored by the policy")
    r.add_argument("--proposals", dest="n_proposals", type=int, default=None, help="N per pool (default 1)")
    r.add_argument("--iterations", type=int, default=None, help="k per refined step (default 4)")
    r.add_argument("--rho", type=float, default=None, help="share re-masked per proposal (default 0.5)")
    r.add_argument("--alpha", type=float, default=None, help="target temperature (default: the policy's)")
    r.add_argument("--schedule", choices=("late", "evenly", "final", "steps"), default=None,
                   help="where to refine (default final: once each block is decoded)")
    r.add_argument("--start", type=float, default=None, help="late: refine once this share of a block is decoded")
    r.add_argument("--every", type=int, default=None, help="evenly: refine after every m-th step")
    r.add_argument("--at-steps", type=_step_list, default=None,
                   help="schedule steps: comma-separated base steps, e.g. 16,32")
    r.add_argument("--scope", choices=("block", "all"), default=None)
    r.add_argument("--selection", choices=("mh", "greedy", "remask_only"), default=None,
                   help="mh (default): Metropolis-Hastings acceptance; greedy and remask_only are ablations, not exact")
    r.add_argument("--remask", choices=("uniform", "targeted"), default=None,
                   help="which tokens a proposal re-masks: targeted (those the policy blames; default) "
                        "or uniform (the paper's kernel)")
    r.add_argument("--blame-floor", type=float, default=None,
                   help="targeted: every token's least re-mask weight, in (0, 1]")
    r.add_argument("--exact", dest="adaptive", action="store_false", default=None,
                   help="refine every sample, even those the policy already accepts (default: adaptive, "
                        "which is not exact). Exact in the limit of many iterations also needs --selection mh "
                        "and a --budget that does not cut the last point short (docs/method.md section 5)")
    r.add_argument("--budget", type=float, default=None,
                   help="cap on denoiser rows per sample, x plain (default 4); a cap that stops the chain "
                        "early is not exact")
    r.add_argument("--no-before", action="store_true",
                   help="do not compute the unrefined 'before' sample (saves its denoiser rows)")


from .fast_options import add_arguments as _fast_arguments, options as _fast_options  # noqa: E402


def _sampling_options(args) -> dict:
    options = {k: getattr(args, k) for k in ("max_new_tokens", "steps", "block_length", "temperature",
                                             "remasking", "cfg_scale", "sampler") if getattr(args, k) is not None}
    options.update(_fast_options(args))
    if getattr(args, "model", None) is not None:
        from .loading import model_type_of

        if model_type_of(args.model, _revision(args)) == "mdlm":
            from .mdlm_sampler import DEFAULT_SAMPLING  # MDLM's own sampler, unless the flags say otherwise

            options = {**DEFAULT_SAMPLING, **options}
    return options


def _refine_options(args) -> dict:
    return {k: getattr(args, k) for k in ("n_proposals", "iterations", "rho", "alpha", "schedule", "start",
                                          "every", "at_steps", "scope", "selection", "remask", "blame_floor",
                                          "adaptive", "budget")
            if getattr(args, k) is not None}


def _configure(args):
    """(policy, sampling, refinement) from the flags, validated: a mistake costs a second, not a
    model load."""
    from .generator import check_best, middleware_configs
    from .policy import load_policy

    policy = load_policy(args.policy)
    sampling, refinement = middleware_configs(policy, _sampling_options(args), _refine_options(args))
    check_best(policy, refinement.iterations > 0, not args.no_before)
    return policy, sampling, refinement


def _revision(args):
    from .loading import PINNED_REVISIONS

    return args.revision or PINNED_REVISIONS.get(args.model)


def _build_generator(args, policy, sampling, refinement, device_map=None):
    from .generator import SafeGenerator
    from .loading import load_model, require_tokenizer

    model, tokenizer, profile = load_model(args.model, quantization=args.quantization, revision=_revision(args),
                                           device_map=device_map or args.device_map,
                                           trust_remote_code=args.trust_remote_code)
    require_tokenizer(tokenizer, args.model)
    return SafeGenerator(model, tokenizer, policy=policy, profile=profile, sampling=sampling,
                         refinement=refinement, report_before=not args.no_before)


def _max_prompt_tokens(generator, max_new_tokens: int):
    config = generator.model.config
    limit = getattr(config, "max_sequence_length", None) or getattr(config, "max_position_embeddings", None) \
        or getattr(config, "model_length", None)
    # Leave room for the chat template's own tokens.
    return None if limit is None else max(1, limit - max_new_tokens - 32)


# ------------------------------------------------------------------------------ generate
def generate(args) -> int:
    gen = _build_generator(args, *_configure(args))
    report = gen.generate_text(args.prompt, seed=args.seed, refine=not args.no_refine,
                               max_prompt_tokens=_max_prompt_tokens(gen, gen.sampling.max_new_tokens))[0]
    for label, text, tox in (("before", report.text_before, report.toxicity_before),
                             ("after", report.text_after, report.toxicity_after)):
        verdict = "TOXIC" if tox["toxic"] else "ok"
        print(f"[{label}] toxicity {tox['aggregate']:.3f} ({verdict}): {text}")
    if report.action not in ("none", "flag"):
        print(f"[returned, {report.action}] {report.text}")
    print(f"denoiser rows {report.rows:.0f} (+{report.rows_before:.0f} for 'before'), model GFLOPs "
          f"{report.flops / 1e9:.2f} (+{report.flops_before / 1e9:.2f}), reward texts "
          f"{report.reward_calls:.0f}, {report.seconds:.2f} s")
    return 0


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--seed", type=_seed, default=0)
    _model_arguments(parser)


# ------------------------------------------------------------------------------ detoxify
def _fingerprint(args, policy, sampling, refinement) -> dict:
    """What a resumed run must share with the one that started the output. Names are compared by
    what they resolve to (a policy by name or by path, a folder with or without a trailing slash),
    and a model folder by the identity of its weights (batch.weights_identity)."""
    import json
    from pathlib import Path

    from . import batch, rng

    folder = Path(args.model).expanduser()
    if folder.is_dir():
        model, revision, weights = str(folder.resolve()), None, batch.weights_identity(folder)
    else:
        model, revision, weights = args.model, _revision(args), None
    return {
        "input": str(Path(args.input).resolve()), "input_sha256": batch.file_digest(args.input),
        "field": args.field, "skip_bad": args.skip_bad, "model": model, "revision": revision, "weights": weights,
        "quantization": args.quantization,
        "policy": str(Path(policy.source).resolve()) if policy.source else args.policy,
        "policy_sha256": batch.file_digest(policy.source) if policy.source else None,
        "samples": args.samples, "seed": args.seed, "refine": not args.no_refine,
        "report_before": not args.no_before,
        "draws": rng.DRAWS_VERSION,
        # Fast sampling's fields only when set: outputs written before they existed still resume.
        "sampling": json.loads(json.dumps({k: v for k, v in vars(sampling).items()
                                           if v is not None or k not in ("cache", "threshold")})),
        "refinement": json.loads(json.dumps(vars(refinement), default=list)),
    }


def detoxify(args) -> int:
    import os

    from . import batch

    prompts = batch.read_prompts(args.input, field=args.field, skip_bad=args.skip_bad)
    policy, sampling, refinement = _configure(args)
    if args.samples > 1 and sampling.temperature == 0:
        raise batch.InputError(f"--samples {args.samples} at --temperature 0 (greedy, the default) would give "
                               f"{args.samples} identical samples per prompt; set --temperature (e.g. 1.0)")
    shard = batch.Shard.from_env()
    fingerprint = _fingerprint(args, policy, sampling, refinement)
    with batch.OutputLock(args.output, shard) as lock:
        batch.check_resume(args.output, fingerprint, shard)
        device_map = None
        if shard.world > 1:
            import torch
            if torch.cuda.is_available():  # one GPU per process under accelerate launch / torchrun
                device_map = {"": int(os.environ.get("LOCAL_RANK", shard.rank)) % torch.cuda.device_count()}
        gen = _build_generator(args, policy, sampling, refinement, device_map)
        limit = _max_prompt_tokens(gen, sampling.max_new_tokens)

        def run(lines, seeds):
            reports = gen.generate_text([p.text for p in lines], seeds=seeds, refine=not args.no_refine,
                                        max_prompt_tokens=limit, labels=[f"{args.input}:{p.line}" for p in lines])
            return [r.to_dict() for r in reports]

        records = batch.run_batch(prompts, args.output, run, samples=args.samples, seed=args.seed,
                                  batch_size=args.batch_size, fingerprint=fingerprint, shard=shard, lock=lock)
    print(batch.format_summary(batch.summarize(records)))
    print(f"reports: {args.output}" + ("" if shard.world == 1 else f" (this process: rank {shard.rank} of {shard.world})"))
    return 0


def _detoxify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="prompts: .txt (one per line), .jsonl (prompt / prompt.text / --field) or .csv")
    parser.add_argument("-o", "--output", required=True, help="JSONL reports, one line per sample (resumable)")
    parser.add_argument("--field", default=None, help="JSONL field (dotted, e.g. prompt.text) or CSV column")
    parser.add_argument("--skip-bad", action="store_true", help="skip malformed lines instead of stopping")
    parser.add_argument("--samples", type=_positive, default=1,
                        help="generations per prompt (default 1; more than 1 needs --temperature > 0)")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--batch-size", type=_positive, default=8)
    _model_arguments(parser)


def memory(args) -> int:
    from .memory import command

    return command(args)


def _memory_arguments(parser: argparse.ArgumentParser) -> None:
    from .loading import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default {DEFAULT_MODEL}); "
                        "only its config.json is read")
    parser.add_argument("--revision", default=None, help="hub revision (commit)")
    parser.add_argument("--quantization", choices=("4bit", "8bit", "none"), default=None,
                        help="show only this one (default: all)")
    parser.add_argument("--seq-len", type=int, default=256, help="prompt + generation tokens (default 256)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def serve(args) -> int:
    from .serve.server import command

    return command(args)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .serve.options import add_arguments

    add_arguments(parser)


# name: (function, help, function adding the arguments)
COMMANDS = {
    "tiny-model": (tiny_model, "write a tiny random LLaDA-shaped model for offline tests and demos",
                   _tiny_model_arguments),
    "generate": (generate, "generate for one prompt and show the text before and after refinement",
                 _generate_arguments),
    "detoxify": (detoxify, "detoxify a file of prompts in batch, one JSONL report per sample",
                 _detoxify_arguments),
    "memory": (memory, "parameter count and memory of a LLaDA model, from its config", _memory_arguments),
    "serve": (serve, "serve safe generation over an OpenAI-compatible HTTP API", _serve_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safegen", description="Toxicity-safe generation for masked "
                                     "diffusion language models (LLaDA).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (function, help_text, add_arguments) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        # Configuration fields by the flag that sets them, for error messages.
        flags = {a.dest: max(a.option_strings, key=len) for a in sub._actions if a.option_strings}
        sub.set_defaults(run=function, flags=flags)
    return parser


def _in_flags(message: str, flags: dict) -> str:
    """`sampling.steps` -> `--steps`: name what the user typed, not the internal field."""
    import re

    return re.sub(r"\b(?:sampling|refine|refinement)\.(\w+)",
                  lambda m: flags.get(m.group(1), m.group(0)), message)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input or configuration (a one-line message, no traceback),
    130 interrupted (Ctrl-C)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="safegen: %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        resume = (f"; the finished samples are in {args.output}: rerun the same command to resume"
                  if args.command == "detoxify" else "")
        print(f"\nsafegen {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except SafegenError as e:  # the user asked for something wrong: one line, no traceback
        print(f"safegen {args.command}: error: {_in_flags(str(e), args.flags)}", file=sys.stderr)
        return 2

