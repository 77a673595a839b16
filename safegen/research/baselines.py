"""Test-time alignment baselines on the same sampler and accounting (docs/method.md, "7. Baselines, on the same sampler and accounting").

At budget b (a multiple of plain sampling's T denoiser rows per sample):
  Best-of-N   N = b independent samples, keep the highest final reward;
  SVDD-PM     M = b candidate next states per step, keep one weighted by exp(r(x̂0)/α);
  FK-steering K = b particles, resampled every f steps by the potential exp(λ·(r_t − r_prev));
  remask-only the IterRef kernel that accepts every proposal (RefineConfig(selection="remask_only")).
Each returns a SampleOutput whose rows/reward_calls are per prompt (summed over its samples or
particles), so all methods compare at equal denoiser rows.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..sampling import rng
from ..refine.iterref import Reward, reward_values
from ..sampling.sampler import ConfigError, DiffusionSampler, Prediction, SampleOutput, SamplerState, global_step, row_keys


def _expand(input_ids, attention_mask, seeds, n: int):
    """Each prompt n times, with n seeds per prompt derived from the prompt's own seed."""
    B = input_ids.shape[0]
    base = row_keys(seeds, B, torch.device("cpu"))
    sub = rng.derive(base.repeat_interleave(n), rng.Stream.SAMPLES, torch.arange(n).repeat(B))
    ids = input_ids.repeat_interleave(n, 0)
    attn = None if attention_mask is None else attention_mask.repeat_interleave(n, 0)
    return ids, attn, sub.tolist()


def _group_sum(v: torch.Tensor, n: int) -> torch.Tensor:
    return v.view(-1, n).sum(1)


def _keep_best(sampler, reward: Reward, out: SampleOutput, n: int, P: int, t0: float) -> SampleOutput:
    """Each prompt's sample with the highest final reward (with one sample, no reward call)."""
    if n == 1:
        r = torch.zeros(out.sequences.shape[0], dtype=torch.float64)
    else:
        r = reward_values(reward(out.sequences[:, P:]), out.sequences.shape[0])
        out.reward_calls += 1
    best = r.view(-1, n).argmax(1) + torch.arange(r.numel() // n) * n
    return SampleOutput(sequences=out.sequences[best.to(out.sequences.device)],
                        rows=_group_sum(out.rows, n), reward_calls=_group_sum(out.reward_calls, n),
                        proposed=_group_sum(out.proposed, n), accepted=_group_sum(out.accepted, n),
                        seconds=time.perf_counter() - t0,
                        flops=None if out.flops is None else _group_sum(out.flops, n))


def best_of_n(sampler: DiffusionSampler, input_ids, reward: Reward, n: int,
              attention_mask=None, seeds=0) -> SampleOutput:
    t0 = time.perf_counter()
    ids, attn, sub = _expand(input_ids, attention_mask, seeds, n)
    out = sampler.run(ids, attn, sub)
    return _keep_best(sampler, reward, out, n, input_ids.shape[1], t0)


class SVDDSampler(DiffusionSampler):
    """SVDD-PM (Li et al. 2024): at every step, M candidate next states from M independent draws of
    the step's noise; one is kept with probability ∝ exp(r(x̂0)/α) (α = 0: the best). The forward
    that scores a candidate is the next step's forward, so a step costs M rows."""

    def __init__(self, model, profile, config, reward: Reward, n_candidates: int, alpha: float = 0.0):
        super().__init__(model, profile, config)
        if n_candidates < 1:
            raise ConfigError(f"n_candidates must be >= 1, got {n_candidates}")
        self.reward, self.M, self.alpha = reward, n_candidates, alpha

    def advance(self, state: SamplerState, n_commit: torch.Tensor) -> None:
        if state.logits is None:  # a hook replaced the draft: its candidates need fresh logits
            state.pred = None
        self.refresh(state)
        B, G = state.gen.shape
        M, device, P = self.M, state.x.device, state.prompt_length
        S, t = self.config.steps_in_block(state.block), self.global_step(state)
        owner = torch.arange(B, device=device).repeat_interleave(M)
        j = torch.arange(M, device=device).repeat(B)
        # Candidate 0 uses the step's own noise, so M = 1 is exactly plain sampling.
        keys = torch.where(j == 0, self.step_keys(state)[owner],
                           rng.derive(state.keys[owner], rng.Stream.SVDD_CANDIDATE, t, j))
        gen = state.gen[owner]
        committable = self.committable(gen, state.block)
        pred = self.predict(state.logits[owner], gen, committable, keys, self.config.temperature)
        gen = self.commit(gen, pred, n_commit[owner])
        last = state.block == self.config.n_blocks - 1 and state.step == S - 1
        if last:  # fully decoded: x̂0 is the candidate, no forward
            nxt = Prediction(gen.clone(), torch.full(gen.shape, float("-inf"), device=device), gen.clone())
        else:
            logits = self.forward(state, torch.cat([state.x[owner, :P], gen], 1), owner)
            nxt = self.next_prediction(state, logits, gen, owner, block=state.block + (state.step + 1 == S), ahead=1)
        if M == 1:  # nothing to choose: plain sampling, no reward call
            r = torch.zeros((B, 1), dtype=torch.float64)
        else:
            r = reward_values(self.reward(nxt.xhat0), B * M).view(B, M)
            state.reward_calls += M
        if self.alpha > 0:
            u = rng.uniform(rng.derive(state.keys, rng.Stream.SVDD_SELECT, t),
                            torch.arange(M, device=device).expand(B, M)).double().cpu()
            choice = (r / self.alpha - torch.log(-torch.log(u))).argmax(1)  # Gumbel-max over candidates
        else:
            choice = r.argmax(1)
        chosen = (torch.arange(B) * M + choice).to(device)
        state.x = torch.cat([state.x[:, :P], gen[chosen]], 1)
        state.pred = None if last else nxt.select(chosen)
        # The next step draws its M candidates from these logits again (a copy of B rows only).
        state.logits = None if last else logits[chosen]


def svdd(sampler: DiffusionSampler, input_ids, reward: Reward, n_candidates: int,
         alpha: float = 0.0, attention_mask=None, seeds=0) -> SampleOutput:
    s = SVDDSampler(sampler.model, sampler.profile, sampler.config, reward, n_candidates, alpha)
    return s.run(input_ids, attention_mask, seeds)


class FKSteering:
    """Feynman-Kac steering (Singhal et al. 2025) as a step hook over K particles per prompt.

    Every `every` base steps (and when the generation is complete) particles are weighted by the
    potential exp(λ·(r_t − r_prev)), r of their x̂0, and resampled multinomially within their prompt.
    Resampled copies get fresh keys, or they would follow identical futures.
    """

    def __init__(self, reward: Reward, n_particles: int, every: int = 20, lam: float = 10.0):
        if n_particles < 1 or every < 1:
            raise ConfigError("n_particles and every must be >= 1")
        self.reward, self.K, self.every, self.lam = reward, n_particles, every, lam
        self.r_prev: Optional[torch.Tensor] = None
        self.resamplings = 0

    def applies(self, block: int, step: int, S: int, t: Optional[int] = None) -> bool:
        t = global_step(block, step, S) if t is None else t
        return step >= 1 and t % self.every == 0 and self.K > 1

    def __call__(self, sampler: DiffusionSampler, state: SamplerState) -> None:
        B = state.x.shape[0]
        r = reward_values(self.reward(state.pred.xhat0), B)
        state.reward_calls += 1
        if self.r_prev is None:
            self.r_prev = torch.zeros(B, dtype=torch.float64)
        logw = (self.lam * (r - self.r_prev)).view(-1, self.K)
        u = rng.uniform(rng.derive(state.keys.view(-1, self.K)[:, 0], rng.Stream.FK_RESAMPLE, self.resamplings),
                        torch.arange(self.K, device=state.keys.device).expand(B // self.K, self.K)).double().cpu()
        # Multinomial resampling by inverse CDF with one uniform per particle.
        w = torch.softmax(logw, 1)
        cdf = w.cumsum(1)
        cdf[:, -1] = 1.0
        pick = torch.searchsorted(cdf, u.contiguous()).clamp(max=self.K - 1)
        idx = (pick + torch.arange(B // self.K)[:, None] * self.K).reshape(-1)
        dev_idx = idx.to(state.x.device)
        state.x = state.x[dev_idx]
        state.pred = state.pred.select(dev_idx)
        state.logits = None if state.logits is None else state.logits[dev_idx]
        state.keys = rng.derive(state.keys[dev_idx], rng.Stream.FK_REKEY, self.resamplings, torch.arange(B, device=state.x.device))
        self.r_prev = r[idx]
        self.resamplings += 1


def fk_steering(sampler: DiffusionSampler, input_ids, reward: Reward, n_particles: int,
                every: int = 20, lam: float = 10.0, attention_mask=None, seeds=0) -> SampleOutput:
    t0 = time.perf_counter()
    ids, attn, sub = _expand(input_ids, attention_mask, seeds, n_particles)
    out = sampler.run(ids, attn, sub, hook=FKSteering(reward, n_particles, every, lam))
    return _keep_best(sampler, reward, out, n_particles, input_ids.shape[1], t0)
