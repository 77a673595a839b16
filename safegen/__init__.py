"""safegen: toxicity-safe generation for masked diffusion LMs (LLaDA) by reward-guided refinement."""

# The public API, imported on first use: `import safegen` (and so `safegen --help`) loads neither
# torch nor transformers. LLaDA registers with transformers' Auto classes when safegen.models.llada is
# imported (load_model imports it for LLaDA folders).
_EXPORTS = {
    "SafeGenerator": "generator", "SampleReport": "generator", "GenerateOutput": "generator",
    "DiffusionSampler": "sampling.sampler", "SamplingConfig": "sampling.sampler",
    "SampleOutput": "sampling.sampler", "sample": "sampling.factory",
    "generate": "sampling.factory",  # sample's former name, kept importable
    "IterRef": "refine.iterref", "RefineConfig": "refine.iterref",
    "load_policy": "policy", "Policy": "policy", "load_model": "models.loading", "ModelProfile": "models.family",
    "SafegenError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'safegen' has no attribute {name!r}")
