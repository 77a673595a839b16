"""IterRef: reward-guided iterative refinement inside the diffusion sampler.

Reference: Lee et al., "Effective Test-Time Scaling of Discrete Diffusion through Iterative
Refinement", arXiv 2511.05562.

Target: p*(x_t) ∝ p(x_t) · exp(r(x̂0(x_t)) / α). At a refined step the kernel
  1. draws a pool of N proposals from the current draft x_t: re-mask m = max(1, round(rho · n)) of its
     n decoded generated tokens in scope (never the prompt), uniformly at random or (proposal_holes
     "targeted") towards the tokens a blame function holds responsible (safegen.refine.remask), then
     denoise them again with the base model, one per forward at the proposal temperature, in an
     order that depends on the logits only (RefineConfig.proposal_order): a draw from p(x_S | x_rest);
  2. takes the pool's candidates in turn and accepts one with probability
     min(1, exp((r' − r)/α) · q(S | x') / q(S | x)): the Metropolis-Hastings rule for p* with that
     proposal (p's factors cancel; the ratio of re-masking probabilities is 1 for uniform
     re-masking);
  3. after a rejection takes the next candidate of the same pool (its members are i.i.d. draws from
     the same x_t, which a rejection keeps, so each is a fresh proposal: a sequence of
     Metropolis-Hastings steps with proposals drawn in advance, not Multiple-Try Metropolis); draws a
     new pool only after an acceptance or when empty.
This repeats `iterations` (k) times, then the base sampler takes its ordinary next step. The point
after the last step re-masks the whole answer, whatever the scope: a block refined and then frozen
cannot reach p*, the chain over the whole answer can. When that chain is exact is listed in
docs/method.md, "5. Exactness: when it holds" (adaptive off, selection mh, proposal temperature 1, no budget cut, cfg_scale 0,
logits_eos_inf off, many iterations).

All rows and all N proposals of a pool are denoised together, as one batch of A·N rows per sub-step
(A: the rows still refined at this point, N: proposals per pool).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

from . import cost, moves, remask
from ..sampling import fast, rng
from .remask import Blame, BlameResult
from .config import RefineConfig
from ..sampling.sampler import ConfigError, DiffusionSampler, Prediction, SamplerState


class Judged(NamedTuple):
    """What a reward that can judge returns: the (n,) reward and the (n,) bool verdict "still to be
    refined" (a policy's "toxic"), on which adaptive refinement gates instead of `accept_reward`."""

    reward: torch.Tensor
    toxic: torch.Tensor


# (n, G) token ids of the generation -> (n,) float, or a Judged
Reward = Callable[[torch.Tensor], Union[torch.Tensor, Judged]]


def reward_values(out, n: int) -> torch.Tensor:
    """What a Reward returned for n sequences, as (n,) float64 on the CPU (a Judged's `reward`);
    any other count is an error that names both."""
    r = torch.as_tensor(out.reward if isinstance(out, Judged) else out, dtype=torch.float64).reshape(-1).cpu()
    if r.shape[0] != n:
        raise ValueError(f"the reward returned {r.shape[0]} values for {n} sequences")
    return r

__all__ = ["Blame", "BlameResult", "IterRef", "Judged", "RefineConfig", "Reward"]

# How a proposal re-commits its holes. It is a draw from the model's joint conditional p(x_S | x_rest)
# (by the chain rule) only if (a) each forward commits one hole, sampled from its conditional given
# everything decoded so far: two holes drawn in one forward come from their separate marginals, a
# product that is not the joint (on the exact toy at two tokens per step: TV 0.20 from p*, floor
# 0.04); and (b) which hole comes next does not depend on the tokens sampled. LLaDA's low_confidence
# score (the sampled token's probability) breaks (b) and biases the chain (RESULTS.md, exactness). The
# most likely token's probability is a statistic of the logits alone, and is LLaDA's own order at
# temperature 0 (most confident first, which an inexact model needs more than a toy); random order
# is exact as well. For the same reason confidence_eos_eot_inf demotes, in a proposal, a hole whose
# most likely token is a stop token, not one whose sampled token is (that broke (b) too: TV 0.205
# against a floor of 0.021): it keeps LLaDA's intent, stop tokens last, with an order read from the
# logits alone. So a proposal costs one forward per re-masked token whatever the base pace (cost.py).
# The order is RefineConfig.proposal_order (default max_prob).
PROPOSAL_STOP_DEMOTION = "most_likely"


@dataclass
class _Pool:
    """Proposals waiting to be examined, per row: (B, N, ...) slots, `next` the index to examine."""

    gen: torch.Tensor
    pred: Prediction  # fields of shape (B, N, G)
    reward: torch.Tensor  # (B, N)
    toxic: torch.Tensor  # (B, N) bool: the members' verdicts (the adaptive gate)
    log_q_ratio: torch.Tensor  # (B, N) log q(S | x') − log q(S | x); 0 for uniform re-masking
    weights: Optional[torch.Tensor]  # (B, N, G) the proposals' re-mask weights (targeted only)
    next: torch.Tensor  # (B,) long; N means empty

    @classmethod
    def empty(cls, B: int, N: int, G: int, device, targeted: bool) -> "_Pool":
        return cls(gen=torch.empty((B, N, G), dtype=torch.long, device=device),
                   pred=Prediction(*(torch.empty((B, N, G), dtype=dt, device=device)
                                     for dt in (torch.long, torch.float32, torch.long))),
                   reward=torch.empty((B, N), dtype=torch.float64),
                   toxic=torch.ones((B, N), dtype=torch.bool),
                   log_q_ratio=torch.zeros((B, N), dtype=torch.float64),
                   weights=torch.empty((B, N, G), dtype=torch.float64, device=device) if targeted else None,
                   next=torch.full((B,), N, dtype=torch.long))

    def store(self, idx: torch.Tensor, gen: torch.Tensor, pred: Prediction, reward: torch.Tensor,
              toxic: torch.Tensor, log_q_ratio: torch.Tensor, own: Optional[torch.Tensor]) -> None:
        """Fresh pools for the rows `idx` (CPU), from (len(idx)·N, ...) draws; examined from the first."""
        _, N, G = self.gen.shape
        dev, shape = idx.to(self.gen.device), (len(idx), N, G)
        self.gen[dev] = gen.view(shape)
        for f in ("candidates", "confidence", "xhat0"):
            getattr(self.pred, f)[dev] = getattr(pred, f).view(shape)
        self.reward[idx] = reward.view(len(idx), N)
        self.toxic[idx] = toxic.view(len(idx), N)
        # The ratio's q(S | x) is the current draft's: valid while the pool lives, because a pool is
        # dropped as soon as the draft changes (an acceptance).
        self.log_q_ratio[idx] = log_q_ratio.view(len(idx), N)
        if own is not None:
            self.weights[dev] = own.view(shape)
        self.next[idx] = 0

    def examined(self, idx: torch.Tensor, pick: torch.Tensor, accept: torch.Tensor, whole: bool) -> None:
        """Rows `idx` examined their member `pick` (or the `whole` pool at once): an acceptance or
        the last member empties the pool."""
        N = self.gen.shape[1]
        self.next[idx] = N if whole else torch.where(accept, torch.full_like(pick, N), pick + 1)


@dataclass
class _Chain:
    """The chain of each row at one refinement point."""

    t: int  # the point: base steps done
    eligible: torch.Tensor  # (B, G) decoded positions in scope: what a proposal may re-mask
    active: torch.Tensor  # (B,) CPU: rows still refining here
    current: torch.Tensor  # (B,) r(x̂0) of the current draft (NaN for rows never active)
    toxic: torch.Tensor  # (B,) bool: the current draft's verdict (adaptive mode refines only these)
    weights: Optional[torch.Tensor]  # (B, G) the current drafts' re-mask weights (targeted only)
    pools: dict  # move (moves.MOVES) -> its _Pool: proposals drawn from the current drafts
    draws: torch.Tensor  # (B,) pools drawn so far: part of each proposal's random stream
    meter: Optional[cost.Meter] = None  # the budget's cost model (budget only)
    pool_cost: Optional[dict] = None  # move -> (B,) cost of one of its pools, in the meter's units
    budget_left: Optional[torch.Tensor] = None  # (B,) what each row may still spend here
    # With the block cache: the current drafts' own forward (fast.ProposalCache with the head), made at
    # the point's start for their rewards; their first pool runs against it, its prefill paid already.
    own: Optional[object] = None
    prepaid: Optional[torch.Tensor] = None  # (B,) what `own` paid of each row's first pool (meter units)


class IterRef:
    """The IterRef step hook. `IterRef(config, reward, blame=None)`, then `sampler.run(..., hook=iterref)`.
    `blame` is needed by, and only used with, `RefineConfig(proposal_holes="targeted")`."""

    def __init__(self, config: RefineConfig, reward: Reward, blame: Optional[Blame] = None):
        self.config = config.validate()
        if self.config.proposal_holes == "targeted" and blame is None:
            raise ConfigError("refine.proposal_holes='targeted' needs a blame callable: IterRef(config, reward, blame=...)")
        self.reward = reward
        self.blame = blame

    def applies(self, block: int, step: int, steps_per_block: int, t: Optional[int] = None) -> bool:
        return self.config.iterations > 0 and self.config.applies(block, step, steps_per_block, t)

    # ---------------------------------------------------------------- the kernel
    def __call__(self, sampler: DiffusionSampler, state: SamplerState) -> None:
        chain = self.begin(sampler, state)
        for it in range(self.config.iterations):
            kind = moves.kind_at(self.config, it)
            self.refill(sampler, state, chain, kind)
            if not bool(chain.active.any()):
                break
            idx, pick, proposed = self.propose(state, chain, kind, it)
            accept = self.accept(state, chain, kind, idx, pick, proposed, it)
            self.move(state, chain, kind, idx[accept], pick[accept], proposed[accept])
            state.proposed[idx] += 1
            state.accepted[idx] += accept.double()
            if self.config.adaptive:
                chain.active &= chain.toxic

    def begin(self, sampler: DiffusionSampler, state: SamplerState) -> _Chain:
        """The rows that refine here (something to re-mask, a pool within the budget's allowance, a
        reward below the adaptive bar) and their current rewards; the other rows cost no reward call."""
        cfg = self.config
        B, G = state.gen.shape
        device = state.x.device
        eligible = (state.gen != sampler.mask_id) & self.scope(sampler, state)
        active = (eligible.sum(1) > 0).cpu()
        t = sampler.global_step(state)
        cached = sampler.config.cache is not None
        meter = pool_cost = budget_left = None
        if cfg.budget is not None:
            # In FLOPs where they are counted, else rows (cost.Meter). A pool costs the same all
            # through this point: re-masking keeps the decoded and the masked counts.
            meter = cost.Meter.of(sampler, state)
            decoded, masks_left = eligible.sum(1).cpu(), (state.gen == sampler.mask_id).sum(1).cpu()
            pool_cost = {}
            for kind in moves.kinds(cfg):
                m = moves.hole_counts(cfg, kind, decoded)
                pool_cost[kind] = meter.pool(moves.pool_size(cfg, kind), m, masks_left,
                                             moves.reverse_forwards(cfg, kind, m))
            points_left = sum(p >= t for p in cost.refinement_points(sampler.config, self.applies))
            # A move may turn a later cached step into a full one: kept back from the start.
            budget_left = (meter.allowance(cfg.budget, meter.spent(state), t, points_left)
                           - meter.refresh(t, cfg.scope))
            # With the cache, the current draft's own forward adds the head to its first pool's prefill.
            first = pool_cost[moves.kind_at(cfg, 0)]
            active &= first + (meter.head() if cached else 0.0) <= budget_left + cost.EPS
        current = torch.full((B,), float("nan"), dtype=torch.float64)
        toxic = torch.zeros(B, dtype=torch.bool)
        idx = active.nonzero().squeeze(1)
        if len(idx):  # the gate: the sampler's own prediction, which costs no forward
            current[idx], toxic[idx] = self.score(state, state.pred.xhat0[idx.to(device)], idx)
        if cfg.adaptive:
            active &= toxic
        xhat0, own, prepaid = state.pred.xhat0, None, None
        idx = active.nonzero().squeeze(1)
        if cached and len(idx):
            # Like with like: with the cache the sampler's x̂0 comes from logits of earlier forwards
            # (the dual cache's suffix dates from the block's start), while a proposal's comes from
            # its own forward against its draft's keys and values. The current draft's reward is read
            # from the same kind of forward: its own, whose keys and values its first pool reuses.
            dev = idx.to(device)
            spent = None if meter is None else meter.spent(state).clone()
            own = fast.ProposalCache(sampler, state, dev, head=True)
            fresh = sampler.next_prediction(state, own.head_logits, state.gen[dev], dev).xhat0
            xhat0 = xhat0.clone()
            xhat0[dev] = fresh
            current[idx], toxic[idx] = self.score(state, fresh, idx)
            if meter is not None:
                budget_left = budget_left - (meter.spent(state) - spent)
                prepaid = torch.zeros(B, dtype=torch.float64)
                prepaid[idx] = meter.keys_values()[idx]
            if cfg.adaptive:
                active &= toxic
        weights = None
        if cfg.proposal_holes == "targeted":
            weights = torch.zeros((B, G), dtype=torch.float64, device=device)
            idx = active.nonzero().squeeze(1).to(device)
            if len(idx):
                weights[idx] = self.remask_weights(state, xhat0[idx], idx, eligible[idx])
        pools = {kind: _Pool.empty(B, moves.pool_size(cfg, kind), G, device, targeted=weights is not None)
                 for kind in moves.kinds(cfg)}
        return _Chain(t, eligible, active, current, toxic, weights, pools, torch.zeros(B, dtype=torch.long, device=device),
                      meter, pool_cost, budget_left, own, prepaid)

    def refill(self, sampler: DiffusionSampler, state: SamplerState, chain: _Chain, kind: str) -> None:
        """A new pool of the move `kind` for every active row whose pool of it is empty; a row that
        cannot afford one stops."""
        pool = chain.pools[kind]
        need = chain.active & (pool.next >= pool.gen.shape[1])
        if chain.budget_left is not None and bool(need.any()):
            prepaid = chain.prepaid if chain.own is not None and chain.prepaid is not None else 0.0
            affordable = chain.pool_cost[kind] - prepaid <= chain.budget_left + cost.EPS
            chain.active &= ~need | affordable
            need &= affordable
        idx = need.nonzero().squeeze(1)
        if len(idx):
            spent = None if chain.meter is None else chain.meter.spent(state).clone()
            dev = idx.to(state.x.device)
            pool.store(idx, *moves.draw(self, sampler, state, chain, dev, kind))
            if chain.meter is not None:
                chain.budget_left -= chain.meter.spent(state) - spent
            chain.draws[dev] += 1
        chain.own = None  # the drafts' own forward served their first pool; moves change them after it

    def propose(self, state: SamplerState, chain: _Chain, kind: str,
                it: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each active row: its index, the pool member it examines and that member's reward. The
        members are i.i.d. draws from the current draft, so taking them in drawn order is a uniform
        selection; greedy takes the best; Multiple-Try Metropolis draws a try by exp(r/α)."""
        pool = chain.pools[kind]
        idx = chain.active.nonzero().squeeze(1)
        rewards = pool.reward[idx]
        if self.config.selection == "greedy":
            pick = rewards.argmax(1)
        elif moves.multiple_try(self.config):
            pick = moves.mtm_pick(self.config, rewards, self.uniforms(state, chain, idx, it, 1))
        else:
            pick = pool.next[idx]
        return idx, pick, pool.reward[idx, pick]

    def accept(self, state: SamplerState, chain: _Chain, kind: str, idx: torch.Tensor, pick: torch.Tensor,
               proposed: torch.Tensor, it: int) -> torch.Tensor:
        """Which rows accept their proposal; the pools are advanced accordingly."""
        selection, pool = self.config.selection, chain.pools[kind]
        if selection == "greedy":  # the best of the pool, if it beats the current draft
            accept = proposed > chain.current[idx]
        elif selection == "remask_only":
            accept = torch.ones(len(idx), dtype=torch.bool)
        else:
            accept = self.metropolis(state, chain, pool, idx, pick, proposed, it)
        pool.examined(idx, pick, accept, whole=selection == "greedy" or moves.multiple_try(self.config))
        return accept

    def uniforms(self, state: SamplerState, chain: _Chain, idx: torch.Tensor, it: int, which: int) -> torch.Tensor:
        """(rows,) float64 CPU uniforms of iteration `it` for the state rows `idx`: 0 the acceptance's,
        1 Multiple-Try Metropolis's choice of a try."""
        device = state.x.device
        u = rng.uniform(rng.derive(state.keys[idx.to(device)], rng.Stream.ACCEPT, chain.t, it),
                        torch.full((len(idx), 1), which, dtype=torch.long, device=device))
        return u.squeeze(1).double().cpu()

    def metropolis(self, state: SamplerState, chain: _Chain, pool: _Pool, idx: torch.Tensor, pick: torch.Tensor,
                   proposed: torch.Tensor, it: int) -> torch.Tensor:
        """Accept with probability min(1, exp((r' − r)/α) · the move's correction (q(S | x') / q(S | x),
        and a Gibbs move's barred-token factors: moves.py)): log u below the log of the ratio. Higher
        reward is favoured; the exactness tests check it. Multiple-Try Metropolis: moves.mtm_log_ratio."""
        if moves.multiple_try(self.config):
            log_ratio = moves.mtm_log_ratio(self.config, chain.current[idx], pool.reward[idx], pool.log_q_ratio[idx], pick)
        else:
            log_ratio = (proposed - chain.current[idx]) / self.config.alpha + pool.log_q_ratio[idx, pick]
        return torch.log(self.uniforms(state, chain, idx, it, 0)) < log_ratio

    def move(self, state: SamplerState, chain: _Chain, kind: str, won: torch.Tensor, pick: torch.Tensor,
             reward: torch.Tensor) -> None:
        """Rows `won` move to their pool's member `pick`: draft, prediction, reward, re-mask weights.
        Every pool of theirs is emptied: its members were drawn from the old draft. New tensors,
        never in-place writes: a plain-sampling fork may share the old ones."""
        if not len(won):
            return
        dev, dev_pick = won.to(state.x.device), pick.to(state.x.device)
        pool, P = chain.pools[kind], state.prompt_length
        for other in chain.pools.values():
            other.next[won] = other.gen.shape[1]
        x = state.x.clone()
        x[dev, P:] = pool.gen[dev, dev_pick]
        state.x = x
        fields_new = []
        for f in ("candidates", "confidence", "xhat0"):
            v = getattr(state.pred, f).clone()
            v[dev] = getattr(pool.pred, f)[dev, dev_pick]
            fields_new.append(v)
        state.pred = Prediction(*fields_new)
        state.logits = None  # they were the old draft's; the pool does not keep its logits
        chain.current[won] = reward
        chain.toxic[won] = pool.toxic[won, pick]
        if chain.weights is not None:
            chain.weights[dev] = pool.weights[dev, dev_pick]

    # ---------------------------------------------------------------- drawing a pool (moves.py)
    def denoise(self, sampler: DiffusionSampler, state: SamplerState, gen: torch.Tensor, holes: torch.Tensor,
                parent: torch.Tensor, keys: torch.Tensor, own=None, exclusion=None, score: bool = True,
                first_sub: int = 0) -> Prediction:
        """Re-commit the holes of the proposals `gen` in place: the sampler's kernel (redenoise) at the
        proposal temperature, in the configured proposal_order, stop tokens demoted by the most
        likely token (see "How a proposal re-commits its holes" above). With the sampler's block cache
        on, redenoise runs only the holes against keys and values of the current drafts, computed once
        per pool: no longer the model's own conditional (docs/method.md, "Fast sampling")."""
        return sampler.redenoise(state, gen, holes, parent, keys, self.config.proposal_temperature,
                                 self.config.proposal_order, PROPOSAL_STOP_DEMOTION, proposal_cache=own,
                                 exclusion=exclusion, score=score, first_sub=first_sub)

    # ---------------------------------------------------------------- rewards, blame, scope
    def score(self, state: SamplerState, xhat0: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r(x̂0), verdict) for each row of xhat0, charged to the state rows `owner`. The verdict is
        the reward's own when it returns a Judged, else "below accept_reward" (needed only when
        adaptive; without a bar every row counts as still to be refined)."""
        out = self.reward(xhat0)
        r = reward_values(out, xhat0.shape[0])
        if isinstance(out, Judged):
            toxic = torch.as_tensor(out.toxic, dtype=torch.bool).reshape(-1).cpu()
        elif self.config.accept_reward is not None:
            toxic = r < self.config.accept_reward
        elif self.config.adaptive:
            raise ConfigError("refine.adaptive needs refine.accept_reward (the reward at which a row counts as "
                              "acceptable), or a reward that returns its verdict (refine.Judged)")
        else:
            toxic = torch.ones(len(r), dtype=torch.bool)
        state.reward_calls.index_add_(0, owner.cpu(), torch.ones(len(owner), dtype=torch.float64))
        return r, toxic

    def remask_weights(self, state: SamplerState, xhat0: torch.Tensor, owner: torch.Tensor,
                       eligible: torch.Tensor) -> torch.Tensor:
        """(n, G) float64 re-mask weights ε + (1 − ε)·blame(x̂0) on the eligible positions, 0 elsewhere;
        whatever reward calls the blame reports are charged to the state rows `owner`."""
        weights, calls = remask.blame_weights(self.blame, xhat0, eligible, self.config.blame_floor)
        state.reward_calls.index_add_(0, owner.cpu(), calls)
        return weights

    def scope(self, sampler: DiffusionSampler, state: SamplerState) -> torch.Tensor:
        """(G,) positions that may be re-masked: the current block, or everything up to its end; the
        whole answer at the point after the last step."""
        G = state.gen.shape[1]
        in_scope = torch.zeros(G, dtype=torch.bool, device=state.x.device)
        sl = sampler.block_slice(state.block)
        complete = cost.is_last(sampler.config, sampler.global_step(state))
        in_scope[(0 if self.config.scope == "all" or complete else sl.start):sl.stop] = True
        return in_scope
