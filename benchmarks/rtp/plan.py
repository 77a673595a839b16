"""The refinement plan of the IterRef-style methods: which base steps, how many iterations, at a budget."""
from __future__ import annotations

import math


def _point_costs(sampling, n_proposals: int, rho: float, scope: str) -> dict[int, float]:
    """Denoiser rows per sample of one pool at each base step t (1..T) where IterRef may refine:
    N · (ceil(m / tokens_per_step) re-denoising sub-steps + one forward for x̂0 unless the proposal
    is the finished generation), m = max(1, round(rho · decoded tokens in scope)), as
    IterRef.pool_cost charges it."""
    import torch
    from safegen.sampler import transfer_counts

    S, bl, rate = sampling.steps_per_block, sampling.block_length, sampling.tokens_per_step
    per_row = 2.0 if sampling.cfg_scale > 0 else 1.0
    counts = transfer_counts(torch.tensor([bl]), S)[0].tolist()
    costs = {}
    for block in range(sampling.n_blocks):
        for step in range(1, S + 1):
            last = block == sampling.n_blocks - 1 and step == S  # IterRef re-masks the whole answer there
            decoded = sampling.max_new_tokens if last else sum(counts[:step]) + (block * bl if scope == "all" else 0)
            m = max(1, round(rho * decoded))  # Python's round, like torch.round: half to even
            costs[block * S + step] = n_proposals * (math.ceil(m / rate) + (0 if last else 1)) * per_row
    return costs


POINTS = {"final": (1.0,), "late": (0.75, 1.0), "spread": (0.0, 0.25, 0.5, 0.75, 1.0)}


def candidate_point_sets(sampling, points: str = "spread") -> list[tuple[int, ...]]:
    """Refinement points to choose from: in every block, every m-th step counted back from the
    block's end, from a share `start` of the block on. `points` bounds `start`: final (the finished
    block only, exact reward), late (the last quarter of each block), spread (anywhere)."""
    S = sampling.steps_per_block
    sets = set()
    for start in POINTS[points]:
        for every in range(1, S + 1):
            steps = [s for s in range(1, S + 1) if s >= start * S and (S - s) % every == 0]
            if steps:
                sets.add(tuple(b * S + s for b in range(sampling.n_blocks) for s in steps))
    return sorted(sets)


def plan_refinement(sampling, budget: float, n_proposals: int = 1, rho: float = 0.5, alpha: float = 0.1,
                    selection: str = "mh", scope: str = "block", points: str = "final",
                    max_iterations: int = 64, use: float = 0.9):
    """(RefineConfig, plan) for IterRef-style refinement at `budget` times plain sampling's rows.

    The plan is the worst case in which every iteration draws a new pool (always so for remask_only
    and for N = 1; Metropolis with N > 1 reuses pools after rejections and spends less). Among the
    candidate point sets U (see candidate_point_sets; `points` final, late or spread) and iteration
    counts k whose planned rows fit in budget · T, it keeps those within `use` of the most rows any plan
    can spend, and of those takes the most refined points (the paper finds spreading a budget best for
    toxicity), then the later points, then the most rows. RefineConfig(budget=b) caps the rows anyway:
    it is a first-come cap, not an allocation, so the plan is what spreads the budget.
    """
    from safegen.refine import RefineConfig

    T = sampling.steps
    per_row = 2.0 if sampling.cfg_scale > 0 else 1.0
    extra = (budget - 1) * T * per_row
    costs = _point_costs(sampling, n_proposals, rho, scope)
    options = []
    for steps in candidate_point_sets(sampling, points):
        pool = sum(costs[t] for t in steps)
        k = min(max_iterations, int((extra + 1e-9) // pool))
        if k >= 1:
            options.append((k * pool, len(steps), sum(steps) / len(steps), k, steps))
    base = dict(n_proposals=n_proposals, rho=rho, alpha=alpha, selection=selection, scope=scope,
                adaptive=False, budget=float(budget))
    if not options:  # not even one pool fits: plain sampling, and no reward call wasted
        config = RefineConfig(iterations=0, **base).validate()
        return config, {"points": [], "iterations": 0, "planned_rows": T * per_row}
    best = max(o[0] for o in options)
    spent, _, _, k, steps = max((o for o in options if o[0] >= use * best), key=lambda o: (o[1], o[2], o[0]))
    config = RefineConfig(iterations=k, schedule="steps", at_steps=tuple(steps), **base).validate()
    return config, {"points": list(steps), "iterations": k, "planned_rows": T * per_row + spent}
