"""Planning a refinement for the benchmarks: how many decoded tokens a point re-masks from, the rows
of a pool at a point, the worst case of a whole refinement, and the iterations k (and points) that
fit a budget. On the run-time cost model (safegen/refine/cost.py); nothing at run time needs it.

The budget is fitted in the units of a cost.Meter: rows by default; FLOPs, in units of one uncached
forward, for a meter made with the model's dims and a prompt's real length (what IterRef's run-time
budget counts for LLaDA, so that a plan with the cache fits what the cut allows).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import torch

from ..refine import moves
from ..refine.config import RefineConfig
from ..refine.cost import EPS, Meter, block_points, is_last, plain_rows, refinement_points
from ..sampling.sampler import SamplingConfig, transfer_counts


def decoded_at(sampling: SamplingConfig, t: int, scope: str) -> int:
    """Decoded tokens in scope at point t of a sample: the current block's commits so far (by the
    sampler's transfer_counts), plus the earlier blocks with scope "all"; the whole answer at the
    last point, whatever the scope."""
    if is_last(sampling, t) or sampling.sampler == "mdlm":
        # MDLM's count at a point is random (binomial): the whole answer bounds it.
        return sampling.max_new_tokens
    S, lengths = sampling.steps_per_block, sampling.block_lengths
    block, step = divmod(t, S)
    if step == 0:  # a block's finished point (only full blocks end on a multiple of S, or the last)
        block, step = block - 1, S
    done = int(transfer_counts(torch.tensor([lengths[block]]), sampling.steps_in_block(block))[0, :step].sum())
    return done + (sum(lengths[:block]) if scope == "all" else 0)


def point_pool_rows(sampling: SamplingConfig, refine: RefineConfig, t: int) -> float:
    """Rows of one pool at point t with the refine config's N, rho and scope."""
    return point_pool_cost(Meter(sampling), refine, t)


def worst_case_rows(sampling: SamplingConfig, refine: RefineConfig,
                    points: Optional[Sequence[int]] = None) -> float:
    """Rows per sample when every iteration draws a new pool: plain_rows + k · Σ pool rows over
    `points` (None: the refine config's schedule)."""
    return worst_case_cost(Meter(sampling), refine, points)


def worst_case_cost(meter: Meter, refine: RefineConfig, points: Optional[Sequence[int]] = None) -> float:
    """Cost per sample in the meter's units when every iteration draws a new pool and moves: plain
    sampling's, k pools at each point, and once a point a move's refresh (Meter.refresh; none in rows)
    and with the cache the current draft's head (point_refresh_cost)."""
    if points is None:
        points = refinement_points(meter.sampling, refine.applies)
    return _scalar(meter.plain()) + sum(
        iterations_cost(meter, refine, t, refine.iterations) + point_refresh_cost(meter, refine, t) for t in points)


def equal_flops_budget(sampling: SamplingConfig, cache: str, budget: float, dims, length: int) -> tuple[float, Meter]:
    """(multiple, meter) for the `cache`d sampler given the FLOPs of `budget` times uncached plain
    sampling, for a row of `length` real positions: IterRef's budget is a multiple of plain sampling in
    its own settings, so the cached run's is budget x (uncached plain / cached plain), a ratio that
    grows with the prompt (the cache saves more of a longer one). The meter counts the cached run."""
    n = torch.tensor([float(length)])
    meter = Meter(replace(sampling, cache=cache), dims, n)
    return budget * _scalar(Meter(sampling, dims, n).plain()) / _scalar(meter.plain()), meter


def _scalar(cost: torch.Tensor) -> float:
    """A one-row (or row-free) cost as a number."""
    return float(cost.reshape(-1)[0])


@dataclass(frozen=True)
class Plan:
    points: tuple  # global steps t where the kernel runs; () when nothing fits
    iterations: int  # k
    rows: float  # worst-case rows per sample: plain_rows + k · Σ pool rows at the points
    cost: float  # worst-case cost per sample in the plan's meter units (rows by default)


POINTS = {"final": (1.0,), "late": (0.75, 1.0), "spread": (0.0, 0.25, 0.5, 0.75, 1.0)}


def candidate_point_sets(sampling: SamplingConfig, points: str = "spread") -> list[tuple[int, ...]]:
    """Refinement point sets to choose from: in every block, every m-th step counted back from the
    block's end, from a share `start` of the block on. `points` bounds `start`: final (the finished
    block only, exact reward), late (the last quarter of each block), spread (anywhere)."""
    sets = set()
    for start in POINTS[points]:
        for every in range(1, sampling.steps_per_block + 1):
            # Per block, with its own step count: a shorter last block is counted back from its end too.
            chosen = tuple(t for _, s, S_b, t in block_points(sampling) if s >= start * S_b and (S_b - s) % every == 0)
            if chosen:
                sets.add(chosen)
    return sorted(sets)


def masks_at(sampling: SamplingConfig, t: int) -> int:
    """Masked positions left at point t: none after the last step; by the block schedule otherwise
    (MDLM's count is random: 1 stands for "some", all that its row count needs)."""
    if is_last(sampling, t):
        return 0
    if sampling.sampler == "mdlm":
        return 1
    return sampling.max_new_tokens - decoded_at(sampling, t, "all")


def point_pool_cost(meter: Meter, refine: RefineConfig, t: int, kind: str = "remask") -> float:
    """The meter's cost of one pool of the move `kind` at point t with the refine config's N, rho (or
    gibbs_holes) and scope."""
    m = moves.hole_counts(refine, kind, torch.tensor([decoded_at(meter.sampling, t, refine.scope)]))
    return _scalar(meter.pool(moves.pool_size(refine, kind), m, torch.tensor([masks_at(meter.sampling, t)]),
                              moves.reverse_forwards(refine, kind, m)))


def iterations_cost(meter: Meter, refine: RefineConfig, t: int, k: int) -> float:
    """The meter's cost of k iterations at point t when each draws a pool: the moves interleaved by
    gibbs_share (RefineConfig.gibbs_at)."""
    each = {kind: point_pool_cost(meter, refine, t, kind) for kind in moves.MOVES}
    return sum(each[moves.kind_at(refine, i)] for i in range(k))


def point_refresh_cost(meter: Meter, refine: RefineConfig, t: int) -> float:
    """What a point costs once, whatever its k: a move's refresh (Meter.refresh) and, with the cache,
    the head of the current draft's own forward (Meter.head: its keys and values serve the first pool)."""
    head = _scalar(meter.head()) if meter.counted and meter.sampling.cache else 0.0
    return _scalar(meter.refresh(t, refine.scope)) + head


def plan(sampling: SamplingConfig, refine: RefineConfig, budget: float,
         point_sets: Optional[Iterable[Sequence[int]]] = None, max_iterations: Optional[int] = None,
         use: float = 1.0, meter: Optional[Meter] = None) -> Plan:
    """The iterations k (and points) of a refinement whose worst case (every iteration draws a new
    pool and moves) fits `budget` times plain sampling's cost under `meter` (default: rows).

    point_sets: the candidate sets of global steps; None: the refine config's own schedule. For each
    set, k is the largest that fits (at most max_iterations). Among the sets whose k >= 1, keeps those
    within `use` of the most any of them spends, and of those takes the most points (spreading a
    budget is best for toxicity in the paper), then the later points, then the most spent. With one
    set (use = 1), this is just the largest k that fits.
    """
    meter = meter or Meter(sampling)
    if point_sets is None:
        point_sets = [refinement_points(sampling, refine.applies)]
    plain = _scalar(meter.plain())
    extra = (budget - 1) * plain
    options = []
    for points in point_sets:
        fixed = sum(point_refresh_cost(meter, refine, t) for t in points)  # once a point: refresh, head
        costs = [sum(point_pool_cost(meter, refine, t, kind) for t in points) for kind in moves.MOVES]
        if min(costs) <= 0:
            continue
        per = dict(zip(moves.MOVES, costs))
        k, total = 0, fixed  # the moves' costs differ (gibbs_share): count the iterations one by one
        while (max_iterations is None or k < max_iterations) and total + per[moves.kind_at(refine, k)] <= extra + EPS:
            total += per[moves.kind_at(refine, k)]
            k += 1
        per_iteration = (total - fixed) / k if k else 0.0
        if k >= 1:
            options.append((k * per_iteration + fixed, len(points), sum(points) / len(points), k, tuple(points)))
    if not options:
        return Plan((), 0, plain_rows(sampling), plain)
    best = max(o[0] for o in options)
    spent, _, _, k, points = max((o for o in options if o[0] >= use * best), key=lambda o: (o[1], o[2], o[0]))
    rows = worst_case_rows(sampling, replace(refine, iterations=k), points)
    return Plan(points, k, rows, plain + spent)
