"""Barred tokens in a proposal's re-denoising (`DiffusionSampler.redenoise`): the bookkeeping of
IterRef's moves that may not re-draw a hole's current token (refine/moves.py says why and derives
their acceptance). A hole with a barred token is drawn from the model's conditional on the other
tokens, p(v | s) / (1 − p(barred | s)); what the move's acceptance needs are the logs of the
probability the barred tokens leave, 1 − p(barred | s), at the states the path commits them in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import dream


@dataclass
class Exclusion:
    barred: torch.Tensor  # (n, G) long: the token each hole may not take; -1 where none is barred
    forced: Optional[torch.Tensor] = None  # (n, G): commit these instead of drawing (a reverse path)
    first: Optional[torch.Tensor] = None  # (n,) long: the hole to commit first (-1: the order decides)
    keep_first: bool = False  # keep the first state's logits at the holes (reverse_first)
    # Out, per row (n,): Σ over the holes committed with a barred token of log(1 − p(barred | s));
    # log(1 − p(token committed | s)) at the first hole (a Gibbs forward path only: neither forced
    # nor keep_first); the first hole's position.
    log_rest: Optional[torch.Tensor] = None
    first_drawn: Optional[torch.Tensor] = None
    first_at: Optional[torch.Tensor] = None
    first_logits: Optional[torch.Tensor] = None  # (n, m, V) the first state's logits at the m holes (keep_first)
    first_holes: Optional[torch.Tensor] = None  # (n, m) long: their positions (a row with fewer repeats one)

    def start(self, n: int, device) -> None:
        self.log_rest = torch.zeros(n, dtype=torch.float64, device=device)
        self.first_drawn = torch.zeros(n, dtype=torch.float64, device=device)
        self.first_at = torch.zeros(n, dtype=torch.long, device=device)

    def committable(self, holes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """At the first sub-step: the holes the rows `rows` may commit (their `first` hole, if any)."""
        if self.first is None:
            return holes
        first = self.first[rows]
        only = torch.zeros_like(holes).scatter_(1, first.clamp(min=0)[:, None], True)
        return torch.where((first >= 0)[:, None], only & holes, holes)

    def record(self, sampler, logits: torch.Tensor, holes: torch.Tensor, committed: torch.Tensor,
               new: torch.Tensor, rows: torch.Tensor, temperature: float, first: bool) -> None:
        """The rows `rows` just committed one of their `holes` (r, G) each (`committed` (r, G) bool) to
        `new` (r, G) from `logits` (r, G, V) (as predict left them)."""
        at = committed.int().argmax(1)
        barred = self.barred[rows, at]
        # Only where a token was barred: a float64 sum over the vocabulary per row is not free.
        b = (barred >= 0).nonzero().squeeze(1)
        if len(b):
            self.log_rest[rows[b]] += log_rest(sampler, logits[b, at[b]], temperature, barred[b])
        if first:
            self.first_at[rows] = at
            if self.forced is None and not self.keep_first:  # a Gibbs forward path's reverse needs it
                r = torch.arange(len(rows), device=logits.device)
                self.first_drawn[rows] = log_rest(sampler, logits[r, at], temperature, new[r, at])
            if self.keep_first:  # only the holes' logits: the vocabulary is wide
                m = int(holes.sum(1).max())
                pos = torch.argsort(holes.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
                pos = torch.where(holes.gather(1, pos), pos, pos[:, :1])
                if self.first_logits is None:
                    self.first_logits = torch.zeros((len(self.barred), m, logits.shape[-1]),
                                                    dtype=logits.dtype, device=logits.device)
                    self.first_holes = torch.zeros((len(self.barred), m), dtype=torch.long, device=logits.device)
                self.first_logits[rows] = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
                self.first_holes[rows] = pos

    def reverse_first(self, sampler, rows: torch.Tensor, at: torch.Tensor, token: torch.Tensor,
                      temperature: float) -> torch.Tensor:
        """log(1 − p(token | s_1)) at position `at` for the rows `rows`, s_1 the first state (every
        hole masked): the reverse path's barred-token factor when it commits that hole first."""
        k = (self.first_holes[rows] == at[:, None]).int().argmax(1)
        return log_rest(sampler, self.first_logits[rows, k], temperature, token)


def bar_tokens(p: torch.Tensor, barred: torch.Tensor) -> torch.Tensor:
    """Probabilities p (..., V) with the token `barred` (...; -1: none) of each position set to 0,
    except where it is the only possible one: that position keeps it, and the move's correction,
    log(1 − p(barred)) = -inf, rejects it."""
    bar = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, barred.clamp(min=0)[..., None], (barred >= 0)[..., None])
    bar &= p.masked_fill(bar, 0.0).sum(-1, keepdim=True) > 0
    return p.masked_fill(bar, 0.0)


def log_rest(sampler, logits: torch.Tensor, temperature: float, token: torch.Tensor) -> torch.Tensor:
    """log(1 − p(token)) (n,) float64 under the distribution `sampler.predict` draws from for logits
    (n, V) (as predict left them: mask, padding and EOS barred) at `temperature`: the log of what the
    other tokens hold, summed in float64 so that it stays exact when p(token) is close to 1."""
    lg = dream.truncate(logits.float(), sampler.config.top_k, sampler.config.top_p).double()
    if temperature not in (0, 1):
        lg = lg / temperature
    rest = torch.logsumexp(lg.scatter(-1, token[:, None], float("-inf")), -1)
    return rest - torch.logsumexp(lg, -1)

