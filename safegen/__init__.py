"""safegen: toxicity-safe generation for masked diffusion LMs (LLaDA) by reward-guided refinement."""

# Registers the tiny LLaDA-shaped test model with transformers' Auto classes, so that
# AutoModel.from_pretrained(folder) works after `import safegen`. This imports torch and
# transformers' modeling base classes; safegen.tiny defers everything else (tokenizers, hub).
from . import tiny as _tiny  # noqa: F401

# The public API, imported on first use so that `import safegen` stays light.
_EXPORTS = {
    "SafeGenerator": "generator", "SampleReport": "generator", "GenerateOutput": "generator",
    "DiffusionSampler": "sampler", "SamplingConfig": "sampler", "SampleOutput": "sampler",
    "generate": "sampler", "IterRef": "refine", "RefineConfig": "refine",
    "load_policy": "policy", "Policy": "policy", "load_model": "loading", "ModelProfile": "profile",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'safegen' has no attribute {name!r}")
