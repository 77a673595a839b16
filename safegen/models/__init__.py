"""Layer 1, what a model is: LLaDA's and MDLM's architectures (llada.py, mdlm.py), loading a checkpoint
(loading.py), what a model family's special ids are (family.py), memory estimates (memory.py), the
tiny offline models for tests and the demo (tiny.py), LLaDA's block-wise key/value cache (kvcache.py;
RoPE in rope.py) and the FLOPs a forward computes (flops.py). Imports only errors.py and config.py of
the rest of safegen (README, "Layout"; tests/test_layers.py)."""
