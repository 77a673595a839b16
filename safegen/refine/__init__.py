"""Layer 3, IterRef: the chain (iterref.py), its settings (config.py), the re-mask sets (remask.py) and
what a refinement costs at run time (cost.py). Imports only sampling/, models/, errors.py and config.py."""
