"""safegen: toxicity-safe generation for masked diffusion LMs (LLaDA) by reward-guided refinement."""

# The public API, imported on first use: `import safegen` (and so `safegen --help`) loads neither
# torch nor transformers. LLaDA registers with transformers' Auto classes when safegen.llada is
# imported (load_model imports it for LLaDA folders).
_EXPORTS = {
    "SafeGenerator": "generator", "SampleReport": "generator", "GenerateOutput": "generator",
    "DiffusionSampler": "sampler", "SamplingConfig": "sampler", "SampleOutput": "sampler",
    "generate": "sampler", "IterRef": "refine", "RefineConfig": "refine",
    "load_policy": "policy", "Policy": "policy", "load_model": "loading", "ModelProfile": "profile",
    "SafegenError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'safegen' has no attribute {name!r}")
