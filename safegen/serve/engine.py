"""The bridge from validated requests to SafeGenerator: encoding, one group's run, one result per sample.

It uses SafeGenerator's public methods only. A group is the samples of several requests that share
a sampler configuration (the same policy, generation length, temperature, budget and refine flag),
left padded together and run by `SafeGenerator.generate_steps` (generate, one sampler step at a
time, so that the batcher can interleave groups) with one seed per row, which is what
`generate_text` does for a list of prompts. A row's tokens depend only on its prompt and its seed
(safegen.sampling.rng keys every random draw by the row's seed), so a request gets the tokens that
`generate_text` gives it alone.

The prompt of a chat request is encoded by `SafeGenerator.encode_prompts` (the chat template); the
prompt of a completions request is continued as raw text, BOS and its tokens, with no template,
as OpenAI's completions endpoint does.
"""
from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from ..sampling.sampler import drive
from .schema import GenerationRequest


@dataclass
class Choice:
    """One sample of a request, ready for the response."""

    text: str
    finish_reason: str  # "stop" | "length" | "content_filter"
    completion_tokens: int
    report: dict  # the `safegen` extension field of the choice


@dataclass
class Outcome:
    choices: list[Choice]
    prompt_tokens: int


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share a sampler batch (SafeGenerator runs one configuration)."""
    ext = request.extension
    return (ext.policy, request.max_tokens, request.temperature, ext.budget, ext.refine)


def completion_ids(tokenizer, bos_id: Optional[int], text: str) -> list[int]:
    """A completions prompt as tokens: BOS, then the text's own tokens (no chat template)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([bos_id] if bos_id is not None else []) + list(ids)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left padded to the widest, with the attention mask: as encode_prompts pads."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop sequence (excluded), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class Engine:
    """Owns the generators (one per policy, sharing one model) and runs batches on the model thread.

    `encode` runs on the event loop's side with its own copy of the tokenizer: a fast tokenizer is
    not safe to use from two threads at once, and the model thread decodes with the original.
    """

    def __init__(self, generators: dict, model_id: str):
        self.generators = generators
        self.model_id = model_id
        first = next(iter(generators.values()))
        self.profile = first.profile
        self._encoder = type(first)(first.model, copy.deepcopy(first.tokenizer), policy=first.policy,
                                    profile=first.profile, sampling=first.sampling, refinement=first.refinement)
        self._encode_lock = threading.Lock()
        self.pad_id = self.profile.fill_id
        self.parameters = sum(p.numel() for p in first.model.parameters())

    def encode(self, request: GenerationRequest) -> list[list[int]]:
        """Each prompt's token ids, as the offline interface would encode it."""
        with self._encode_lock:
            if request.kind == "chat":
                ids, mask, _ = self._encoder.encode_prompts(request.prompts)
                return [ids[i][mask[i].bool()].tolist() for i in range(len(request.prompts))]
            return [completion_ids(self._encoder.tokenizer, self.profile.bos_id, p) for p in request.prompts]

    def settings(self, request: GenerationRequest) -> dict:
        """The keywords of SafeGenerator.generate that a request sets (the same for its whole batch)."""
        return dict(max_new_tokens=request.max_tokens, temperature=request.temperature,
                    refine=request.extension.refine, budget=request.extension.budget)

    def check(self, request: GenerationRequest, token_ids: list[list[int]]) -> None:
        """Raises the sampler's own ConfigError for settings it would refuse: found per request before
        it queues, so that a bad request is a 400 of its own and never fails the batch it would join."""
        gen = self.generators[request.extension.policy]
        gen.resolve(prompt_length=max(len(ids) for ids in token_ids), **self.settings(request))

    def run(self, requests: list[GenerationRequest], token_ids: list[list[list[int]]]) -> list[Outcome]:
        """One batch, run to its end: see run_steps."""
        return drive(self.run_steps(requests, token_ids))

    def run_steps(self, requests: list[GenerationRequest], token_ids: list[list[list[int]]]):
        """One group: every sample of `requests` (which share a batch_key) in one generation, as a
        generator that yields after each sampler step (the batcher interleaves groups step by step)
        and returns one Outcome per request. Sample j of prompt i of a request gets seed + i·n + j,
        as generate_text(prompts, seed, n) gives."""
        first = requests[0]
        gen = self.generators[first.extension.policy]
        rows, seeds, owners = [], [], []
        for r, (request, prompts) in enumerate(zip(requests, token_ids)):
            for i, ids in enumerate(prompts):
                for j in range(request.n):
                    rows.append(ids)
                    seeds.append(request.seed + i * request.n + j)
                    owners.append((r, i))
        input_ids, mask = left_pad(rows, self.pad_id)
        device = _device(gen.model)
        out = yield from gen.generate_steps(input_ids.to(device), attention_mask=mask.to(device), seeds=seeds,
                                            **self.settings(first))
        P = input_ids.shape[1]
        stop_ids = torch.tensor(gen.profile.stop_ids, dtype=torch.long)
        outcomes = [Outcome(choices=[], prompt_tokens=sum(len(p) for p in prompts)) for prompts in token_ids]
        for k, report in enumerate(out.reports):
            request = requests[owners[k][0]]
            generated = out.sequences[k, P:].cpu()
            stopped = torch.isin(generated, stop_ids)
            tokens = int(stopped.nonzero()[0, 0]) if stopped.any() else len(generated)
            # The row's own length, not the batch's padded width: no report depends on the batch.
            length = len(token_ids[owners[k][0]][owners[k][1]]) + len(generated)
            outcomes[owners[k][0]].choices.append(
                self._choice(gen, request, report, tokens, bool(stopped.any()), length))
        return outcomes

    def _choice(self, gen, request: GenerationRequest, report, tokens: int, stopped: bool, length: int) -> Choice:
        text, action = report.text, report.action
        finish = "stop" if stopped else "length"
        returned = None
        if action != "refuse" and request.stop:
            text, cut = cut_at_stop(text, request.stop)
            if cut:
                finish = "stop"
                # The policy judged the whole answer; a prefix of it is judged again, since cutting
                # can leave a word that the whole answer did not have ("classic" -> "class").
                returned = gen.policy.score([text]).row(0)
                if returned["toxic"] and not report.toxic_after and gen.policy.on_toxic == "refuse":
                    text, action = gen.policy.refusal_text, "refuse"
        if action == "refuse":
            finish = "content_filter"
        if text != report.text or action == "refuse":
            # Usage counts what the client receives: the cut text's or the refusal's own tokens.
            tokens = len(gen.tokenizer(text, add_special_tokens=False)["input_ids"])
        verdict = "toxic" if report.toxic_after or (returned or {}).get("toxic") else "not_toxic"
        return Choice(text=text, finish_reason=finish, completion_tokens=tokens, report={
            "seed": report.seed, "policy": request.extension.policy,
            "verdict": verdict, "action": action, "refined": report.refined,
            "toxicity_before": report.toxicity_before, "toxicity_after": report.toxicity_after,
            **({"toxicity_returned": returned} if returned is not None else {}),
            "rows": report.rows, "rows_before": report.rows_before,
            # Counted at the model where it can be (LLaDA, safegen.models.flops: a cached forward costs
            # what it computes); else about 2 FLOPs per parameter per position and row (an estimate).
            **({"flops": report.flops + report.flops_before, "flops_counted": True} if report.flops > 0 else
               {"flops": 2.0 * self.parameters * length * (report.rows + report.rows_before), "flops_counted": False}),
            "reward_calls": report.reward_calls, "acceptance_rate": report.acceptance_rate,
            "sampler": report.sampler,
        })


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def split_for_stream(text: str, size: int = 24) -> list[str]:
    """The final text in pieces of about `size` characters, cut after whitespace where possible."""
    words = re.findall(r"\S+\s*|\s+", text)
    pieces, current = [], ""
    for w in words:
        if current and len(current) + len(w) > size:
            pieces.append(current)
            current = ""
        current += w
    if current:
        pieces.append(current)
    return pieces
