"""The compute-cost model at run time: denoiser rows, and what IterRef's budget gates on. What the
benchmarks plan with (worst-case rows of a whole refinement, fitting k to a budget) is in
safegen/research/planner.py, on the same formulas.

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

from typing import Callable

import torch

from ..sampling.sampler import SamplingConfig, global_step


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
        from ..sampling.mdlm import expected_forwards

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


def remask_sizes(rho: float, decoded: torch.Tensor) -> torch.Tensor:
    """m = max(1, round(rho · n)) per entry of n (round half to even); 0 where n is 0."""
    m = torch.clamp(torch.round(rho * decoded.double()).long(), min=1)
    return torch.where(decoded > 0, m, torch.zeros_like(m))


def pool_rows(sampling: SamplingConfig, n_proposals: int, m: torch.Tensor,
              mask_left: torch.Tensor) -> torch.Tensor:
    """Rows of one pool, per row: N · (one forward per re-masked token, m, + one scoring forward
    where a mask is left after them) · rows_per_forward. float64. Proposals re-commit one hole per
    forward whatever the base sampler's tokens_per_step: only then are they draws from the model's
    joint conditional (RefineConfig.proposal_order)."""
    # With the block cache (sampling/fast.py), a pool first makes one full forward per row for its
    # drafts' keys and values; its proposals' forwards are then short ones (their holes), each still a row.
    prefill = 1.0 if sampling.cache else 0.0
    return n_proposals * (m + mask_left.long()).double() * rows_per_forward(sampling) + prefill


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
