"""LLaDA's sampling settings (SamplingConfig) and the validated-update helper that every config
dataclass of safegen shares; the sampler itself is in safegen/sampler.py."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import SafegenError

REMASKING = ("low_confidence", "random")


class ConfigError(SafegenError):
    """A configuration value is out of range; the message names the field."""


def updated_config(config, section: str, overrides: dict):
    """A validated copy of a config dataclass with some fields replaced; unknown names are an
    error that lists them under `section` (sampling, refine)."""
    known = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {unknown}; known: {sorted(known)}")
    return replace(config, **overrides).validate()


@dataclass
class SamplingConfig:
    """LLaDA's sampling settings, with the names of the LLaDA reference code.

    IterRef's chain stays exact (docs/method.md §5) whatever the order, temperature, pace
    (tokens per step) and block settings, and with confidence_eos_eot_inf; cfg_scale > 0 and
    logits_eos_inf change the conditionals its proposals draw from, so that "p" in its target
    p · exp(r/α) is no longer the model's own distribution.
    """

    max_new_tokens: int = 128  # G, the generation length (LLaDA's gen_length)
    steps: int = 128  # T, denoising steps over the whole generation
    block_length: int = 32
    temperature: float = 0.0  # 0: argmax candidates; > 0: sampling from softmax(logits / T)
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance; 0 disables it (> 0: "p" is the guided model)
    logits_eos_inf: bool = False  # forbid EOS as a candidate token (also in proposals: not exact for p)
    # Commit EOS/EOT candidates only when nothing else is left. The base sampler judges by the sampled
    # token (LLaDA's rule); IterRef's proposals by the most likely one, so that they stay exact.
    confidence_eos_eot_inf: bool = False

    def validate(self) -> "SamplingConfig":
        for name in ("max_new_tokens", "steps", "block_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"sampling.{name} must be a positive integer, got {value!r}")
        if self.max_new_tokens % self.block_length:
            raise ConfigError(
                f"sampling.max_new_tokens ({self.max_new_tokens}) must be a multiple of "
                f"sampling.block_length ({self.block_length})")
        if self.steps % self.n_blocks:
            raise ConfigError(
                f"sampling.steps ({self.steps}) must be a multiple of the number of blocks "
                f"({self.n_blocks} = max_new_tokens / block_length)")
        if self.steps > self.max_new_tokens:
            raise ConfigError(
                f"sampling.steps ({self.steps}) exceeds sampling.max_new_tokens "
                f"({self.max_new_tokens}): a step would commit nothing")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature!r}")
        if self.remasking not in REMASKING:
            raise ConfigError(f"sampling.remasking must be one of {REMASKING}, got {self.remasking!r}")
        if not (isinstance(self.cfg_scale, (int, float)) and self.cfg_scale >= 0):
            raise ConfigError(f"sampling.cfg_scale must be >= 0, got {self.cfg_scale!r}")
        return self

    def updated(self, **overrides) -> "SamplingConfig":
        return updated_config(self, "sampling", overrides)

    @property
    def n_blocks(self) -> int:
        return self.max_new_tokens // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.n_blocks

    @property
    def tokens_per_step(self) -> int:
        """Commits per step in a full block (at least 1): the pace proposals re-denoise at."""
        return max(1, self.block_length // self.steps_per_block)
