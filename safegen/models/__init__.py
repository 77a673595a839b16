"""Layer 1, what a model is: LLaDA's and MDLM's architectures (llada.py, mdlm.py), loading a checkpoint
(loading.py), what a model family's special ids are (family.py), memory estimates (memory.py) and the
tiny offline models for tests and the demo (tiny.py). Imports only errors.py and config.py of the rest of safegen
(README, "Layout"; tests/test_layers.py)."""
