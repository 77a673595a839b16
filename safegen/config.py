"""What every settings dataclass of safegen shares (SamplingConfig, RefineConfig, the serve options):
the error a bad value raises and the validated copy with some fields replaced. Layer 0: imports only
errors.py."""
from __future__ import annotations

from dataclasses import fields, replace

from .errors import SafegenError


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
