"""A masked diffusion "model" with an exact denoiser, for testing and measuring refinement
(tests/test_refine_exact.py, benchmarks/toy_exact.py).

Sequences of length L over a vocabulary of V tokens are few enough to enumerate (V**L of them), so a
known distribution p0 over all of them defines the perfect mask predictor: at any state, the logits
of a masked position are the log of its exact conditional marginal given the revealed tokens.
Sampled one token per step, in random order, at temperature 1, the base sampler then draws exactly
from p0; the aligned target p* ∝ p0 · exp(r/α) is known by enumeration; and the total variation
distance of samples to p* says how exact a sampler is.
"""
from __future__ import annotations

from typing import Iterable

import torch


def all_sequences(V: int, L: int) -> torch.Tensor:
    """(V**L, L) every sequence, in base-V order (sequence k has digits of k, first position most
    significant), so `encode` inverts it."""
    k = torch.arange(V ** L)
    powers = V ** torch.arange(L - 1, -1, -1)
    return (k[:, None] // powers[None, :]) % V


def encode(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """Index of each sequence (n, L) in all_sequences order."""
    L = tokens.shape[-1]
    powers = (V ** torch.arange(L - 1, -1, -1, device=tokens.device)).to(tokens.dtype)
    return (tokens * powers).sum(-1)


class ExactDenoiser(torch.nn.Module):
    """Perfect mask predictor for a distribution `p0` over all V**L sequences.

    Input: (B, P + L) ids, of which the last L are the sequence (a prompt, if any, is ignored);
    the mask id is V. Output logits (B, P + L, V + 1); the mask column is -inf.
    """

    def __init__(self, p0: torch.Tensor, V: int, L: int):
        super().__init__()
        if p0.shape != (V ** L,):
            raise ValueError(f"p0 must have V**L = {V ** L} entries, got shape {tuple(p0.shape)}")
        if (p0 < 0).any() or not torch.isclose(p0.sum(), torch.tensor(1.0, dtype=p0.dtype)):
            raise ValueError("p0 must be a probability vector (non-negative, summing to 1)")
        self.V, self.L, self.mask_id = V, L, V
        self.register_buffer("p0", p0.double())
        seqs = all_sequences(V, L)
        self.register_buffer("seqs", seqs)
        self.register_buffer("onehot", torch.nn.functional.one_hot(seqs, V).double())  # (S, L, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids[:, -self.L:]
        revealed = x != self.mask_id
        # Sequences consistent with every revealed token, weighted by p0.
        agree = (self.seqs[None, :, :] == x[:, None, :]) | ~revealed[:, None, :]
        w = self.p0[None, :] * agree.all(-1)
        marg = torch.einsum("bs,slv->blv", w, self.onehot) / w.sum(1)[:, None, None]
        logits = torch.log(marg).float()
        B, P = input_ids.shape[0], input_ids.shape[1] - self.L
        out = torch.full((B, P + self.L, self.V + 1), float("-inf"))
        out[:, :P, 0] = 0.0
        out[:, P:, : self.V] = logits
        return out


class TableDenoiser(torch.nn.Module):
    """`toy.ExactDenoiser`'s logits for every one of the (V + 1)**L states, looked up by index.

    W(s) = Σ_{x consistent with s} p0(x) for every state s (mask = V) is p0 with, per axis, the sum
    over that axis appended as index V. A masked position i of s has marginal W(s[i:=v]) / W(s); a
    revealed one is one-hot (log: 0 / -inf), as ExactDenoiser computes them.
    """

    def __init__(self, p0: torch.Tensor, V: int, L: int):
        super().__init__()
        if p0.shape != (V ** L,):
            raise ValueError(f"p0 must have V**L = {V ** L} entries, got shape {tuple(p0.shape)}")
        self.V, self.L, self.mask_id = V, L, V
        W = p0.double().reshape((V,) * L)
        for axis in range(L):
            W = torch.cat([W, W.sum(axis, keepdim=True)], dim=axis)
        W = W.reshape(-1)  # base-(V+1) order, the first position most significant
        states = all_sequences(V + 1, L)
        powers = (V + 1) ** torch.arange(L - 1, -1, -1)
        index = (states * powers).sum(1)
        marg = torch.empty(len(states), L, V, dtype=torch.float64)
        for i in range(L):
            cleared = index - states[:, i] * powers[i]
            for v in range(V):
                marg[:, i, v] = W[cleared + v * powers[i]]
        marg = marg / W[:, None, None]
        onehot = torch.nn.functional.one_hot(states.clamp(max=V - 1), V).double()
        marg = torch.where((states < V)[..., None], onehot, marg)
        self.register_buffer("table", torch.log(marg).float())
        self.register_buffer("powers", powers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids[:, -self.L:]
        B, P = input_ids.shape[0], input_ids.shape[1] - self.L
        out = torch.full((B, P + self.L, self.V + 1), float("-inf"))
        out[:, :P, 0] = 0.0
        out[:, P:, : self.V] = self.table[(x * self.powers).sum(1)]
        return out


def random_distribution(V: int, L: int, seed: int = 0, sharpness: float = 2.0) -> torch.Tensor:
    """A random p0 with correlated positions: softmax of Gaussian scores (larger sharpness: peakier)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(V ** L, generator=g, dtype=torch.float64) * sharpness
    return torch.softmax(scores, 0)


class TableReward:
    """A reward given by value for every sequence: reward(ids (n, L)) -> (n,) float."""

    def __init__(self, values: torch.Tensor, V: int):
        self.values, self.V = values.double(), V

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.values[encode(tokens.cpu(), self.V)]


def toxic_count_reward(V: int, L: int, toxic: Iterable[int], weight: float = 1.0) -> TableReward:
    """Minus `weight` per occurrence of a "toxic" token: the toy stand-in for minus toxicity."""
    toxic = torch.tensor(sorted(set(toxic)))
    counts = torch.isin(all_sequences(V, L), toxic).sum(1).double()
    return TableReward(-weight * counts, V)


def toxic_blame(toxic: Iterable[int]):
    """The toy's blame for `toxic_count_reward`: 1 at each toxic token, 0 elsewhere, which is
    exactly each position's share of the reward's deficit. ids (n, L) -> (n, L) float."""
    toxic = torch.tensor(sorted(set(toxic)))
    return lambda tokens: torch.isin(tokens, toxic.to(tokens.device)).double()


def target(p0: torch.Tensor, reward_values: torch.Tensor, alpha: float) -> torch.Tensor:
    """p* ∝ p0 · exp(r / α), by enumeration (log-space for stability)."""
    logp = torch.log(p0.double()) + reward_values.double() / alpha
    return torch.softmax(logp, 0)


def empirical(samples: torch.Tensor, V: int) -> torch.Tensor:
    """Histogram of sequences (n, L) over all V**L sequences, normalised."""
    L = samples.shape[-1]
    counts = torch.bincount(encode(samples.cpu(), V), minlength=V ** L).double()
    return counts / counts.sum()


def tv_distance(samples: torch.Tensor, p: torch.Tensor, V: int) -> float:
    """Total variation distance between the samples' empirical distribution and p."""
    return 0.5 * float((empirical(samples, V) - p.double()).abs().sum())


def mean_z(rewards: torch.Tensor, values: torch.Tensor, p: torch.Tensor) -> float:
    """z-score of the mean of `rewards` (n samples) against its exact mean under p, `values` the
    reward of every sequence: TV over thousands of cells misses biases of a few per cent that this
    catches."""
    p, values = p.double(), values.double()
    mu = float((p * values).sum())
    sd = float((p * (values - mu) ** 2).sum().sqrt())
    return (float(rewards.double().mean()) - mu) / (sd / rewards.numel() ** 0.5)


def expected_tv_noise(p: torch.Tensor, n: int) -> float:
    """E[TV] of n exact samples of p (normal approximation per cell): the floor a sampler can reach."""
    p = p.double()
    return float(0.5 * (torch.sqrt(2 * p * (1 - p) / (torch.pi * n))).sum())
