"""From a SamplingConfig to a sampler: make_sampler picks LLaDA's (sampler.py) or MDLM's (mdlm.py) by
`config.sampler`, and sample() is the one-call form. Its own module so that neither sampler imports
the other's subclass."""
from __future__ import annotations

from typing import Optional

import torch

from ..models.family import ModelProfile
from .config import SamplingConfig
from .mdlm import MDLMSampler
from .sampler import DiffusionSampler
from .state import SampleOutput, StepHook


def sample(model: torch.nn.Module, input_ids: torch.Tensor, profile: ModelProfile | int,
           attention_mask: Optional[torch.Tensor] = None, seeds=0,
           config: SamplingConfig | None = None, hook: Optional[StepHook] = None,
           **overrides) -> SampleOutput:
    """One-call sampling: `sample(model, ids, mask_id, steps=64, temperature=0.5)` returns the
    sampler's SampleOutput (sequences and counts), not SafeGenerator.generate's padded ids."""
    config = (config or SamplingConfig()).updated(**overrides)
    return make_sampler(model, profile, config).run(input_ids, attention_mask, seeds, hook)


# The name this function had before it moved; `safegen.generate` stays importable (public API).
generate = sample


def make_sampler(model: torch.nn.Module, profile: ModelProfile | int,
                 config: SamplingConfig | None = None) -> DiffusionSampler:
    """The sampler `config.sampler` names: LLaDA's (sampler.py) or MDLM's (mdlm.py)."""
    if config is not None and config.sampler == "mdlm":
        return MDLMSampler(model, profile, config)
    return DiffusionSampler(model, profile, config)
