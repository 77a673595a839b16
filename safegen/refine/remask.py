"""Which decoded tokens a refinement proposal re-masks: a uniformly random set, or a set drawn
towards the tokens a blame function holds responsible for a low reward.

Targeted re-masking draws a set S of fixed size m among the eligible positions with probability

    q(S | x) = Π_{i∈S} w_i / e_m(w),   w_i = ε + (1 − ε) · blame_i(x),

where e_m(w) is the elementary symmetric polynomial of degree m (the sum of Π_{i∈S} w_i over every
set of size m). The floor ε keeps every set possible, which the reverse move needs. e_m comes from
the recursion over positions

    e_r(w_i, ..., w_n) = e_r(w_{i+1}, ..., w_n) + w_i · e_{r−1}(w_{i+1}, ..., w_n),

in log space (a sum over C(n, m) sets overflows float64 for long answers), O(n · m) per row, and S is
drawn from the same recursion position by position: with r members still to draw, position i joins S
with probability w_i · e_{r−1}(w_{i+1}, ...) / e_r(w_i, ...). q is exact, not estimated, as the
Metropolis correction q(S | x') / q(S | x) needs. Rows are vectorised; the loops run over positions.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch


class BlameResult(NamedTuple):
    """What a blame callable returns when its attribution cost reward-model calls (occlusion, say);
    a plain (n, G) tensor means it cost none."""

    blame: torch.Tensor  # (n, G) in [0, 1]: how much each position is to blame for a low reward
    reward_calls: Union[float, torch.Tensor]  # texts the reward model scored for it, per row: a number or (n,)


# (n, G) token ids of the generation -> (n, G) blame in [0, 1], or a BlameResult. IterRef calls it on
# exactly the x̂0 batches it scores: the current draft at each refined point, and every proposal.
Blame = Callable[[torch.Tensor], Union[torch.Tensor, BlameResult]]


def uniform(eligible: torch.Tensor, m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(n, G) bool: `m` (n,) eligible positions per row, uniformly at random. `u` (n, G) uniforms:
    the eligible positions with the m smallest draws."""
    score = torch.where(eligible, u, torch.full_like(u, 2.0))
    order = torch.argsort(score, dim=1)
    first = torch.arange(u.shape[1], device=u.device)[None, :] < m[:, None]
    return torch.zeros_like(eligible).scatter_(1, order, first)


def weights(blame: torch.Tensor, eligible: torch.Tensor, floor: float) -> torch.Tensor:
    """w = ε + (1 − ε) · blame on the eligible positions, 0 elsewhere (never drawn), float64."""
    w = floor + (1.0 - floor) * blame.double().clamp(0.0, 1.0)
    return torch.where(eligible, w, torch.zeros_like(w))


def blame_weights(blame_fn: Blame, xhat0: torch.Tensor, eligible: torch.Tensor,
                  floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-mask weights of `weights` for blame_fn(xhat0), checked, and the reward calls the blame
    reports ((n,) float64, CPU)."""
    out = blame_fn(xhat0)
    calls = 0.0
    if isinstance(out, BlameResult):
        out, calls = out.blame, out.reward_calls
    blame = torch.as_tensor(out).to(device=xhat0.device, dtype=torch.float64)
    if blame.shape != xhat0.shape:
        raise ValueError(f"the blame returned shape {tuple(blame.shape)} for token ids of shape "
                         f"{tuple(xhat0.shape)}: it must be one value per generated token")
    if not bool(((blame >= -1e-6) & (blame <= 1 + 1e-6)).all()):  # float32 rounding is let through
        raise ValueError("the blame returned values outside [0, 1] (or NaN)")
    calls = torch.as_tensor(calls, dtype=torch.float64).cpu().expand(xhat0.shape[0]).contiguous()
    return weights(blame, eligible, floor), calls


def _suffix_log_esp(log_w: torch.Tensor, top: int) -> torch.Tensor:
    """(n, G + 1, top + 1): entry [:, i, r] = log e_r(w_i, ..., w_{G-1}); e_0 = 1."""
    n, G = log_w.shape
    E = torch.full((n, G + 1, top + 1), float("-inf"), dtype=torch.float64, device=log_w.device)
    E[:, :, 0] = 0.0
    for i in range(G - 1, -1, -1):
        E[:, i, 1:] = torch.logaddexp(E[:, i + 1, 1:], log_w[:, i, None] + E[:, i + 1, :-1])
    return E


def log_esp(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(n,) log e_m(w) per row, by the forward form of the same recursion (one (n, m + 1) vector)."""
    log_w = torch.log(w.double())
    top = int(m.max()) if m.numel() else 0
    e = torch.full((w.shape[0], top + 1), float("-inf"), dtype=torch.float64, device=w.device)
    e[:, 0] = 0.0
    for i in range(w.shape[1]):
        e[:, 1:] = torch.logaddexp(e[:, 1:], log_w[:, i, None] + e[:, :-1])
    return e.gather(1, m[:, None]).squeeze(1)


def log_prob(w: torch.Tensor, chosen: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(n,) log q(S | w) of the sets `chosen` (n, G) bool of size m: Σ_{i∈S} log w_i − log e_m(w)."""
    log_w = torch.log(w.double())
    return torch.where(chosen, log_w, torch.zeros_like(log_w)).sum(1) - log_esp(w, m)


def weighted(w: torch.Tensor, m: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw S with q(S | w) ∝ Π_{i∈S} w_i, |S| = m, per row; returns ((n, G) bool, (n,) log q(S | w)).
    Positions with w = 0 are never drawn; m must not exceed the positive weights of its row."""
    n, G = w.shape
    log_w = torch.log(w.double())
    E = _suffix_log_esp(log_w, int(m.max()) if m.numel() else 0)
    idx = torch.arange(n, device=w.device)
    left = m.clone()
    # When the positions left are exactly as many as the members still to draw, e_r of the rest is
    # e^-inf and logaddexp returns the other term exactly: log_p is 0.0, so every one joins.
    chosen = torch.zeros((n, G), dtype=torch.bool, device=w.device)
    log_u = torch.log(u.double())
    for i in range(G):
        log_p = log_w[:, i] + E[idx, i + 1, (left - 1).clamp(min=0)] - E[idx, i, left]
        take = (left > 0) & (log_u[:, i] < log_p)
        chosen[:, i] = take
        left = left - take.long()
    log_q = torch.where(chosen, log_w, torch.zeros_like(log_w)).sum(1) - E[idx, 0, m]
    return chosen, log_q
