"""Layer 2, the samplers: LLaDA's denoising loop (sampler.py), MDLM's ancestral sampler (mdlm.py), their
settings (config.py), what they pass around (state.py) and the counter-based random numbers (rng.py).
Imports only models/, errors.py and config.py."""
