"""The methods the benchmarks compare, in the order their tables list them."""

METHODS = ("plain", "best_of_n", "svdd", "fk_steering", "remask_only", "iterref", "iterref_targeted")
# Baselines whose budget b is a count (b samples, candidates, particles): whole budgets only.
BASELINES = ("best_of_n", "fk_steering", "svdd")
# The IterRef kernel's methods: (selection, re-masking). They share one refinement plan per budget.
KERNELS = {"iterref": ("mh", "uniform"), "iterref_targeted": ("mh", "targeted"),
           "remask_only": ("remask_only", "uniform"), "iterref_targeted_dual": ("mh", "targeted")}
# Kernels run on LLaDA's cached sampler (SamplingConfig.cache), at the FLOPs of the uncached budget:
# the RTP audit only (the exact toys have no attention to cache).
CACHED = {"iterref_targeted_dual": "dual"}
UNCACHED_OF = {"iterref_targeted_dual": "iterref_targeted"}  # the same kernel without the cache
RTP_METHODS = METHODS + tuple(CACHED)
