"""IterRef's moves: how a pool of proposals is drawn from the current draft x, and the log of the
Metropolis-Hastings correction each proposal carries.

Two moves, both leaving p* ∝ p · exp(r/α) invariant, so that any fixed interleave of them does
(RefineConfig.gibbs_share):

* **re-mask** (the paper's): re-mask a set S of m = max(1, round(rho · n)) decoded tokens, drawn with
  q(S | x) (uniform, or by blame: remask.py), and re-draw them from the model, x'_S ~ p(x_S | x_rest).
  p cancels from the ratio, which is q(S | x') / q(S | x). In a peaked p the draw is often x_S
  itself: a proposal spent on a copy of the draft (measured on the toys: acceptance 0.83 at rho 0.5
  while the toxic rate barely moves).
* **Metropolised Gibbs**: re-mask S (|S| = gibbs_holes) the same way and re-draw its holes one per
  forward, in the proposal order, each from the model's conditional with the draft's own token at
  that hole barred: hole σ_j from p(· | s_j) / (1 − p(x_σj | s_j)) on the tokens other than x_σj,
  s_j the state with the holes after σ_j still masked. Every proposal changes every hole. With p's
  chain rule along the forward path (x') and along the reverse path (x, from x' by the same move:
  the order the reverse path's own logits give, same keys), the p factors cancel and

      A = min(1, exp((r' − r)/α) · q(S | x')/q(S | x) · Π_j (1 − p(x_σj | s_j)) / Π_j (1 − p(x'_σ'j | s'_j)))

  The forward product is read from the forward path's own logits. The reverse path's first state is
  the forward path's first (every hole masked), and its first hole is the same one, so one hole
  needs no extra forward; each further hole costs one forward of the reverse path (a draw of
  nothing: its tokens are x's, forced), gibbs_holes − 1 in all.

Multiple-Try Metropolis (selection "mtm", re-mask move only): one hole set S for the pool, N tries
y_j ~ p(x_S | x_rest), one chosen with probability ∝ exp(r(y_j)/α) (the importance weight
p*(y)/T(x → y) up to factors common to the pool), and N − 1 backward draws x*_j from y's own
conditional, which is x's: y agrees with x outside S. Accepted with
min(1, q(S | y)/q(S | x) · Σ_j exp(r(y_j)/α) / (exp(r(x)/α) + Σ_j exp(r(x*_j)/α))). The pool holds the
tries and the backward draws: 2N − 1 proposals a decision.

Given S, this proposal does not depend on x_S: it is an independence sampler on the holes, and y's
backward draws come from the same conditional as the tries. The N − 1 tries not chosen are such
draws, independent of the choice given the pool, so they may serve as the backward draws (Liu,
Liang and Wong 2000, the independence case): selection "mtm_reuse", N proposals a decision,
accepted with min(1, q(S | y)/q(S | x) · Σ_j exp(r(y_j)/α) / (Σ_j exp(r(y_j)/α) − exp(r(y)/α) + exp(r(x)/α))).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import cost, remask
from .config import RefineConfig
from ..sampling import fast, rng
from ..sampling.exclusion import Exclusion
from ..sampling.sampler import Prediction

MOVES = ("remask", "gibbs")
BLAMED = 0.5  # bar_blamed: a hole whose blame reaches this is at fault, and may not keep its token


def kind_at(config: RefineConfig, iteration: int) -> str:
    """The move iteration `iteration` (0-based) of a point makes."""
    return "gibbs" if config.gibbs_at(iteration) else "remask"


def kinds(config: RefineConfig) -> tuple[str, ...]:
    """The moves a point's iterations make, in order of first use."""
    out = []
    for i in range(config.iterations):
        k = kind_at(config, i)
        if k not in out:
            out.append(k)
    return tuple(out) or ("remask",)


def pool_size(config: RefineConfig, kind: str) -> int:
    """Proposals a pool of this move draws: N; 2N − 1 with Multiple-Try Metropolis (tries and backward draws)."""
    n = config.n_proposals
    return 2 * n - 1 if kind == "remask" and config.selection == "mtm" else n


def multiple_try(config: RefineConfig) -> bool:
    return config.selection in ("mtm", "mtm_reuse")


def hole_counts(config: RefineConfig, kind: str, decoded: torch.Tensor) -> torch.Tensor:
    """Holes a proposal of this move re-masks, per entry of `decoded` (the decoded tokens in scope)."""
    if kind == "gibbs":
        return torch.clamp(decoded, max=config.gibbs_holes)
    return cost.remask_sizes(config.rho, decoded)


def reverse_forwards(config: RefineConfig, kind: str, m: torch.Tensor) -> torch.Tensor:
    """Forwards of a proposal's reverse path (Gibbs: every hole after the first)."""
    return torch.clamp(m - 1, min=0) if kind == "gibbs" else torch.zeros_like(m)


class Drawn(NamedTuple):
    gen: torch.Tensor  # (n, G) the proposals
    pred: Prediction
    reward: torch.Tensor  # (n,)
    toxic: torch.Tensor  # (n,) bool
    log_correction: torch.Tensor  # (n,) float64 CPU: the ratio's log, without the reward's term
    weights: Optional[torch.Tensor]  # (n, G) the proposals' own re-mask weights (targeted only)


def draw(iterref, sampler, state, chain, idx: torch.Tensor, kind: str) -> Drawn:
    """A pool of this move for each of the state rows `idx`: pool_size(kind) proposals per row."""
    cfg = iterref.config
    N = pool_size(cfg, kind)
    parent = idx.repeat_interleave(N)
    member = torch.arange(N, device=idx.device).repeat(len(idx))
    stream = rng.Stream.GIBBS if kind == "gibbs" else rng.Stream.PROPOSAL
    keys = rng.derive(state.keys[parent], stream, chain.t, chain.draws[parent], member)
    current = state.gen[parent]
    gen = current.clone()

    # Noising: m of the eligible (decoded, in scope) tokens, uniformly or by blame; with Multiple-Try
    # Metropolis one set for the whole pool (member 0's draw).
    eligible = chain.eligible[parent]
    m = hole_counts(cfg, kind, eligible.sum(1))
    hole_keys = keys if not multiple_try(cfg) else rng.derive(state.keys[parent], stream, chain.t,
                                                                chain.draws[parent], torch.zeros_like(member))
    u = rng.uniform(rng.derive(hole_keys, rng.Sub.REMASK), torch.arange(gen.shape[1], device=gen.device).expand_as(gen))
    weights = None if chain.weights is None else chain.weights[parent]
    if weights is None:
        holes = remask.uniform(eligible, m, u)
    else:
        holes, log_q_forward = remask.weighted(weights, m, u)
    chosen = holes.clone()
    gen[holes] = sampler.mask_id

    own = chain.own
    exclusion = None
    # Multiple-Try Metropolis weighs its tries as draws from p(x_S | x_rest): no barred token there.
    if kind == "remask" and cfg.bar_blamed and weights is not None and not multiple_try(cfg):
        at, has = blamed_hole(weights, holes, cfg.blame_floor)
        barred = torch.full_like(current, -1)
        barred[has, at[has]] = current[has, at[has]]
        exclusion = Exclusion(barred=barred, first=torch.where(has, at, -1), keep_first=True)
    if kind == "gibbs":
        exclusion = Exclusion(barred=current)
        if sampler.config.cache is not None and bool((m > 1).any()):  # the reverse path reuses it
            own = (own and own.serving(parent)) or fast.ProposalCache(sampler, state, parent)
    pred = iterref.denoise(sampler, state, gen, holes, parent, keys, own, exclusion)
    reward, toxic = iterref.score(state, pred.xhat0, parent)
    log_correction = torch.zeros(len(parent), dtype=torch.float64, device=gen.device)
    if kind == "gibbs":
        log_correction = exclusion.log_rest - reverse_path(
            iterref, sampler, state, current, gen, chosen, exclusion, parent, keys, own)
        # A hole whose barred token was its only possible one kept it: no move (not -inf - -inf).
        log_correction = torch.where(torch.isneginf(exclusion.log_rest), exclusion.log_rest, log_correction)
    if weights is None:
        return Drawn(gen, pred, reward, toxic, log_correction.cpu(), None)
    # The reverse move re-masks the same S from x': its probability under x''s own blame, read
    # from the x̂0 just scored (no extra forward).
    own_weights = iterref.remask_weights(state, pred.xhat0, parent, eligible)
    log_q_reverse = remask.log_prob(own_weights, chosen, m)
    if exclusion is not None and kind == "remask":
        log_correction = barred_correction(sampler, exclusion, own_weights, chosen, current, gen, cfg)
    return Drawn(gen, pred, reward, toxic, (log_correction + log_q_reverse - log_q_forward).cpu(), own_weights)


def blamed_hole(weights: torch.Tensor, holes: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) the most blamed of each row's holes (the first on ties) and (n,) bool whether its blame
    reaches BLAMED, from re-mask weights w = ε + (1 − ε)·blame. With ε = 1 every weight is 1 and the
    blame cannot be read: no hole is barred."""
    w = torch.where(holes, weights, torch.full_like(weights, -1.0))
    best, at = w.max(1)
    if floor >= 1.0:
        return at, torch.zeros_like(best, dtype=torch.bool)
    return at, best >= floor + (1.0 - floor) * BLAMED - 1e-12


def barred_correction(sampler, forward: Exclusion, own_weights: torch.Tensor, chosen: torch.Tensor,
                      current: torch.Tensor, proposed: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    """The log of the barred-blamed-hole factor: log(1 − p(x_b | s_1)) (the forward path's, b the
    hole x blames most) minus log(1 − p(x'_b' | s_1)), b' the hole x' blames most, which the reverse
    path commits first from the same first state; -inf where x' kept the token at b' (the reverse
    move bars it, so it cannot return to x)."""
    at, has = blamed_hole(own_weights, chosen, cfg.blame_floor)
    rows = has.nonzero().squeeze(1)
    reverse = torch.zeros_like(forward.log_rest)
    token = proposed[rows, at[rows]]
    reverse[rows] = forward.reverse_first(sampler, rows, at[rows], token, cfg.proposal_temperature)
    out = forward.log_rest - reverse
    kept = torch.zeros_like(has)
    kept[rows] = token == current[rows, at[rows]]
    return torch.where(kept | torch.isneginf(forward.log_rest), torch.full_like(out, float("-inf")), out)


def reverse_path(iterref, sampler, state, current: torch.Tensor, proposed: torch.Tensor, chosen: torch.Tensor,
                 forward: Exclusion, parent: torch.Tensor, keys: torch.Tensor, own) -> torch.Tensor:
    """Σ_j log(1 − p(x'_σ'j | s'_j)) over the reverse path, x' → x by the same Gibbs move: its first
    hole from the forward path's first state (forward.first_drawn, no forward), the others by re-running
    the path with x's tokens forced, x''s barred, from the sub-step after the first (same keys)."""
    total = forward.first_drawn.clone()
    first = torch.zeros_like(chosen).scatter_(1, forward.first_at[:, None], True)
    holes = chosen & ~first
    rows = holes.any(1).nonzero().squeeze(1)
    if len(rows) == 0:
        return total
    gen = current[rows].clone()
    gen[holes[rows]] = sampler.mask_id
    back = Exclusion(barred=proposed[rows], forced=current[rows])
    iterref.denoise(sampler, state, gen, holes[rows].clone(), parent[rows], keys[rows],
                    None if own is None else own.serving(parent[rows]), back, score=False, first_sub=1)
    total[rows] += back.log_rest
    return total


def mtm_pick(config: RefineConfig, reward: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Multiple-Try Metropolis: the try each row takes, (rows,), with probability ∝ exp(r/α) among its
    pool's first N members (the tries; the rest are backward draws), by the uniforms `u` (rows,)."""
    n = config.n_proposals
    weights = torch.softmax(reward[:, :n] / config.alpha, 1)
    return torch.searchsorted(weights.cumsum(1), u[:, None].double()).squeeze(1).clamp(max=n - 1)


def mtm_log_ratio(config: RefineConfig, current: torch.Tensor, reward: torch.Tensor,
                  log_q_ratio: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The log of Multiple-Try Metropolis's acceptance ratio for the try `pick` of each row's pool
    (rows, 2N − 1): q(S | y)/q(S | x) · Σ_tries exp(r/α) / (exp(r(x)/α) + Σ_backward exp(r/α))."""
    n, a = config.n_proposals, config.alpha
    tries, backward = reward[:, :n] / a, reward[:, n:] / a
    if config.selection == "mtm_reuse":  # the tries not chosen are the backward draws (module docstring)
        backward = tries.scatter(1, pick[:, None], torch.full_like(tries[:, :1], float("-inf")))
    return (torch.logsumexp(tries, 1) - torch.logsumexp(torch.cat([current[:, None] / a, backward], 1), 1)
            + log_q_ratio.gather(1, pick[:, None]).squeeze(1))
