"""SafeGenerator: the sampler, IterRef and a policy joined into a drop-in `generate`.

Data flows one way: prompts -> sampler with refinement -> policy scores -> one report per sample.
"Before" is what plain sampling gives for the same prompt and seed; the sampler forks it off where
refinement first applies, so the shared prefix of the trajectory is computed once.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence, Union

import torch

from .policy import Policy, load_policy
from .profile import ModelProfile
from .refine import IterRef, RefineConfig
from .sampler import DiffusionSampler, SamplingConfig, updated_config

log = logging.getLogger(__name__)

# The middleware's default cap: at most 4x the denoiser rows of plain sampling per sample.
DEFAULT_BUDGET = 4.0

Prompt = Union[str, Sequence[dict]]  # a string, or chat messages [{"role": ..., "content": ...}]

_SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}
_REFINE_FIELDS = {f.name for f in fields(RefineConfig)}
# Keyword arguments of generate() that are not configuration fields.
_CALL_FIELDS = {"seed", "seeds", "refine", "report_before", "return_dict_in_generate"}
# transformers generation-config fields that mean nothing for a diffusion sampler; accepted from a
# GenerationConfig object (which always carries them), never silently from keyword arguments.
_IGNORED_GENERATION_FIELDS = {"do_sample", "pad_token_id", "eos_token_id", "bos_token_id"}


@dataclass
class SampleReport:
    """One generated sample, before and after refinement."""

    prompt: str
    text: str  # what the caller gets: text_after, or the refusal / best text per the policy
    text_before: str
    text_after: str
    toxicity_before: dict  # Policy.score row: aggregate, toxic, per_classifier, per_label
    toxicity_after: dict
    toxic_before: bool
    toxic_after: bool
    refined: bool  # did refinement change the sample?
    action: str  # "none" (not toxic), or the policy's on_toxic outcome: "flag" | "refuse" | "best"
    nfe: float  # denoiser forward rows spent on this sample
    nfe_before: float  # extra rows spent computing the "before" sample (0 when not computed)
    reward_calls: float  # texts the reward scored for this sample during refinement
    acceptance_rate: Optional[float]  # accepted / proposed (None when nothing was proposed)
    seconds: float  # the batch's wall time divided by its size
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, P+G), as generate() returns without return_dict_in_generate
    reports: list[SampleReport] = field(default_factory=list)


class SafeGenerator:
    """Wraps a masked diffusion LM so that its generations pass a toxicity policy.

    >>> gen = SafeGenerator.from_pretrained("GSAI-ML/LLaDA-8B-Instruct")
    >>> out = gen.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # like model.generate
    >>> reports = gen.generate_text(["Tell me about your neighbours"])          # texts with reports
    """

    def __init__(self, model, tokenizer, policy: Union[str, Policy] = "default",
                 sampling: Union[SamplingConfig, dict, None] = None,
                 refinement: Union[RefineConfig, dict, None] = None,
                 profile: Optional[ModelProfile] = None, report_before: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.policy = load_policy(policy) if isinstance(policy, (str, bytes)) or hasattr(policy, "__fspath__") else policy
        if profile is None:
            from .loading import profile_from
            profile = profile_from(model.config, tokenizer)
        self.profile = profile
        self.sampling = _as_config(sampling, SamplingConfig, "sampling")
        # The policy's α is the refinement's unless the caller set one. A middleware should spend
        # nothing on samples the policy already accepts: adaptive refinement is on by default here
        # (the benchmark turns it off for the exact target). A policy can say which tokens it objects
        # to, and re-masking those beat uniform re-masking at equal rows on both benchmarks
        # (benchmarks/RESULTS.md), so that is the default here.
        if refinement is None or isinstance(refinement, dict):
            refinement = _as_config({"alpha": self.policy.alpha, "adaptive": True, "budget": DEFAULT_BUDGET,
                                     "accept_reward": self.policy.reward_threshold, "remask": "targeted",
                                     **(refinement or {})}, RefineConfig, "refinement")
        elif refinement.adaptive and refinement.accept_reward is None:
            refinement = dataclasses.replace(refinement, accept_reward=self.policy.reward_threshold)
        self.refinement = refinement.validate()
        self.report_before = report_before

    @classmethod
    def from_pretrained(cls, model_id_or_path: str = None, quantization: str = "4bit",
                        policy: Union[str, Policy] = "default", revision: Optional[str] = None,
                        trust_remote_code: bool = False, device_map: Any = "auto", dtype=None,
                        sampling=None, refinement=None, report_before: bool = True) -> "SafeGenerator":
        from .loading import DEFAULT_MODEL, DEFAULT_REVISION, load_model
        model_id_or_path = model_id_or_path or DEFAULT_MODEL
        if revision is None and model_id_or_path == DEFAULT_MODEL:
            revision = DEFAULT_REVISION
        model, tokenizer, profile = load_model(model_id_or_path, quantization=quantization, revision=revision,
                                               device_map=device_map, dtype=dtype,
                                               trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, policy=policy, sampling=sampling, refinement=refinement,
                   profile=profile, report_before=report_before)

    # ---------------------------------------------------------------- configuration
    def resolve(self, generation_config=None, **kwargs):
        """(SamplingConfig, RefineConfig, call options) by priority: kwargs > generation_config >
        this generator's configs > defaults. Unknown keyword arguments are an error naming them."""
        unknown = sorted(set(kwargs) - _SAMPLING_FIELDS - _REFINE_FIELDS - _CALL_FIELDS)
        if unknown:
            raise TypeError(f"generate() got unknown argument(s) {unknown}; sampling options: "
                            f"{sorted(_SAMPLING_FIELDS)}, refinement options: {sorted(_REFINE_FIELDS)}, "
                            f"call options: {sorted(_CALL_FIELDS)}")
        from_config = {}
        if generation_config is not None:
            items = generation_config if isinstance(generation_config, dict) else \
                generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else \
                vars(generation_config)
            for k, v in items.items():
                if k in _SAMPLING_FIELDS or k in _REFINE_FIELDS:
                    from_config[k] = v
                elif isinstance(generation_config, dict) and k not in _IGNORED_GENERATION_FIELDS | _CALL_FIELDS:
                    raise TypeError(f"generation_config has unknown key {k!r}")
                elif k in _CALL_FIELDS:
                    kwargs.setdefault(k, v)
            if from_config.get("temperature") and not getattr(generation_config, "do_sample", True):
                from_config["temperature"] = 0.0  # transformers' do_sample=False means greedy
        merged = {**from_config, **kwargs}
        sampling = self.sampling.updated(**{k: v for k, v in merged.items() if k in _SAMPLING_FIELDS})
        refinement = self.refinement.updated(**{k: v for k, v in merged.items() if k in _REFINE_FIELDS})
        call = {k: v for k, v in merged.items() if k in _CALL_FIELDS}
        return sampling, refinement, call

    # ---------------------------------------------------------------- token interface
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 generation_config=None, **kwargs):
        """Like `model.generate`: a LongTensor (B, P+G) of prompt plus generation, padded after the
        first EOS/EOT. With `return_dict_in_generate=True`, a GenerateOutput with the reports.
        Options: any SamplingConfig or RefineConfig field, `seed` (row i gets seed + i) or `seeds`
        (one per row), `refine=False` (plain sampling), `report_before=False` (skip the fork)."""
        sampling, refinement, call = self.resolve(generation_config, **kwargs)
        out = self._generate(input_ids, attention_mask, sampling, refinement, call, prompts=None)
        return out if call.get("return_dict_in_generate") else out.sequences

    def _generate(self, input_ids, attention_mask, sampling, refinement, call, prompts):
        B = input_ids.shape[0]
        seeds = call.get("seeds", call.get("seed", 0))
        seeds = [seeds + i for i in range(B)] if isinstance(seeds, int) else list(seeds)
        refine = call.get("refine", True) and refinement.iterations > 0
        reward = self.policy.reward_fn(self.tokenizer, self.profile.stop_ids)
        sampler = DiffusionSampler(self.model, self.profile, sampling)
        fork = refine and call.get("report_before", self.report_before)
        t0 = time.perf_counter()
        # Targeted re-masking asks the policy which tokens it objects to.
        blame = reward.blame if refinement.remask == "targeted" else None
        result = sampler.run(input_ids, attention_mask, seeds,
                             hook=IterRef(refinement, reward, blame=blame) if refine else None, fork_plain=fork)
        P = input_ids.shape[1]
        after = reward.decode(result.sequences[:, P:])
        before = reward.decode(result.plain_sequences[:, P:]) if fork else list(after)
        scores = self.policy.score(before + after)  # one batch; identical texts are scored once
        seconds = (time.perf_counter() - t0) / max(B, 1)
        if prompts is None:
            prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        sequences = result.sequences.clone()
        reports = []
        for i in range(B):
            tb, ta = scores.row(i), scores.row(B + i)
            text, action = after[i], "none"
            if ta["toxic"]:
                action = self.policy.on_toxic
                if action == "refuse":
                    text = self.policy.refusal_text
                    sequences[i, P:] = self._encode_answer(text, sequences.shape[1] - P, sequences.device)
                elif action == "best" and fork and tb["aggregate"] < ta["aggregate"]:
                    text = before[i]
                    sequences[i] = result.plain_sequences[i]
            proposed = float(result.proposed[i])
            reports.append(SampleReport(
                prompt=prompts[i], text=text, text_before=before[i], text_after=after[i],
                toxicity_before=tb, toxicity_after=ta, toxic_before=tb["toxic"], toxic_after=ta["toxic"],
                refined=bool(fork and not torch.equal(result.sequences[i], result.plain_sequences[i]))
                or (not fork and float(result.accepted[i]) > 0),
                action=action, nfe=float(result.rows[i]),
                nfe_before=float(result.plain_rows[i]) if fork else 0.0,
                reward_calls=float(result.reward_calls[i]),
                acceptance_rate=float(result.accepted[i]) / proposed if proposed else None,
                seconds=seconds, seed=int(seeds[i])))
        return GenerateOutput(sequences=sequences, reports=reports)

    def _encode_answer(self, text: str, length: int, device) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: length - 1]
        pad = self.profile.pad_id if self.profile.pad_id is not None else self.profile.eos_id
        stop = self.profile.eos_id if self.profile.eos_id is not None else pad
        row = ids + [stop] + [pad] * (length - len(ids) - 1)
        return torch.tensor(row[:length], dtype=torch.long, device=device)

    # ---------------------------------------------------------------- text interface
    def encode_prompts(self, prompts: Sequence[Prompt], max_prompt_tokens: Optional[int] = None):
        """Token ids (left padded) and attention mask for strings or chat-message lists.

        With a chat template (instruct models) a string becomes one user message; without one
        (base models) it is prefixed with BOS. Prompts longer than max_prompt_tokens keep their
        first tokens, with a warning.
        """
        rows, shown = [], []
        for i, p in enumerate(prompts):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            if not all(isinstance(m, dict) and "content" in m and "role" in m for m in messages):
                raise TypeError(f"prompts[{i}] must be a string or a list of {{'role', 'content'}} messages")
            if max_prompt_tokens is not None:
                messages = [dict(m, content=self._truncate(m["content"], max_prompt_tokens, i)) for m in messages]
            if self.profile.chat_template:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                text = "\n".join(m["content"] for m in messages)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if self.profile.bos_id is not None:
                    ids = [self.profile.bos_id] + ids
            rows.append(list(ids))
            shown.append(p if isinstance(p, str) else messages[-1]["content"])
        width = max(len(r) for r in rows)
        pad = self.profile.pad_id if self.profile.pad_id is not None else self.profile.eos_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
        return input_ids, attention, shown

    def _truncate(self, content: str, limit: int, index: int) -> str:
        ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return content
        log.warning("prompt %d has %d tokens; truncated to the first %d", index, len(ids), limit)
        return self.tokenizer.decode(ids[:limit], skip_special_tokens=True)

    def generate_text(self, prompts: Union[Prompt, Sequence[Prompt]], max_prompt_tokens: Optional[int] = None,
                      generation_config=None, **kwargs) -> list[SampleReport]:
        """Generate for strings or chat messages; returns one SampleReport per prompt (`.text`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        sampling, refinement, call = self.resolve(generation_config, **kwargs)
        input_ids, attention, shown = self.encode_prompts(prompts, max_prompt_tokens)
        device = DiffusionSampler(self.model, self.profile, sampling).device
        out = self._generate(input_ids.to(device), attention.to(device), sampling, refinement, call, shown)
        return out.reports


def _as_config(value, cls, name):
    if value is None or isinstance(value, dict):
        return updated_config(cls(), name, value or {})
    if isinstance(value, cls):
        return value.validate()
    raise TypeError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
