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

from . import keywords
from .errors import ArgumentTypeError
from .policy import Policy, load_policy
from .models.family import ModelProfile
from .refine.config import PRESETS, RENAMED_FIELDS, renamed
from .refine.iterref import IterRef, RefineConfig
from .keywords import sample_or_not, stop_id_list
from .sampling.factory import make_sampler
from .sampling.sampler import ConfigError, SamplingConfig, drive, updated_config
from .sampling.config import fit_lengths

log = logging.getLogger(__name__)

# The middleware preset's cap: at most 4x the denoiser rows of plain sampling per sample.
DEFAULT_BUDGET = PRESETS["middleware"]["budget"]

Prompt = Union[str, Sequence[dict]]  # a string, or chat messages [{"role": ..., "content": ...}]

_SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}
_REFINE_FIELDS = {f.name for f in fields(RefineConfig)} | set(RENAMED_FIELDS)
# Keyword arguments of generate() that are not configuration fields: safegen's own, and those of
# transformers' generate() whose meaning carries over.
_CALL_FIELDS = {"seed", "seeds", "refine", "report_before", "return_dict_in_generate", *keywords.HONOURED}


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
    rows: float  # denoiser rows spent on this sample (safegen.refine.cost: CFG counts 2 per forward)
    rows_before: float  # extra denoiser rows spent computing the "before" sample (0 when not computed)
    reward_calls: float  # texts the reward scored for this sample during refinement
    acceptance_rate: Optional[float]  # accepted / proposed (None when nothing was proposed)
    seconds: float  # the batch's wall time divided by its size
    seed: int
    flops: float = 0.0  # model FLOPs spent on this sample (safegen.models.flops; 0 for models of unknown shape)
    flops_before: float = 0.0  # extra FLOPs of the "before" sample
    sampler: str = "llada"  # which sampler produced it (SamplingConfig.describe: "llada+dual", ...)

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
        self.policy = load_policy(policy)
        if profile is None:
            from .models.loading import profile_from
            profile = profile_from(model.config, tokenizer)
        self.profile = profile
        if getattr(getattr(model, "config", None), "model_type", None) == "mdlm" and not isinstance(sampling, SamplingConfig):
            # MDLM's own sampler, at temperature 1 as it was trained to be sampled, unless set otherwise.
            from .sampling.mdlm import DEFAULT_SAMPLING
            sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.sampling, self.refinement = middleware_configs(self.policy, sampling, refinement)
        self.report_before = report_before

    @classmethod
    def from_pretrained(cls, model_id_or_path: str = None, quantization: str = "4bit",
                        policy: Union[str, Policy] = "default", revision: Optional[str] = None,
                        trust_remote_code: bool = False, device_map: Any = "auto", dtype=None,
                        sampling=None, refinement=None, report_before: bool = True) -> "SafeGenerator":
        from .models.loading import DEFAULT_MODEL, DEFAULT_REVISION, load_model, require_tokenizer
        policy = load_policy(policy)  # its mistakes and the configs' cost a second, not a model load
        middleware_configs(policy, sampling, refinement)
        model_id_or_path = model_id_or_path or DEFAULT_MODEL
        if revision is None and model_id_or_path == DEFAULT_MODEL:
            revision = DEFAULT_REVISION
        model, tokenizer, profile = load_model(model_id_or_path, quantization=quantization, revision=revision,
                                               device_map=device_map, dtype=dtype,
                                               trust_remote_code=trust_remote_code)
        require_tokenizer(tokenizer, model_id_or_path)
        return cls(model, tokenizer, policy=policy, sampling=sampling, refinement=refinement,
                   profile=profile, report_before=report_before)

    # ---------------------------------------------------------------- configuration
    def resolve(self, generation_config=None, prompt_length: Optional[int] = None, **kwargs):
        """(SamplingConfig, RefineConfig, call options) by priority: kwargs > generation_config >
        this generator's configs > defaults. A keyword of transformers' generate() that has no
        meaning here is an error saying why; an unknown one is an error listing the known ones.
        From a GenerationConfig object (which carries every field) only the known keys are read."""
        _check_keywords(kwargs, "generate() got")
        from_config = {}
        if generation_config is not None:
            is_dict = isinstance(generation_config, dict)
            items = generation_config if is_dict else generation_config.to_diff_dict() \
                if hasattr(generation_config, "to_diff_dict") else vars(generation_config)
            if is_dict:
                _check_keywords(items, "generation_config has")
            # A GenerationConfig's diff dict holds the fields that were set (transformers 5 leaves the
            # others None), do_sample among them only when stated: the same options as a dict.
            from_config = {k: v for k, v in items.items() if k in _SAMPLING_FIELDS | _REFINE_FIELDS | _CALL_FIELDS
                           and (is_dict or v is not None)}
        merged = renamed({**from_config, **kwargs})
        if "max_length" in merged and "max_new_tokens" not in merged:
            if prompt_length is None or merged["max_length"] - prompt_length < 1:
                raise ConfigError(f"max_length={merged['max_length']} leaves no room to generate after the "
                                  f"prompt ({prompt_length} tokens); pass max_new_tokens instead")
            merged["max_new_tokens"] = merged["max_length"] - prompt_length
        sample_or_not(merged, self.sampling.temperature)
        sampling = self.sampling.updated(**fit_lengths(self.sampling, {k: v for k, v in merged.items()
                                                                        if k in _SAMPLING_FIELDS}))
        refinement = self.refinement.updated(**{k: v for k, v in merged.items() if k in _REFINE_FIELDS})
        call = {k: v for k, v in merged.items() if k in _CALL_FIELDS}
        n = call.get("num_return_sequences", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"num_return_sequences must be a positive integer, got {n!r}")
        if n > 1 and sampling.temperature == 0:
            raise ConfigError(f"num_return_sequences={n} at temperature 0 (greedy) would return {n} identical "
                              "sequences per prompt; pass do_sample=True or a temperature > 0")
        return sampling, refinement, call

    # ---------------------------------------------------------------- token interface
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 generation_config=None, **kwargs):
        """Like `model.generate`: a LongTensor (B·n, P+G) of prompt plus generation, padded after
        the first EOS/EOT. With `return_dict_in_generate=True`, a GenerateOutput with the reports.

        Options: any SamplingConfig or RefineConfig field, `seed` (output row i gets seed + i) or
        `seeds` (one per output row), `refine=False` (plain sampling), `report_before=False`.
        Setting max_new_tokens (G) alone fits the rest to it (see `fit_lengths`). From transformers'
        generate: max_length (G = max_length - prompt length), num_return_sequences (n samples per
        prompt, each with its own seed; needs temperature > 0), do_sample (False: greedy; True:
        temperature 1 unless one is set; unstated: temperature > 0 samples, in kwargs, a dict or a
        GenerationConfig alike), pad_token_id (fills after the first stop token), eos_token_id (an
        id or a list of any length, added to the model's EOS and EOT); use_cache and bos_token_id change
        nothing. Other generate keywords are refused with the reason.

        A right-padded batch (the tokenizer's default side) is re-padded to the left, where the
        sampler needs the padding: the generation must follow each prompt's last token. The
        returned rows then hold the prompts left padded.
        """
        sampling, refinement, call = self.resolve(generation_config, prompt_length=input_ids.shape[-1], **kwargs)
        if attention_mask is not None:
            input_ids, attention_mask = left_padded(input_ids, attention_mask, self._pad_id(call))
        out = drive(self._generate_steps(input_ids, attention_mask, sampling, refinement, call, prompts=None))
        return out if call.get("return_dict_in_generate") else out.sequences

    def generate_steps(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       generation_config=None, **kwargs):
        """`generate(..., return_dict_in_generate=True)` as a generator: it yields after each sampler
        step and returns the GenerateOutput. A scheduler (safegen/engine.py) interleaves several such
        generations on one model thread, step by step; each gets what it gets alone. The options are
        checked when this is called, before the first step."""
        sampling, refinement, call = self.resolve(generation_config, prompt_length=input_ids.shape[-1], **kwargs)
        if attention_mask is not None:
            input_ids, attention_mask = left_padded(input_ids, attention_mask, self._pad_id(call))
        return self._generate_steps(input_ids, attention_mask, sampling, refinement, call, prompts=None)

    def _pad_id(self, call: dict) -> int:
        pad = call.get("pad_token_id", self.profile.pad_id)
        return pad if pad is not None else self.profile.eos_id

    def _call_profile(self, call: dict) -> ModelProfile:
        """The model profile with the call's pad_token_id and eos_token_id."""
        changes = {}
        if call.get("pad_token_id") is not None:
            changes["pad_id"] = int(call["pad_token_id"])
        if call.get("eos_token_id") is not None:
            # Added to the model's own stop tokens (EOS, EOT), which the answers were trained to end
            # with; replacing those takes a profile (docs/python.md, "Stop tokens").
            changes["extra_stop_ids"] = self.profile.extra_stop_ids + stop_id_list(call["eos_token_id"])
        return dataclasses.replace(self.profile, **changes) if changes else self.profile

    def _generate_steps(self, input_ids, attention_mask, sampling, refinement, call, prompts):
        n = call.get("num_return_sequences", 1)
        if n > 1:
            input_ids = input_ids.repeat_interleave(n, 0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(n, 0)
            prompts = None if prompts is None else [p for p in prompts for _ in range(n)]
        B = input_ids.shape[0]
        seeds = call.get("seeds", call.get("seed", 0))
        seeds = [seeds + i for i in range(B)] if isinstance(seeds, int) else list(seeds)
        refine = call.get("refine", True) and refinement.iterations > 0
        profile = self._call_profile(call)
        reward = self.policy.reward_fn(self.tokenizer, profile.stop_ids)
        sampler = make_sampler(self.model, profile, sampling)
        fork = refine and call.get("report_before", self.report_before)
        check_best(self.policy, refine, fork)
        t0 = time.perf_counter()
        # Targeted re-masking asks the policy which tokens it objects to.
        blame = reward.blame if refinement.proposal_holes == "targeted" else None
        # The reward's verdict (Policy.judge) is the adaptive gate: it refines what the report calls toxic.
        result = yield from sampler.run_steps(input_ids, attention_mask, seeds, fork_plain=fork,
                                              hook=IterRef(refinement, reward.judge, blame=blame) if refine else None)
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
                    sequences[i, P:] = self._encode_answer(text, sequences.shape[1] - P, sequences.device, profile)
                elif action == "best" and fork and tb["effective"] < ta["effective"]:
                    text = before[i]
                    sequences[i] = result.plain_sequences[i]
            proposed = float(result.proposed[i])
            reports.append(SampleReport(
                prompt=prompts[i], text=text, text_before=before[i], text_after=after[i],
                toxicity_before=tb, toxicity_after=ta, toxic_before=tb["toxic"], toxic_after=ta["toxic"],
                refined=bool(fork and not torch.equal(result.sequences[i], result.plain_sequences[i]))
                or (not fork and float(result.accepted[i]) > 0),
                action=action, rows=float(result.rows[i]),
                rows_before=float(result.plain_rows[i]) if fork else 0.0,
                reward_calls=float(result.reward_calls[i]),
                acceptance_rate=float(result.accepted[i]) / proposed if proposed else None,
                seconds=seconds, seed=int(seeds[i]),
                flops=float(result.flops[i]) if result.flops is not None else 0.0,
                flops_before=float(result.plain_flops[i]) if fork and result.plain_flops is not None else 0.0,
                sampler=sampling.describe()))
        return GenerateOutput(sequences=sequences, reports=reports)

    def _encode_answer(self, text: str, length: int, device, profile: ModelProfile) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: length - 1]
        pad = profile.fill_id
        stop = profile.eos_id if profile.eos_id is not None else pad
        row = ids + [stop] + [pad] * (length - len(ids) - 1)
        return torch.tensor(row[:length], dtype=torch.long, device=device)

    # ---------------------------------------------------------------- text interface
    def encode_prompts(self, prompts: Sequence[Prompt], max_prompt_tokens: Optional[int] = None,
                       labels: Optional[Sequence[str]] = None):
        """Token ids (left padded) and attention mask for strings or chat-message lists.

        With a chat template (instruct models) a string becomes one user message; without one
        (base models) it is prefixed with BOS. Prompts longer than max_prompt_tokens keep their
        first tokens, with a warning naming the prompt by its label (e.g. its file and line).
        """
        labels = labels or [f"prompt {i}" for i in range(len(prompts))]
        rows, shown = [], []
        for i, p in enumerate(prompts):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            if not all(isinstance(m, dict) and "content" in m and "role" in m for m in messages):
                raise ArgumentTypeError(f"prompts[{i}] must be a string or a list of {{'role', 'content'}} messages")
            if max_prompt_tokens is not None:
                messages = [dict(m, content=self._truncate(m["content"], max_prompt_tokens, labels[i]))
                            for m in messages]
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
        pad = self.profile.fill_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
        return input_ids, attention, shown

    def _truncate(self, content: str, limit: int, label: str) -> str:
        ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return content
        log.warning("%s has %d tokens; truncated to the first %d", label, len(ids), limit)
        return self.tokenizer.decode(ids[:limit], skip_special_tokens=True)

    def generate_text(self, prompts: Union[Prompt, Sequence[Prompt]], max_prompt_tokens: Optional[int] = None,
                      generation_config=None, labels: Optional[Sequence[str]] = None,
                      **kwargs) -> list[SampleReport]:
        """Generate for strings or chat messages; returns one SampleReport per sample (`.text`):
        num_return_sequences per prompt, in prompt order. No prompts give no reports. `labels`
        name the prompts in warnings (default "prompt <i>")."""
        return drive(self.generate_text_steps(prompts, max_prompt_tokens, generation_config, labels, **kwargs))

    def generate_text_steps(self, prompts: Union[Prompt, Sequence[Prompt]], max_prompt_tokens: Optional[int] = None,
                            generation_config=None, labels: Optional[Sequence[str]] = None, **kwargs):
        """`generate_text` as a generator that yields after each sampler step and returns the reports
        (safegen/engine.py runs such generations side by side: `safegen detoxify`). The prompts are
        encoded and the options checked when this is called, before the first step."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        if not prompts:
            self.resolve(generation_config, **kwargs)  # still refuse bad options
            return _no_steps([])
        input_ids, attention, shown = self.encode_prompts(prompts, max_prompt_tokens, labels)
        sampling, refinement, call = self.resolve(generation_config, prompt_length=input_ids.shape[1], **kwargs)
        device = make_sampler(self.model, self.profile, sampling).device
        return _reports(self._generate_steps(input_ids.to(device), attention.to(device), sampling, refinement,
                                             call, shown))


def _no_steps(result):
    return result
    yield  # a generator that returns `result` at once


def _reports(steps):
    out = yield from steps
    return out.reports


def check_best(policy: Policy, refine: bool, report_before: bool) -> None:
    """on_toxic "best" picks the less toxic of the text before refinement and the one after: without
    the report before there is nothing to pick from, and returning "after" would be a silent "flag"."""
    if refine and not report_before and policy.on_toxic == "best":
        raise ConfigError("on_toxic: best needs the text before refinement, which report_before=False "
                          "(--no-before) skips: keep the report before, or choose on_toxic flag or refuse")


def middleware_configs(policy: Policy, sampling=None, refinement=None,
                       preset: str = "middleware") -> tuple[SamplingConfig, RefineConfig]:
    """The validated configs of a SafeGenerator with this policy: a refinement given as a dict (or
    None) starts from the named preset (safegen/refine/config.py, PRESETS: "middleware" re-masks what
    the policy blames, refines only what it rejects, within 4x plain sampling's rows), and the
    policy's α is the refinement's unless the caller set one. Dicts may set max_new_tokens alone:
    `fit_lengths` derives the rest."""
    if sampling is None or isinstance(sampling, dict):
        sampling = fit_lengths(SamplingConfig(), sampling or {})
    sampling = _as_config(sampling, SamplingConfig, "sampling")
    if refinement is None or isinstance(refinement, dict):
        if preset not in PRESETS:
            raise ConfigError(f"unknown refinement preset {preset!r}; known: {sorted(PRESETS)}")
        refinement = _as_config({**PRESETS[preset], "alpha": policy.alpha, **(refinement or {})},
                                RefineConfig, "refinement")
    return sampling, refinement.validate()


def left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """The batch with each row's padding moved to its left (unchanged when it is there already)."""
    keep = attention_mask.bool()
    if not (keep[:, :-1] & ~keep[:, 1:]).any():  # no attended token before a padded one
        return input_ids, attention_mask
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # padding first, each part in order
    keep = keep.gather(1, order)
    ids = torch.where(keep, input_ids.gather(1, order), torch.full_like(input_ids, pad_id))
    return ids, keep.to(attention_mask.dtype)


def _check_keywords(options: dict, where: str) -> None:
    refused = sorted(k for k in options if k in keywords.REFUSED)
    if refused:
        raise ArgumentTypeError(f"{where} {', '.join(f'{k} ({keywords.REFUSED[k]})' for k in refused)}")
    unknown = sorted(set(options) - _SAMPLING_FIELDS - _REFINE_FIELDS - _CALL_FIELDS)
    if unknown:
        raise ArgumentTypeError(f"{where} unknown argument(s) {unknown}; sampling options: {sorted(_SAMPLING_FIELDS)}, "
                                f"refinement options: {sorted(_REFINE_FIELDS)}, call options: {sorted(_CALL_FIELDS)}")


def _as_config(value, cls, name):
    if value is None or isinstance(value, dict):
        return updated_config(cls(), name, value or {})
    if isinstance(value, cls):
        return value.validate()
    raise ArgumentTypeError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
