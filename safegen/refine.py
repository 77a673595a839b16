"""IterRef: reward-guided iterative refinement inside the diffusion sampler.

Reference: Lee et al., "Effective Test-Time Scaling of Discrete Diffusion through Iterative
Refinement", arXiv 2511.05562.

Target: p*(x_t) ∝ p(x_t) · exp(r(x̂0(x_t)) / α). At a refined step the kernel
  1. draws a pool of N proposals from the current draft x_t: re-mask m = max(1, round(rho · n)) of its
     n decoded generated tokens in scope (never the prompt), uniformly at random or (remask
     "targeted") towards the tokens a blame function holds responsible (safegen.remask), then
     denoise them again with the base model, at the proposal temperature, in an order that depends
     on the logits only, until as many tokens are decoded as before;
  2. takes the pool's candidates in turn and accepts one with probability
     min(1, exp((r' − r)/α) · q(S | x') / q(S | x)) (Multiple-Try Metropolis with the paper's
     balancing function: uniform selection weights, no backward draws; the ratio of re-masking
     probabilities is 1 for uniform re-masking);
  3. after a rejection takes the next candidate of the same pool (its members are i.i.d. draws from
     the same x_t, so the chain stays valid); draws a new pool only after an acceptance or when empty.
This repeats `iterations` (k) times, then the base sampler takes its ordinary next step. The point
after the last step re-masks the whole answer, whatever the scope: a block refined and then frozen
cannot reach p*, the chain over the whole answer can.

All rows and all N proposals of a pool are denoised together, as one batch of A·N rows per sub-step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

from . import remask, rng
from .sampler import ConfigError, DiffusionSampler, Prediction, SamplerState, updated_config

Reward = Callable[[torch.Tensor], torch.Tensor]  # (n, G) token ids of the generation -> (n,) float


class BlameResult(NamedTuple):
    """What a blame callable returns when its attribution cost reward-model calls (occlusion, say);
    a plain (n, G) tensor means it cost none."""

    blame: torch.Tensor  # (n, G) in [0, 1]: how much each position is to blame for a low reward
    reward_calls: Union[float, torch.Tensor]  # texts the reward model scored for it, per row: a number or (n,)


# (n, G) token ids of the generation -> (n, G) blame in [0, 1], or a BlameResult. IterRef calls it on
# exactly the x̂0 batches it scores: the current draft at each refined point, and every proposal.
Blame = Callable[[torch.Tensor], Union[torch.Tensor, BlameResult]]

SCHEDULES = ("late", "evenly", "final", "steps")
SCOPES = ("block", "all")
SELECTIONS = ("mh", "greedy", "remask_only")
REMASKS = ("uniform", "targeted")

# The order in which a proposal re-commits its holes. A proposal is a draw from the model's
# p(x_S | x_rest) only if that order does not depend on the tokens it samples. LLaDA's
# low_confidence score (the sampled token's probability) does, and biases the chain (RESULTS.md,
# exactness). The most likely token's probability is a statistic of the logits alone, and is LLaDA's
# own order at temperature 0 (most confident first, which an inexact model needs more than a toy);
# random order is exact as well.
PROPOSAL_ORDER = "max_prob"


@dataclass
class RefineConfig:
    # Defaults from benchmarks/toy_exact.py (RESULTS.md): at equal rows N = 1 beat every larger pool
    # (an accepted pool's unexamined members are rows spent for nothing), rho 0.5 had the lowest
    # toxic rate on average, and "final" (exact reward) was best or within 0.011 of the best schedule
    # with targeted re-masking; refining each finished block, not only the last, paid on two blocks.
    n_proposals: int = 1  # N, proposals per pool
    iterations: int = 4  # k, kernel applications per refined step
    rho: float = 0.5  # share of the decoded tokens in scope that a proposal re-masks (at least 1)
    alpha: float = 0.1  # α, the temperature of the target p · exp(r/α)
    schedule: str = "final"  # where to refine (§4): late | evenly | final | steps
    start: float = 0.75  # late: refine once this share of the block is decoded
    every: int = 1  # evenly: refine after every m-th step
    at_steps: tuple = ()  # schedule "steps": base steps (1..T) after which to refine
    # Re-mask the current block only, or "all" generated tokens so far. The point after the last
    # step always spans the whole answer, so that the last chain targets p* over all of it.
    scope: str = "block"
    # uniform (the paper's) | targeted: re-mask positions in proportion to ε + (1 − ε)·blame, which
    # needs IterRef's `blame`. Uniform stays the default here because a blame is optional.
    remask: str = "uniform"
    blame_floor: float = 0.05  # ε: no decoded position is ever impossible to re-mask
    selection: str = "mh"  # mh | greedy | remask_only (ablations, §3)
    proposal_temperature: float = 1.0  # proposals must be stochastic even when sampling is greedy
    # Skip / stop rows whose reward already reaches accept_reward. Knowing that costs one reward
    # call per row at every refined point, also for the rows it then skips.
    adaptive: bool = False
    accept_reward: Optional[float] = None  # adaptive mode's bar, e.g. the policy's reward threshold
    budget: Optional[float] = None  # cap on denoiser rows per sample, as a multiple of T

    def validate(self) -> "RefineConfig":
        def positive_int(name, minimum):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"refine.{name} must be an integer >= {minimum}, got {v!r}")

        positive_int("n_proposals", 1)
        positive_int("iterations", 0)
        positive_int("every", 1)
        if not (isinstance(self.rho, (int, float)) and 0 < self.rho <= 1):
            raise ConfigError(f"refine.rho must be in (0, 1], got {self.rho!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(f"refine.alpha must be > 0, got {self.alpha!r}")
        if not (isinstance(self.start, (int, float)) and 0 <= self.start <= 1):
            raise ConfigError(f"refine.start must be in [0, 1], got {self.start!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"refine.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "steps":
            if not self.at_steps or not all(isinstance(s, int) and s >= 1 for s in self.at_steps):
                raise ConfigError(f"refine.at_steps must be a non-empty list of steps >= 1 for "
                                  f"schedule 'steps', got {self.at_steps!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"refine.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"refine.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.remask not in REMASKS:
            raise ConfigError(f"refine.remask must be one of {REMASKS}, got {self.remask!r}")
        if not (isinstance(self.blame_floor, (int, float)) and 0 < self.blame_floor <= 1):
            raise ConfigError(f"refine.blame_floor must be in (0, 1], got {self.blame_floor!r}")
        if not (isinstance(self.proposal_temperature, (int, float)) and self.proposal_temperature >= 0):
            raise ConfigError(f"refine.proposal_temperature must be >= 0, got {self.proposal_temperature!r}")
        if self.adaptive and self.accept_reward is None:
            raise ConfigError("refine.accept_reward is required when refine.adaptive is on "
                              "(the reward at which a row counts as acceptable)")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and self.budget >= 1):
            raise ConfigError(f"refine.budget must be >= 1 (a multiple of plain sampling), got {self.budget!r}")
        return self

    def updated(self, **overrides) -> "RefineConfig":
        if "at_steps" in overrides:
            overrides["at_steps"] = tuple(overrides["at_steps"])
        return updated_config(self, "refine", overrides)

    def applies(self, block: int, step: int, steps_per_block: int) -> bool:
        """Is the kernel applied after `step` commits of `block`? Points are steps 1..S of a block:
        step 0 of a block is the same draft as the previous block's finished point."""
        if step < 1:
            return False
        t = block * steps_per_block + step  # base steps done so far
        if self.schedule == "late":
            return step / steps_per_block >= self.start
        if self.schedule == "evenly":
            return t % self.every == 0
        if self.schedule == "final":
            return step == steps_per_block
        return t in self.at_steps


@dataclass
class _Pool:
    """Proposals waiting to be examined, per row: (B, N, ...) slots, `next` the index to examine."""

    gen: torch.Tensor
    pred: Prediction  # fields of shape (B, N, G)
    reward: torch.Tensor  # (B, N)
    log_q_ratio: torch.Tensor  # (B, N) log q(S | x') − log q(S | x); 0 for uniform re-masking
    weights: Optional[torch.Tensor]  # (B, N, G) the proposals' re-mask weights (targeted only)
    next: torch.Tensor  # (B,) long; N means empty


class IterRef:
    """The IterRef step hook. `IterRef(config, reward, blame=None)`, then `sampler.run(..., hook=iterref)`.
    `blame` is needed by, and only used with, `RefineConfig(remask="targeted")`."""

    def __init__(self, config: RefineConfig, reward: Reward, blame: Optional[Blame] = None):
        self.config = config.validate()
        if self.config.remask == "targeted" and blame is None:
            raise ConfigError("refine.remask='targeted' needs a blame callable: IterRef(config, reward, blame=...)")
        self.reward = reward
        self.blame = blame

    def applies(self, block: int, step: int, steps_per_block: int) -> bool:
        return self.config.iterations > 0 and self.config.applies(block, step, steps_per_block)

    # ---------------------------------------------------------------- pieces of the kernel
    def score(self, state: SamplerState, xhat0: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """r(x̂0) for each row of xhat0, charged to the state rows `owner`."""
        r = torch.as_tensor(self.reward(xhat0), dtype=torch.float64).reshape(-1).cpu()
        if r.shape[0] != xhat0.shape[0]:
            raise ValueError(f"the reward returned {r.shape[0]} values for {xhat0.shape[0]} sequences")
        state.reward_calls.index_add_(0, owner.cpu(), torch.ones(len(owner), dtype=torch.float64))
        return r

    def remask_weights(self, state: SamplerState, xhat0: torch.Tensor, owner: torch.Tensor,
                       eligible: torch.Tensor) -> torch.Tensor:
        """(n, G) float64 re-mask weights ε + (1 − ε)·blame(x̂0) on the eligible positions, 0 elsewhere;
        whatever reward calls the blame reports are charged to the state rows `owner`."""
        out = self.blame(xhat0)
        cost = 0.0
        if isinstance(out, BlameResult):
            out, cost = out.blame, out.reward_calls
        blame = torch.as_tensor(out).to(device=xhat0.device, dtype=torch.float64)
        if blame.shape != xhat0.shape:
            raise ValueError(f"the blame returned shape {tuple(blame.shape)} for token ids of shape "
                             f"{tuple(xhat0.shape)}: it must be one value per generated token")
        if not bool(((blame >= -1e-6) & (blame <= 1 + 1e-6)).all()):  # float32 rounding is let through
            raise ValueError("the blame returned values outside [0, 1] (or NaN)")
        cost = torch.as_tensor(cost, dtype=torch.float64).cpu().expand(len(owner))
        state.reward_calls.index_add_(0, owner.cpu(), cost.contiguous())
        return remask.weights(blame, eligible, self.config.blame_floor)

    def scope(self, sampler: DiffusionSampler, state: SamplerState) -> torch.Tensor:
        """(G,) positions that may be re-masked: the current block, or everything up to its end; the
        whole answer at the point after the last step."""
        G = state.gen.shape[1]
        in_scope = torch.zeros(G, dtype=torch.bool, device=state.x.device)
        sl = sampler.block_slice(state.block)
        complete = state.block == sampler.config.n_blocks - 1 and state.step == sampler.config.steps_per_block
        in_scope[(0 if self.config.scope == "all" or complete else sl.start):sl.stop] = True
        return in_scope

    def remask_sizes(self, decoded: torch.Tensor) -> torch.Tensor:
        """m = max(1, round(rho · decoded)) per row (0 where nothing is decoded)."""
        n = decoded.sum(1)
        m = torch.clamp(torch.round(self.config.rho * n.double()).long(), min=1)
        return torch.where(n > 0, m, torch.zeros_like(m))

    def allowance(self, sampler: DiffusionSampler, state: SamplerState) -> torch.Tensor:
        """Rows each sample may spend at this refinement point under the budget: what the budget
        leaves after the base steps still to come, shared equally among this and the remaining
        refinement points (what a point leaves unspent carries over), so that an early point
        cannot starve the later ones, the last of which scores the exact reward."""
        S, T = sampler.config.steps_per_block, sampler.config.steps
        per_row = 2.0 if sampler.config.cfg_scale > 0 else 1.0
        t = state.block * S + state.step
        # The next base step's forward is already made and charged (refresh, or the scoring forward
        # of an accepted proposal) unless the answer is complete.
        base_left = T - t - (1 if t < T else 0)
        left = self.config.budget * T * per_row - state.rows - base_left * per_row
        points_left = sum(self.applies(b, s, S) for b in range(state.block, sampler.config.n_blocks)
                          for s in range(1, S + 1) if (b, s) >= (state.block, state.step))
        return left / max(points_left, 1)

    def pool_cost(self, sampler: DiffusionSampler, state: SamplerState, m: torch.Tensor) -> torch.Tensor:
        """Denoiser rows of one pool, per row: N · (re-denoising sub-steps + one scoring forward,
        unless the proposal has no mask left, when x̂0 is the proposal itself)."""
        rate = sampler.config.tokens_per_step
        substeps = (m + rate - 1) // rate
        other_masks = (state.gen == sampler.mask_id).any(1).long().cpu()
        per_row = 2.0 if sampler.config.cfg_scale > 0 else 1.0
        return self.config.n_proposals * (substeps.cpu() + other_masks).double() * per_row

    def propose(self, sampler: DiffusionSampler, state: SamplerState, rows: torch.Tensor,
                draws: torch.Tensor, eligible: torch.Tensor, weights: Optional[torch.Tensor]):
        """A pool of N proposals for each of `rows`: (A·N, G) drafts, their predictions, rewards,
        log q(S | x') − log q(S | x), and (targeted) their own re-mask weights."""
        cfg, N = self.config, self.config.n_proposals
        mask_id, P = sampler.mask_id, state.prompt_length
        parent = rows.repeat_interleave(N)
        j = torch.arange(N, device=rows.device).repeat(len(rows))
        t = state.block * sampler.config.steps_per_block + state.step
        keys = rng.derive(state.keys[parent], 1, t, draws[parent], j)
        gen = state.gen[parent].clone()
        G = gen.shape[1]

        # Noising: m of the eligible (decoded, in scope) tokens, uniformly or by blame.
        eligible = eligible[parent]
        m = self.remask_sizes(eligible)
        u = rng.uniform(rng.derive(keys, 0), torch.arange(G, device=gen.device).expand_as(gen))
        if weights is None:
            holes = remask.uniform(eligible, m, u)
        else:
            holes, log_q_forward = remask.weighted(weights[parent], m, u)
        chosen = holes.clone()
        gen[holes] = mask_id

        # Denoising: commit `rate` holes per sub-step at the proposal temperature, in PROPOSAL_ORDER;
        # once a proposal has no hole left, one more forward gives its x̂0 (the reward's input) and
        # its prediction for the next base step, which an accepted proposal reuses instead of a new
        # forward.
        rate = sampler.config.tokens_per_step
        n = gen.shape[0]
        preds = Prediction(torch.empty_like(gen), torch.full(gen.shape, float("-inf"), device=gen.device),
                           torch.empty_like(gen))
        todo = torch.ones(n, dtype=torch.bool, device=gen.device)
        next_block = sampler.next_block(state)
        sub = 0
        while bool(todo.any()):
            no_mask = todo & ~(gen == mask_id).any(1)
            todo &= ~no_mask  # fully decoded: x̂0 is the draft itself (preds already hold it)
            idx = todo.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_full = torch.cat([state.x[parent[idx], :P], gen[idx]], dim=1)
            logits = sampler.forward(state, x_full, parent[idx])
            has_holes = holes[idx].any(1)
            d, f = idx[has_holes], idx[~has_holes]
            if len(d):
                p = sampler.predict(logits[has_holes], gen[d], holes[d], rng.derive(keys[d], 2, sub),
                                    cfg.proposal_temperature, ranking=PROPOSAL_ORDER)
                n_commit = torch.clamp(holes[d].sum(1), max=rate)
                gen[d] = sampler.commit(gen[d], p, n_commit)
                holes[d] &= gen[d] == mask_id
            if len(f):
                p = sampler.predict(logits[~has_holes], gen[f], sampler.committable(gen[f], next_block),
                                    sampler.step_keys(state, state.keys[parent[f]]), sampler.config.temperature)
                preds.candidates[f], preds.confidence[f], preds.xhat0[f] = p.candidates, p.confidence, p.xhat0
                todo[f] = False
            sub += 1
        clean = ~(gen == mask_id).any(1)  # no mask left: x̂0 is the proposal itself
        preds.candidates[clean] = gen[clean]
        preds.xhat0[clean] = gen[clean]
        reward = self.score(state, preds.xhat0, parent)
        if weights is None:
            return gen, preds, reward, torch.zeros(n, dtype=torch.float64), None
        # The reverse move re-masks the same S from x': its probability under x''s own blame, read
        # from the x̂0 just scored (no extra forward).
        own = self.remask_weights(state, preds.xhat0, parent, eligible)
        log_q_reverse = remask.log_prob(own, chosen, m)
        return gen, preds, reward, (log_q_reverse - log_q_forward).cpu(), own

    def log_acceptance(self, proposed: torch.Tensor, current: torch.Tensor,
                       log_q_ratio: torch.Tensor) -> torch.Tensor:
        """log of the Metropolis acceptance min(1, exp((r' − r)/α) · q(S | x') / q(S | x)), min
        omitted (compared to log u < 0). Higher reward is favoured; the exactness test checks it."""
        return (proposed - current) / self.config.alpha + log_q_ratio

    @staticmethod
    def take(state: SamplerState, pool: _Pool, rows: torch.Tensor, pick: torch.Tensor) -> None:
        """Accepted: rows `rows` move to their pool's candidate `pick`, prediction included.
        New tensors, never in-place writes: a plain-sampling fork may share the old ones."""
        P = state.prompt_length
        x = state.x.clone()
        x[rows, P:] = pool.gen[rows, pick]
        state.x = x
        fields_new = []
        for f in ("candidates", "confidence", "xhat0"):
            v = getattr(state.pred, f).clone()
            v[rows] = getattr(pool.pred, f)[rows, pick]
            fields_new.append(v)
        state.pred = Prediction(*fields_new)
        state.logits = None  # they were the old draft's; the pool does not keep its logits

    # ---------------------------------------------------------------- the kernel
    def __call__(self, sampler: DiffusionSampler, state: SamplerState) -> None:
        cfg, N = self.config, self.config.n_proposals
        B, G = state.gen.shape
        device = state.x.device
        eligible = (state.gen != sampler.mask_id) & self.scope(sampler, state)
        active = (eligible.sum(1) > 0).cpu()
        budget_left = None
        if cfg.budget is not None:
            # A pool costs the same all through this point: re-masking keeps the decoded count.
            cost = self.pool_cost(sampler, state, self.remask_sizes(eligible))
            budget_left = self.allowance(sampler, state)
            active &= cost <= budget_left + 1e-9
        # r(x_t) of the rows that may refine; the others cost no reward call.
        current = torch.full((B,), float("nan"), dtype=torch.float64)
        rows = active.nonzero().squeeze(1)
        if len(rows):
            current[rows] = self.score(state, state.pred.xhat0[rows.to(device)], rows)
        if cfg.adaptive:
            active &= current < cfg.accept_reward
        weights = None  # the current drafts' re-mask weights (targeted re-masking)
        if cfg.remask == "targeted":
            weights = torch.zeros((B, G), dtype=torch.float64, device=device)
            rows = active.nonzero().squeeze(1).to(device)
            if len(rows):
                weights[rows] = self.remask_weights(state, state.pred.xhat0[rows], rows, eligible[rows])
        pool = _Pool(gen=torch.empty((B, N, G), dtype=torch.long, device=device),
                     pred=Prediction(*(torch.empty((B, N, G), dtype=dt, device=device)
                                       for dt in (torch.long, torch.float32, torch.long))),
                     reward=torch.empty((B, N), dtype=torch.float64),
                     log_q_ratio=torch.zeros((B, N), dtype=torch.float64),
                     weights=None if weights is None else torch.empty((B, N, G), dtype=torch.float64, device=device),
                     next=torch.full((B,), N, dtype=torch.long))
        draws = torch.zeros(B, dtype=torch.long, device=device)
        t = state.block * sampler.config.steps_per_block + state.step
        for it in range(cfg.iterations):
            need = active & (pool.next >= N)
            if budget_left is not None and bool(need.any()):
                affordable = cost <= budget_left + 1e-9
                active &= ~need | affordable
                need &= affordable
            if not bool(active.any()):
                break
            rows = need.nonzero().squeeze(1)
            if len(rows):
                spent = state.rows.clone()
                dev_rows = rows.to(device)
                gen, pred, reward, log_q_ratio, own = self.propose(sampler, state, dev_rows, draws, eligible, weights)
                if budget_left is not None:
                    budget_left -= state.rows - spent
                shape = (len(rows), N, G)
                pool.gen[dev_rows] = gen.view(shape)
                pool.pred.candidates[dev_rows] = pred.candidates.view(shape)
                pool.pred.confidence[dev_rows] = pred.confidence.view(shape)
                pool.pred.xhat0[dev_rows] = pred.xhat0.view(shape)
                pool.reward[rows] = reward.view(len(rows), N)
                # The ratio's q(S | x) is the current draft's: valid while the pool lives, because a
                # pool is dropped as soon as the draft changes (an acceptance).
                pool.log_q_ratio[rows] = log_q_ratio.view(len(rows), N)
                if own is not None:
                    pool.weights[dev_rows] = own.view(shape)
                pool.next[rows] = 0
                draws[dev_rows] += 1

            rows = active.nonzero().squeeze(1)
            if cfg.selection == "greedy":  # the best of the pool, if it beats the current draft
                pick = pool.reward[rows].argmax(1)
                cand_r = pool.reward[rows, pick]
                accept = cand_r > current[rows]
                pool.next[rows] = N
            else:  # candidates in drawn order: i.i.d., so this is a uniform selection
                pick = pool.next[rows]
                cand_r = pool.reward[rows, pick]
                if cfg.selection == "remask_only":
                    accept = torch.ones(len(rows), dtype=torch.bool)
                else:
                    u = rng.uniform(rng.derive(state.keys[rows.to(device)], 3, t, it),
                                    torch.zeros((len(rows), 1), dtype=torch.long, device=device))
                    accept = torch.log(u.squeeze(1).double().cpu()) < self.log_acceptance(
                        cand_r, current[rows], pool.log_q_ratio[rows, pick])
                pool.next[rows] = torch.where(accept, torch.full_like(pick, N), pick + 1)
            state.proposed[rows] += 1
            state.accepted[rows] += accept.double()
            won = rows[accept]
            if len(won):
                dev_won, dev_pick = won.to(device), pick[accept].to(device)
                self.take(state, pool, dev_won, dev_pick)
                current[won] = cand_r[accept]
                if weights is not None:
                    weights[dev_won] = pool.weights[dev_won, dev_pick]
            if cfg.adaptive:
                active &= current < cfg.accept_reward
