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

Rows stop measuring cost once forwards differ in length (the block cache runs a block's 32 positions
where the uncached forward runs 320), so the budget is kept in FLOPs (safegen.models.flops) wherever
the model's FLOPs are counted (LLaDA): `Meter` expresses a row's FLOPs in units of one uncached
forward of that row, which is one row for the uncached sampler, so that uncached budgets cut exactly
where the rows did, and a cached forward counts for the share of one that it computes. For models
whose FLOPs are not counted (MDLM, the exact toys) the unit is the row, as before.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable, Optional

import torch

from ..models import flops
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
              mask_left: torch.Tensor, reverse=0) -> torch.Tensor:
    """Rows of one pool, per row: N · (one forward per re-masked token, m, + one scoring forward
    where a mask is left after them, + a Gibbs move's `reverse` path forwards) · rows_per_forward.
    float64. Proposals re-commit one hole per forward whatever the base sampler's tokens_per_step:
    only then are they draws from the model's joint conditional (RefineConfig.proposal_order)."""
    # With the block cache (sampling/fast.py), a pool first makes one full forward per row for its
    # drafts' keys and values; its proposals' forwards are then short ones (their holes), each still a row.
    prefill = 1.0 if sampling.cache else 0.0
    return n_proposals * (m + mask_left.long() + reverse).double() * rows_per_forward(sampling) + prefill


def allowance(sampling: SamplingConfig, budget: float, spent: torch.Tensor, t: int,
              points_left: int) -> torch.Tensor:
    """Rows each sample may spend at refinement point t under `budget`, counted in rows (the models
    whose FLOPs are not counted): Meter(sampling).allowance."""
    return Meter(sampling).allowance(budget, spent, t, points_left)


class Meter:
    """The budget's cost model for rows of known real lengths: costs in units of one uncached forward
    of the row (one row without CFG), from the FLOPs the sampler counts for each forward kind
    (safegen.sampling.fast: a block's prefill, a block step's queries, a pool's prefill and its
    proposals' queries). Without `dims` (FLOPs not counted) a forward costs its rows whatever its length.

    The budget is a multiple of plain sampling's cost with the same SamplingConfig: with the cache, of
    the cached plain sampler's FLOPs; with a threshold, of the schedule's forwards (an upper bound: the
    forwards the threshold saves are left to refinement)."""

    def __init__(self, sampling: SamplingConfig, dims: Optional[flops.Dims] = None,
                 lengths: Optional[torch.Tensor] = None):
        self.sampling = sampling
        self.counted = dims is not None and lengths is not None
        self.dims = dims
        self.n = None if lengths is None else lengths.double()
        if self.counted:
            self.unit = flops.forward_flops(dims, self.n, self.n * self.n, self.n)

    @classmethod
    def of(cls, sampler, state) -> "Meter":
        return cls(sampler.config, sampler.dims, flops.real_positions(state.x, state.attention_mask))

    def _queries(self, queries, heads=None) -> torch.Tensor:
        """A forward of `queries` positions against the row's real keys, the head on `heads` (default:
        the queries), in units."""
        q = queries * torch.ones_like(self.n)
        h = q if heads is None else heads * torch.ones_like(self.n)
        return flops.forward_flops(self.dims, q, q * self.n, h) / self.unit

    def spent(self, state) -> torch.Tensor:
        """What each row of `state` has spent so far, in units."""
        return state.flops / self.unit if self.counted else state.rows

    def _one(self, value: float) -> torch.Tensor:
        return torch.full_like(self.n, value) if self.n is not None else torch.tensor(value, dtype=torch.float64)

    def prefill(self) -> torch.Tensor:
        """A block's first cached forward: every position, the head on the generation region."""
        return self._queries(self.n, self.sampling.max_new_tokens)

    @cached_property
    def steps(self) -> torch.Tensor:
        """(T, rows) the cost of base step s's forward, s = 1..T, as the schedule runs them (MDLM: see
        plain)."""
        sampling = self.sampling
        if not (self.counted and sampling.cache):
            return torch.stack([self._one(rows_per_forward(sampling))] * sampling.steps)
        out, G, start = [], sampling.max_new_tokens, 0
        prefill = self.prefill()
        for b, length in enumerate(sampling.block_lengths):
            width = length if sampling.cache == "dual" else G - start
            out += [prefill] + [self._queries(width)] * (sampling.steps_in_block(b) - 1)
            start += length
        return torch.stack(out)

    def plain(self) -> torch.Tensor:
        """Plain sampling's cost per sample: the budget's unit."""
        if not self.counted:
            return self._one(plain_rows(self.sampling))
        return self.steps.sum(0)

    def keys_values(self) -> torch.Tensor:
        """A forward of the row's keys and values, no head (a pool's prefill with the cache)."""
        if not self.counted:
            return self._one(1.0)
        return self._queries(self.n, 0)

    def head(self) -> torch.Tensor:
        """The head on the generation region alone: what the current draft's own forward adds to its
        first pool's prefill with the cache (IterRef.begin); 0 where FLOPs are not counted."""
        if not self.counted:
            return self._one(0.0)
        return flops.forward_flops(self.dims, 0.0, 0.0, float(self.sampling.max_new_tokens)) / self.unit

    def pool(self, n_proposals: int, m: torch.Tensor, masks_left: torch.Tensor, reverse=0) -> torch.Tensor:
        """One pool of N proposals re-masking m tokens each, with `masks_left` masked positions in the
        draft (0 after the last step), and a Gibbs move's `reverse` path forwards (refine/moves.py).
        Uncached: pool_rows. Cached (fast.ProposalCache): one forward of the draft's keys and values
        (no head), then per proposal m forwards of its m holes and, where a mask is left, a scoring
        forward of the holes and the masks; a reverse path's forwards run its `reverse` holes."""
        if not (self.counted and self.sampling.cache):
            return pool_rows(self.sampling, n_proposals, m, masks_left > 0, reverse)
        m, masks_left = m.double(), masks_left.double()
        reverse = torch.as_tensor(reverse, dtype=torch.float64)
        keys_values = self.keys_values()
        proposal = (m * self._queries(m) + (masks_left > 0).double() * self._queries(m + masks_left)
                    + reverse * self._queries(reverse))
        return keys_values + n_proposals * proposal

    def refresh(self, t: int, scope: str) -> torch.Tensor:
        """What a move at point t may add to the base steps: with the cache, a draft changed outside the
        window of step t+2 (an earlier block: scope "all", or any point at a block's end) makes that
        step a prefill rather than a short forward (fast.cached_logits); step t+1's forward is made."""
        if not (self.counted and self.sampling.cache) or t + 2 > self.sampling.steps:
            return self._one(0.0)
        points = block_points(self.sampling)
        _, s, S_b, _ = points[t - 1]
        if scope != "all" and s != S_b:
            return self._one(0.0)
        return torch.clamp(self.prefill() - self.steps[t + 1], min=0.0)

    def allowance(self, budget: float, spent: torch.Tensor, t: int, points_left: int) -> torch.Tensor:
        """What each sample may spend at refinement point t under `budget` (a multiple of plain()),
        having spent `spent`: what is left after the base steps still to come, shared equally by this
        and the later refinement points (`points_left`, this one included), so that an early point
        cannot starve the later ones, the last of which scores the exact reward. What a point leaves
        unspent carries over."""
        sampling = self.sampling
        T = sampling.steps
        # The next base step's forward is already made and charged (refresh, or the scoring forward
        # of an accepted proposal) unless the answer is complete: steps t+2..T are still to come.
        if self.counted:
            base_left = self.steps[t + 1:].sum(0)
        else:
            count = T - t - (1 if t < T else 0)
            if sampling.sampler == "mdlm":  # a forward only after a step that unmasked one of the G positions
                count = min(count, sampling.max_new_tokens)
            base_left = count * rows_per_forward(sampling)
        left = budget * self.plain() - spent - base_left
        return left / max(points_left, 1)
