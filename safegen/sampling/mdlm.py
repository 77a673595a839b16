"""MDLM's ancestral sampler (Sahoo et al., NeurIPS 2024: "ddpm_cache" with the log-linear schedule).

The answer's G positions start masked after the prompt, which stays fixed. Time runs from t = 1 down to
eps over T steps of dt = (1 - eps) / T; under the log-linear schedule a position is still masked at time t
with probability t (alpha_t = 1 - t). At the step from t to s = t - dt, each masked position is unmasked
independently with probability

    (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t,

taking a token drawn from the model's distribution with the mask excluded (MDLM's "subs"
parameterization); decoded positions are carried over. A position's unmasking step is therefore uniform
over the T steps (each with probability dt; it stays masked to the end with probability eps), and the
order is random, independent of the tokens: IterRef's proposals stay exact on top of it.

A step that unmasks nothing leaves the logits valid, and the next step reuses them instead of running
the model again (per row: the rows that changed are re-run alone). After the last step, positions still
masked (probability eps each) take the argmax of one more forward ("noise removal").

Everything else (hooks, IterRef, the plain fork, accounting) is safegen.sampling.sampler's, with one block that
spans the answer, so that IterRef's points are the steps 1..T.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import rng
from ..models.family import ModelProfile
from .sampler import DiffusionSampler, SamplingConfig, SamplerState

__all__ = ["DEFAULT_SAMPLING", "MDLMSampler", "expected_forwards", "SCHEDULE_EPS", "move_chances", "unmask_probability"]

SCHEDULE_EPS = 1e-5  # the reference sampler's final time (its _sample's eps)

# What SafeGenerator uses for an MDLM unless told otherwise: this sampler, drawing tokens at temperature 1.
DEFAULT_SAMPLING = dict(sampler="mdlm", temperature=1.0)


def move_chances(step: int, steps: int, eps: float = SCHEDULE_EPS) -> tuple[float, float]:
    """(t, s): the masking probability before and after step `step` (0..steps-1) of the log-linear schedule."""
    dt = (1 - eps) / steps
    t = 1 - step * dt
    return t, t - dt


def unmask_probability(step: int, steps: int, eps: float = SCHEDULE_EPS) -> float:
    """The chance that a position still masked before step `step` is unmasked by it: (t - s) / t."""
    t, s = move_chances(step, steps, eps)
    return (t - s) / t


class MDLMSampler(DiffusionSampler):
    """MDLM's ancestral sampler around any mask predictor (same interface as DiffusionSampler)."""

    def __init__(self, model: torch.nn.Module, profile: ModelProfile | int, config: SamplingConfig | None = None):
        config = replace(config or SamplingConfig(temperature=1.0), sampler="mdlm")
        # block_length is the answer's length: the base class's block machinery then runs one block.
        super().__init__(model, profile, replace(config, block_length=config.max_new_tokens))

    def refresh(self, state: SamplerState) -> None:
        """Make state.pred current (what a hook reads), running the model only where needed."""
        if state.pred is not None:
            return
        gen = state.gen
        if not bool((gen == self.mask_id).any()):
            super().refresh(state)
            return
        self._update_logits(state)
        state.pred = self.predict(state.logits, gen, self.committable(gen, self.next_block(state)),
                                  self.step_keys(state), self.config.temperature)

    def _update_logits(self, state: SamplerState) -> None:
        """Run the model on the rows whose draft changed since their logits were computed and that still
        have a mask; the other rows keep theirs."""
        masked = (state.gen == self.mask_id).any(1)
        fresh = state.fresh if state.logits is not None and state.fresh is not None else torch.zeros_like(masked)
        stale = (masked & ~fresh).nonzero().squeeze(1)
        if len(stale):
            logits = self.forward(state, state.x[stale], stale)
            if state.logits is None:
                state.logits = logits.new_zeros((state.x.shape[0],) + logits.shape[1:])
            # Out of place: a copied state may share the old tensor.
            state.logits = state.logits.index_copy(0, stale, logits)
        state.fresh = torch.ones_like(masked)  # rows without a mask never need logits

    def advance(self, state: SamplerState, n_commit: torch.Tensor | None = None) -> None:
        """One step of the schedule: every masked position is unmasked with probability (t - s) / t, to a
        token drawn from its logits. `n_commit` (LLaDA's fixed counts) is ignored. The coins come first:
        tokens are drawn only for the positions they unmask, and nothing runs when none does."""
        gen = state.gen
        step, steps = self.global_step(state), self.config.steps
        positions = torch.arange(gen.shape[1], device=gen.device).expand_as(gen)
        u = rng.uniform(rng.derive(self.step_keys(state), rng.Sub.UNMASK), positions)
        reveal = (gen == self.mask_id) & (u < unmask_probability(step, steps))
        if bool(reveal.any()):
            if state.logits is None and state.pred is not None:
                # A hook's draft (an accepted IterRef proposal) comes with candidates drawn with these
                # keys from its own scoring forward, and without logits.
                candidates = state.pred.candidates
            else:
                self._update_logits(state)
                # Keyed by position: the same token as a prediction over all masked positions would draw.
                candidates = self.predict(state.logits, gen, reveal, self.step_keys(state),
                                          self.config.temperature).candidates
            state.x[:, state.prompt_length:] = torch.where(reveal, candidates, gen)
            if state.fresh is not None:
                state.fresh = state.fresh & ~reveal.any(1)
        state.pred = None
        if step == steps - 1 and bool((state.gen == self.mask_id).any()):
            # Noise removal: what is still masked takes the argmax (x̂0) of one more forward.
            self.refresh(state)
            state.x[:, state.prompt_length:] = state.pred.xhat0
            state.pred = state.logits = state.fresh = None


def expected_forwards(answer_length: int, steps: int, eps: float = SCHEDULE_EPS) -> float:
    """Expected forwards per sample of plain MDLM sampling (no hook): the first step's, one at each later
    step that follows a step that unmasked something while a mask is left, and the noise removal's when
    a mask outlives the last step. Positions unmask independently, each at step i with probability dt
    and never with probability eps, so with G positions:
      P(step i-1 unmasks nothing) = (1 - dt)^G, P(nothing masked before step i) = (i dt)^G,
      P(both) = ((i - 1) dt)^G."""
    G, dt = answer_length, (1 - eps) / steps
    total = 1.0
    for i in range(1, steps):
        total += 1 - (1 - dt) ** G - (i * dt) ** G + ((i - 1) * dt) ** G
    return total + 1 - (1 - eps) ** G
