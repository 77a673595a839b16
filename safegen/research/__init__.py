"""Code for the benchmarks only, never on the runtime path: the baselines IterRef is compared with
(baselines.py) and the exactly enumerable toy model (toy.py). Nothing outside safegen/research and
benchmarks/ imports it."""
