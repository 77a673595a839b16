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

from .arguments import model_arguments, positive, refine_options, sampling_options, seed
from .arguments import revision as model_revision
from .errors import SafegenError  # light: no torch


def tiny_model(args) -> int:
    from .models.tiny import write_tiny_dream, write_tiny_llada_moe, write_tiny_mdlm, write_tiny_model

    write, name = {"mdlm": (write_tiny_mdlm, "MDLM"), "dream": (write_tiny_dream, "Dream"),
                   "llada-moe": (write_tiny_llada_moe, "LLaDA-MoE")}.get(args.family, (write_tiny_model, "LLaDA"))
    folder = write(args.directory, seed=args.seed)
    print(f"wrote a tiny {name}-shaped model and tokenizer to {folder}")
    return 0


def _tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--family", choices=("llada", "mdlm", "dream", "llada-moe"), default="llada",
                        help="architecture: llada (LLaDA-8B's, default), mdlm (MDLM-OWT's), dream (Dream-7B's) or "
                             "llada-moe (LLaDA-MoE-7B-A1B's)")


def _configure(args):
    """(policy, sampling, refinement) from the flags, validated: a mistake costs a second, not a
    model load."""
    from .generator import check_best, middleware_configs
    from .policy import load_policy

    policy = load_policy(args.policy)
    sampling, refinement = middleware_configs(policy, sampling_options(args), refine_options(args), args.preset)
    check_best(policy, refinement.iterations > 0, not args.no_before)
    return policy, sampling, refinement


def _build_generator(args, policy, sampling, refinement, device_map=None):
    from .generator import SafeGenerator
    from .models.loading import load_model, require_tokenizer
    from .threads import set_threads

    set_threads(args.threads)
    model, tokenizer, profile = load_model(args.model, quantization=args.quantization, revision=model_revision(args),
                                           device_map=device_map or args.device_map,
                                           trust_remote_code=args.trust_remote_code)
    require_tokenizer(tokenizer, args.model)
    return SafeGenerator(model, tokenizer, policy=policy, profile=profile, sampling=sampling,
                         refinement=refinement, report_before=not args.no_before)


# ------------------------------------------------------------------------------ generate
def generate(args) -> int:
    from .batch import prompt_limit

    gen = _build_generator(args, *_configure(args))
    report = gen.generate_text(args.prompt, seed=args.seed, refine=not args.no_refine,
                               max_prompt_tokens=prompt_limit(gen, gen.sampling.max_new_tokens))[0]
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
    parser.add_argument("--seed", type=seed, default=0)
    model_arguments(parser)


# ------------------------------------------------------------------------------ detoxify
def _fingerprint(args, policy, sampling, refinement) -> dict:
    """What a resumed run must share with the one that started the output. Names are compared by
    what they resolve to (a policy by name or by path, a folder with or without a trailing slash),
    and a model folder by the identity of its weights (batch.weights_identity)."""
    import json
    from pathlib import Path

    from . import batch
    from .sampling import rng

    folder = Path(args.model).expanduser()
    if folder.is_dir():
        model, revision, weights = str(folder.resolve()), None, batch.weights_identity(folder)
    else:
        model, revision, weights = args.model, model_revision(args), None
    return {
        "input": str(Path(args.input).resolve()), "input_sha256": batch.file_digest(args.input),
        "field": args.field, "skip_bad": args.skip_bad, "model": model, "revision": revision, "weights": weights,
        "quantization": args.quantization,
        "policy": str(Path(policy.source).resolve()) if policy.source else args.policy,
        "policy_sha256": batch.file_digest(policy.source) if policy.source else None,
        "samples": args.samples, "seed": args.seed, "refine": not args.no_refine,
        "report_before": not args.no_before,
        "draws": rng.DRAWS_VERSION,
        # Fields added since (fast sampling's, Dream's) only when not at their default: outputs written
        # before they existed still resume.
        "sampling": json.loads(json.dumps({k: v for k, v in vars(sampling).items()
                                           if v != LATER_SAMPLING_FIELDS.get(k, object())})),
        "refinement": json.loads(json.dumps(vars(refinement), default=list)),
    }


# Sampling fields added after outputs were first written, with their defaults (left out of the fingerprint).
LATER_SAMPLING_FIELDS = {"cache": None, "threshold": None, "alg_temp": None, "top_p": None, "top_k": None,
                         "transfer": "linear"}


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
    n_prompts = max((p.index for p in prompts), default=-1) + 1
    if args.ray is not None:
        return _detoxify_on_ray(args, prompts, policy, sampling, refinement, fingerprint, n_prompts, shard)
    with batch.ReportFile(args.output, fingerprint, n_prompts, args.samples, shard) as report:
        device_map = None
        if shard.world > 1:
            import torch
            if torch.cuda.is_available():  # one GPU per process under accelerate launch / torchrun
                device_map = {"": int(os.environ.get("LOCAL_RANK", shard.rank)) % torch.cuda.device_count()}
        gen = _build_generator(args, policy, sampling, refinement, device_map)
        records = batch.run_batch(prompts, args.output, batch.text_generate(gen, not args.no_refine, args.input),
                                  samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                                  fingerprint=fingerprint, shard=shard, report=report)
    print(batch.format_summary(batch.summarize(records)))
    print(f"reports: {args.output}" + ("" if shard.world == 1 else f" (this process: rank {shard.rank} of {shard.world})"))
    return 0


def _detoxify_on_ray(args, prompts, policy, sampling, refinement, fingerprint, n_prompts, shard) -> int:
    from pathlib import Path

    from . import batch, ray_run

    if shard.world > 1:
        raise batch.InputError(f"--ray runs one driver; this process is rank {shard.rank} of {shard.world} "
                               "(accelerate launch / torchrun): start it as a plain process")
    ray = ray_run.connect(args.ray, args.ray_workers, args.ray_gpus_per_worker)  # its errors before any model loads
    # Actors run in Ray's own working folders: local paths go to them absolute.
    model = str(Path(args.model).resolve()) if Path(args.model).expanduser().is_dir() else args.model
    policy_ref = str(Path(args.policy).resolve()) if Path(args.policy).is_file() else args.policy  # or a name
    detoxifier = dict(model=model, policy=policy_ref, quantization=args.quantization,
                      revision=model_revision(args), trust_remote_code=args.trust_remote_code,
                      sampling=sampling, refinement=refinement, report_before=not args.no_before,
                      refine=not args.no_refine, batch_size=args.batch_size, threads=args.threads,
                      source=args.input)
    with batch.ReportFile(args.output, fingerprint, n_prompts, args.samples) as report:
        records = ray_run.detoxify(ray, prompts, report, detoxifier, samples=args.samples, seed=args.seed,
                                   workers=args.ray_workers, gpus_per_worker=ray_run.gpus_per_worker(
                                       ray, args.ray_gpus_per_worker))
    print(batch.format_summary(batch.summarize(records)))
    print(f"reports: {args.output} (on Ray, {args.ray_workers} worker{'s' if args.ray_workers > 1 else ''})")
    return 0


def _detoxify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="prompts: .txt (one per line), .jsonl (prompt / prompt.text / --field) or .csv")
    parser.add_argument("-o", "--output", required=True, help="JSONL reports, one line per sample (resumable)")
    parser.add_argument("--field", default=None, help="JSONL field (dotted, e.g. prompt.text) or CSV column")
    parser.add_argument("--skip-bad", action="store_true", help="skip malformed lines instead of stopping")
    parser.add_argument("--samples", type=positive, default=1,
                        help="generations per prompt (default 1; more than 1 needs --temperature > 0)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster at ADDRESS (as ray.init takes it; none: a local instance); "
                             "needs pip install 'safegen[ray]'")
    parser.add_argument("--ray-workers", type=positive, default=1, help="model actors on Ray (default 1)")
    parser.add_argument("--ray-gpus-per-worker", type=float, default=None,
                        help="GPUs per actor (default 1 where the cluster has GPUs, else 0)")
    model_arguments(parser)


def memory(args) -> int:
    from .models.memory import command

    return command(args)


def _memory_arguments(parser: argparse.ArgumentParser) -> None:
    from .models.loading import DEFAULT_MODEL

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

