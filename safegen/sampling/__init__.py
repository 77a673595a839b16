"""Layer 2, the samplers: LLaDA's denoising loop (sampler.py), MDLM's ancestral sampler (mdlm.py), their
settings (config.py), what they pass around (state.py), the counter-based random numbers (rng.py) and
Fast-dLLM's block cache and threshold (fast.py).
Imports only models/, errors.py and config.py."""
