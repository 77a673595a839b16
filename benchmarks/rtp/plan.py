"""The refinement plan of the IterRef-style methods at a budget: safegen.refine.cost picks the base steps
and the iterations k; this module turns its choice into the RefineConfig the audit runs."""
from __future__ import annotations

from safegen.research import planner

POINTS = tuple(planner.POINTS)  # --refine-points: final, late, spread


def plan_refinement(sampling, budget: float, n_proposals: int = 1, rho: float = 0.5, alpha: float = 0.1,
                    selection: str = "mh", scope: str = "block", points: str = "final",
                    max_iterations: int = 64, use: float = 0.9, meter=None):
    """(RefineConfig, plan) for IterRef-style refinement at `budget` times plain sampling's cost in
    `sampling`, counted by `meter` (safegen.refine.cost.Meter; default rows, which for an uncached
    LLaDA run is also its FLOPs in units of one forward).

    The plan is planner.plan's worst case, in which every iteration draws a new pool (always so for
    remask_only and for N = 1; Metropolis with N > 1 reuses pools after rejections and spends less),
    over the candidate point sets of `points` (planner.candidate_point_sets). RefineConfig(budget=b)
    caps the rows anyway: it is a first-come cap, not an allocation, so the plan is what spreads
    the budget. When not even one pool fits, the config does no refinement (and no reward call).
    """
    from safegen.refine.iterref import RefineConfig

    base = dict(n_proposals=n_proposals, rho=rho, alpha=alpha, selection=selection, scope=scope,
                adaptive=False, budget=float(budget))
    chosen = planner.plan(sampling, RefineConfig(**base), budget, planner.candidate_point_sets(sampling, points),
                       max_iterations=max_iterations, use=use, meter=meter)
    if not chosen.points:
        config = RefineConfig(iterations=0, **base).validate()
    else:
        config = RefineConfig(iterations=chosen.iterations, schedule="steps", at_steps=chosen.points,
                              **base).validate()
    return config, {"points": list(chosen.points), "iterations": chosen.iterations, "planned_rows": chosen.rows,
                    "planned_cost": chosen.cost}


def equal_flops_plan(sampling, cache: str, budget: float, dims, length: int, **kw):
    """(RefineConfig, plan) for a kernel on the `cache`d sampler given the FLOPs of `budget` times
    uncached plain sampling, for a row of `length` real positions (planner.equal_flops_budget). The
    ratio depends on the length, so the audit plans each prompt length apart."""
    multiple, meter = planner.equal_flops_budget(sampling, cache, budget, dims, length)
    config, plan = plan_refinement(meter.sampling, multiple, meter=meter, **kw)
    return config, {**plan, "budget_multiple": multiple, "length": int(length)}
