"""Batch detoxification of a prompt file: what to generate, in what order, on the step-level engine.

Each prompt's samples are one generation on the engine (safegen/engine.py), up to `--batch-size`
samples side by side with their forwards merged; a prompt that is done frees its rows at once for
the next. Sample k of the run (prompt i's sample s is k = i · samples + s) gets seed + k, in a
single process, under `accelerate launch` (rank r of W takes the samples k ≡ r mod W) and on Ray
(safegen/ray_run.py) alike, so a sample's record does not depend on how the run was split. The
report file (locks, resume, exactly-once writes, the merge of shard parts) belongs to
safegen/report_file.py; nothing grows with the number of reports but the output.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

# Re-exported: a batch run starts from a prompt file, and raises InputError for its own files too.
from . import engine
from .prompts import InputError, PromptLine, read_prompts  # noqa: F401
from .records import DoneSet, append_records, iter_records, write_records  # noqa: F401
# The report file's owner; re-exported, with the names callers used from here.
from .report_file import ReportFile, check_fingerprint, check_resume, read_records  # noqa: F401
from .shards import OutputLock, Shard, part_files  # noqa: F401
from .summary import RunningSummary, format_summary, summarize  # noqa: F401

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_identity(folder: str | os.PathLike, edge: int = 1 << 20) -> str:
    """A cheap fingerprint of the weights in a model folder: for each weights file its name, size
    and a SHA-256 of its first and last `edge` bytes, plus config.json whole. The first MiB holds a
    safetensors file's header (every tensor's name, shape and offsets) and the first weights; a
    retrained, re-quantized or re-saved model differs there or in its size. A rewrite that keeps the
    size and changes only the middle of a file goes unseen: hashing all 16 GB would cost minutes."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES:
            size = p.stat().st_size
            h.update(f"{p.name}\0{size}\0".encode())
            with open(p, "rb") as f:
                h.update(f.read(edge))
                if size > edge:
                    f.seek(max(edge, size - edge))
                    h.update(f.read(edge))
    return h.hexdigest()[:16]


def run_batch(prompts: Sequence[PromptLine], output: str | os.PathLike, generate: Callable,
              samples: int, seed: int, batch_size: int, fingerprint: dict,
              shard: Optional[Shard] = None, progress: bool = True,
              report: Optional[ReportFile] = None) -> RunningSummary:
    """Generate `samples` per prompt and append one JSON line per sample to `output`.

    generate(prompts: list[PromptLine], seeds: list[int]) -> list of report dicts, or a step generator
    that returns them (SafeGenerator.generate_text_steps): the samples of one prompt at a time, up to
    batch_size samples running side by side on the step-level engine. Returns the summary of the
    finished output (all shards, when this process merged them; else its own part).
    report: the caller's ReportFile for `output`, entered before it loaded its model; when None,
    run_batch opens one for the run.
    """
    n_prompts = max((p.index for p in prompts), default=-1) + 1
    if report is None:
        with ReportFile(output, fingerprint, n_prompts, samples, shard) as report:
            return run_batch(prompts, output, generate, samples, seed, batch_size, fingerprint, shard,
                             progress, report)
    report.open()
    shard, done = report.shard, report.done
    from tqdm import tqdm
    owned = range(shard.rank, done.total, shard.world)  # k = prompt index * samples + sample
    bar = tqdm(total=len(owned), initial=sum(divmod(k, samples) in done for k in owned),
               desc=f"detoxify{'' if shard.world == 1 else f' [{shard.rank}/{shard.world}]'}",
               unit="sample", file=sys.stderr, disable=not progress)
    try:
        for records in generate_records(_todo(prompts, samples, seed, shard, done), generate, batch_size):
            report.write(records)  # one write and one fsync a round
            bar.update(len(records))
    finally:
        report.close()
        bar.close()
    return report.finish()


def generate_records(todo: Iterable[tuple[PromptLine, int, int]], generate: Callable,
                     batch_size: int) -> Iterator[list[dict]]:
    """The report records of the (prompt, sample, seed) items of `todo`, a list per engine round that
    finished some, in the items' order. On the step-level engine (safegen/engine.py) each prompt's
    samples are a generation, up to batch_size samples run side by side with their forwards merged,
    and a generation that is done frees its rows at once for the next prompt's. A generation that
    fails stops the run, after the records of those done before it have been given out."""
    groups = _by_prompt(iter(todo), batch_size)

    def records(finished):
        return [{"prompt_index": p.index, "line": p.line, "sample": s, **report}
                for chunk, generation in finished
                for (p, s, _), report in zip(chunk, generation.result)]

    running: list = []  # (chunk, generation), in the order they started
    try:
        chunk = next(groups, None)
        while chunk is not None or running:
            rows = sum(len(c) for c, g in running if not g.done)
            while chunk is not None and (not rows or rows + len(chunk) <= batch_size):
                running.append((chunk, engine.Generation(
                    lambda c=chunk: generate([p for p, _, _ in c], [sd for _, _, sd in c]))))
                rows += len(chunk)
                chunk = next(groups, None)
            engine.advance([g for _, g in running if not g.done])
            failed = next((g.result for _, g in running if g.done and isinstance(g.result, BaseException)), None)
            if failed is not None:
                # Keep what is done (a rerun skips it), then stop with the first failure.
                done = records([(c, g) for c, g in running if g.done and not isinstance(g.result, BaseException)])
                running.clear()
                if done:
                    yield done
                raise failed
            ready = 0
            while ready < len(running) and running[ready][1].done:
                ready += 1
            if ready:
                finished = records(running[:ready])
                del running[:ready]
                yield finished
    finally:
        for _, generation in running:
            generation.close()


def prompt_limit(generator, max_new_tokens: int) -> Optional[int]:
    """The longest prompt (tokens) that leaves room for the answer in the model's context, or None."""
    config = generator.model.config
    limit = getattr(config, "max_sequence_length", None) or getattr(config, "max_position_embeddings", None) \
        or getattr(config, "model_length", None)
    # Leave room for the chat template's own tokens.
    return None if limit is None else max(1, limit - max_new_tokens - 32)


def text_generate(generator, refine: bool, source: str) -> Callable:
    """The `generate` of run_batch and generate_records for a SafeGenerator: one prompt's samples, step
    by step, as report dicts; warnings name a prompt by `source`:line."""
    limit = prompt_limit(generator, generator.sampling.max_new_tokens)

    def generate(lines, seeds):
        reports = yield from generator.generate_text_steps(
            [p.text for p in lines], seeds=seeds, refine=refine, max_prompt_tokens=limit,
            labels=[f"{source}:{p.line}" for p in lines])
        return [r.to_dict() for r in reports]

    return generate


def _by_prompt(todo: Iterator[tuple[PromptLine, int, int]], most: int) -> Iterator[list]:
    """The work list in runs of the same prompt's samples, at most `most` long."""
    chunk: list = []
    for item in todo:
        if chunk and (item[0] is not chunk[-1][0] or len(chunk) == most):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _todo(prompts: Sequence[PromptLine], samples: int, seed: int, shard: Shard,
          done: DoneSet) -> Iterator[tuple[PromptLine, int, int]]:
    """(prompt, sample, seed) of each sample this process still has to write, in input order;
    generated lazily, so the work list takes no memory."""
    for p in prompts:
        for s in range(samples):
            k = p.index * samples + s  # the sample's place in the run
            if shard.owns(k) and (p.index, s) not in done:
                # Seeds depend only on the prompt's position and the sample number: stable across
                # resumes and shards.
                yield p, s, seed + k
