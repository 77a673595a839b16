"""The compute-cost model: denoiser rows, what IterRef's budget gates on and what planners fit.

The unit is the denoiser row: one sequence through one forward of the mask predictor. CFG runs two
(the prompted pass and the prompt-masked one). Plain sampling costs T forwards per sample. IterRef,
at a refinement point t (the base steps done, 1..T), draws pools of N proposals; each proposal
re-masks m = max(1, round(rho · n)) of the n decoded tokens in scope and re-denoises them one per
forward (whatever the base sampler's tokens_per_step: several holes drawn in one forward are not a
draw from their joint conditional), then needs one more forward for its x̂0 unless it has no mask
left (only at the point after the last step, which re-masks the whole answer). So a pool costs

    N · (m + [a mask is left]) · rows_per_forward

and a refinement plan with k iterations at the points U costs, at most (every iteration drawing a
pool: always so for N = 1 and for remask-only), T · rows_per_forward + k · Σ_{t ∈ U} pool(t).

The sampler counts the rows it really runs (SampleOutput.rows); this module predicts them, and the
tests check one against the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from .refine_config import RefineConfig
from .sampler import SamplingConfig, global_step, transfer_counts


# (block, step, steps in the block, t) -> does the kernel apply there (RefineConfig.applies, IterRef.applies)
Applies = Callable[[int, int, int, int], bool]

EPS = 1e-9  # float slack when comparing rows with a budget


def rows_per_forward(sampling: SamplingConfig) -> float:
    """Denoiser rows of one forward of one sequence: 2 with CFG (a second, prompt-masked pass)."""
    return 2.0 if sampling.cfg_scale > 0 else 1.0


def plain_rows(sampling: SamplingConfig) -> float:
    """Rows per sample of plain sampling, the budget's unit: T forwards; with MDLM's sampler, which
    runs the model only after a step that unmasked something, their expected number (at most G + 1)."""
    if sampling.sampler == "mdlm":
        from .mdlm_sampler import expected_forwards

        return expected_forwards(sampling.max_new_tokens, sampling.steps) * rows_per_forward(sampling)
    return sampling.steps * rows_per_forward(sampling)


def block_points(sampling: SamplingConfig) -> list[tuple[int, int, int, int]]:
    """(block, step, steps in the block, t) of every point after a commit, in order; t = 1..T."""
    S = sampling.steps_per_block
    return [(b, s, sampling.steps_in_block(b), global_step(b, s, S))
            for b in range(sampling.n_blocks) for s in range(1, sampling.steps_in_block(b) + 1)]


def refinement_points(sampling: SamplingConfig, applies: Applies) -> list[int]:
    """The global steps t (1..T) after which `applies` (block, step, steps in the block, t) says the
    kernel runs, in order."""
    return [t for b, s, S_b, t in block_points(sampling) if applies(b, s, S_b, t)]


def is_last(sampling: SamplingConfig, t: int) -> bool:
    """The point after the last step: the answer is complete, and IterRef re-masks all of it."""
    return t == sampling.steps


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


def remask_sizes(rho: float, decoded: torch.Tensor) -> torch.Tensor:
    """m = max(1, round(rho · n)) per entry of n (round half to even); 0 where n is 0."""
    m = torch.clamp(torch.round(rho * decoded.double()).long(), min=1)
    return torch.where(decoded > 0, m, torch.zeros_like(m))


def pool_rows(sampling: SamplingConfig, n_proposals: int, m: torch.Tensor,
              mask_left: torch.Tensor) -> torch.Tensor:
    """Rows of one pool, per row: N · (one forward per re-masked token, m, + one scoring forward
    where a mask is left after them) · rows_per_forward. float64. Proposals re-commit one hole per
    forward whatever the base sampler's tokens_per_step: only then are they draws from the model's
    joint conditional (refine.PROPOSAL_ORDER)."""
    # With the cache (safegen.fast), a pool first makes one full forward per row for its drafts'
    # keys and values; its proposals' forwards are then short ones (their holes), each still a row.
    prefill = 1.0 if getattr(sampling, "cache", None) else 0.0
    return n_proposals * (m + mask_left.long()).double() * rows_per_forward(sampling) + prefill


def point_pool_rows(sampling: SamplingConfig, refine: RefineConfig, t: int) -> float:
    """Rows of one pool at point t with the refine config's N, rho and scope."""
    m = remask_sizes(refine.rho, torch.tensor([decoded_at(sampling, t, refine.scope)]))
    return float(pool_rows(sampling, refine.n_proposals, m, torch.tensor([not is_last(sampling, t)]))[0])


def worst_case_rows(sampling: SamplingConfig, refine: RefineConfig,
                    points: Optional[Sequence[int]] = None) -> float:
    """Rows per sample when every iteration draws a new pool: plain_rows + k · Σ pool rows over
    `points` (None: the refine config's schedule)."""
    if points is None:
        points = refinement_points(sampling, refine.applies)
    return plain_rows(sampling) + refine.iterations * sum(point_pool_rows(sampling, refine, t) for t in points)


def allowance(sampling: SamplingConfig, budget: float, spent: torch.Tensor, t: int,
              points_left: int) -> torch.Tensor:
    """Rows each sample may spend at refinement point t under `budget` (a multiple of plain_rows),
    having spent `spent` (per row): what is left after the base steps still to come, shared equally
    by this and the later refinement points (`points_left`, this one included), so that an early
    point cannot starve the later ones, the last of which scores the exact reward. What a point
    leaves unspent carries over."""
    T, per_row = sampling.steps, rows_per_forward(sampling)
    # The next base step's forward is already made and charged (refresh, or the scoring forward of
    # an accepted proposal) unless the answer is complete.
    base_left = T - t - (1 if t < T else 0)
    if sampling.sampler == "mdlm":  # a forward only after a step that unmasked one of the G positions
        base_left = min(base_left, sampling.max_new_tokens)
    left = budget * plain_rows(sampling) - spent - base_left * per_row
    return left / max(points_left, 1)


# ----------------------------------------------------------------------------- planning k
@dataclass(frozen=True)
class Plan:
    points: tuple  # global steps t where the kernel runs; () when nothing fits
    iterations: int  # k
    rows: float  # worst-case rows per sample: plain_rows + k · Σ pool rows at the points


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


def plan(sampling: SamplingConfig, refine: RefineConfig, budget: float,
         point_sets: Optional[Iterable[Sequence[int]]] = None, max_iterations: Optional[int] = None,
         use: float = 1.0) -> Plan:
    """The iterations k (and points) of a refinement whose worst case (every iteration draws a new
    pool) fits `budget` · plain_rows.

    point_sets: the candidate sets of global steps; None: the refine config's own schedule. For each
    set, k is the largest that fits (at most max_iterations). Among the sets whose k >= 1, keeps those
    within `use` of the most rows any of them spends, and of those takes the most points (spreading a
    budget is best for toxicity in the paper), then the later points, then the most rows. With one
    set (use = 1), this is just the largest k that fits.
    """
    if point_sets is None:
        point_sets = [refinement_points(sampling, refine.applies)]
    extra = (budget - 1) * plain_rows(sampling)
    options = []
    for points in point_sets:
        per_iteration = sum(point_pool_rows(sampling, refine, t) for t in points)
        if per_iteration <= 0:
            continue
        k = int((extra + EPS) // per_iteration)
        if max_iterations is not None:
            k = min(k, max_iterations)
        if k >= 1:
            options.append((k * per_iteration, len(points), sum(points) / len(points), k, tuple(points)))
    if not options:
        return Plan((), 0, plain_rows(sampling))
    best = max(o[0] for o in options)
    spent, _, _, k, points = max((o for o in options if o[0] >= use * best), key=lambda o: (o[1], o[2], o[0]))
    return Plan(points, k, plain_rows(sampling) + spent)
