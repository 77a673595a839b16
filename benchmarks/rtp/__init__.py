"""The RealToxicityPrompts audit (entry script: benchmarks/toxicity_benchmark.py)."""
