"""A long, exactly solvable toy for masked diffusion: a Markov chain over L >= 32 tokens.

safegen/research/toy.py enumerates all V**L sequences, so it stops at L of about 8. Real toxicity
looks different: a long answer, most of it harmless, and the harm in one or two tokens. This toy has
that shape and stays exact at any L. p0 is a first-order Markov chain (initial distribution `init`,
transition matrix `trans`) over V tokens, a few of them "toxic"; the reward is minus the number of
toxic tokens, r(x) = -Σ_i [x_i toxic]. Since exp(r/α) is a product over positions of the emission
weights e_v = exp(-[v toxic]/α), the aligned target p* ∝ p0 · exp(r/α) is a hidden-Markov-shaped
product too, and everything needed to judge a sampler follows from forward-backward in O(L·V²):

* the conditional marginal of every masked position given the revealed ones (the exact mask
  predictor: MarkovDenoiser, the same logits as toy.TableDenoiser would give for this p0);
* p* rewritten as an inhomogeneous Markov chain (backward pass), hence exact samples of p*, its
  per-position marginals and the distribution of its toxic count (dynamic programming over
  position, state and count), so sample statistics have exact references and known noise (compare).

MarkovChain.random calibrates a chain whose toxic tokens are rare at every position but appear in
about half of the plain samples, mostly once: the regime where reward-guided refinement must find and
fix a few bad tokens in a long answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .toy import toxic_blame


def emission(V: int, toxic: tuple, alpha: float) -> torch.Tensor:
    """(V,) float64: exp(-[v toxic]/α), the per-position factor of exp(r/α); α = inf gives p0."""
    e = torch.ones(V, dtype=torch.float64)
    if not math.isinf(alpha):
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        e[list(toxic)] = math.exp(-1.0 / alpha)
    return e


def forward_backward(init: torch.Tensor, trans: torch.Tensor, x: torch.Tensor, mask_id: int,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, V) float64 marginals of each position of the chain (tilted by per-token `weights`)
    given the revealed tokens of x (B, L); masked positions are `mask_id`. Revealed positions come out
    exactly one-hot. Each step's vector is rescaled to sum 1, so long chains never underflow."""
    V = init.shape[0]
    B, L = x.shape
    init, trans = init.to(x.device, torch.float64), trans.to(x.device, torch.float64)
    # The evidence as a potential per position: all ones where masked, one-hot where revealed.
    phi = torch.nn.functional.one_hot(x.clamp(max=V - 1), V).double()
    phi[x == mask_id] = 1.0
    if weights is not None:
        phi = phi * weights.to(x.device, torch.float64)
    fwd = torch.empty(B, L, V, dtype=torch.float64, device=x.device)
    a = init * phi[:, 0]
    fwd[:, 0] = a / a.sum(-1, keepdim=True)
    for i in range(1, L):
        a = (fwd[:, i - 1] @ trans) * phi[:, i]
        fwd[:, i] = a / a.sum(-1, keepdim=True)
    post = torch.empty_like(fwd)
    post[:, L - 1] = fwd[:, L - 1]
    b = torch.ones(B, V, dtype=torch.float64, device=x.device)
    for i in range(L - 2, -1, -1):
        b = (phi[:, i + 1] * b) @ trans.T  # the weight of the future given x_i
        b = b / b.sum(-1, keepdim=True)
        m = fwd[:, i] * b
        post[:, i] = m / m.sum(-1, keepdim=True)
    return post


class ToxicCount:
    """The reward: ids (n, L) -> (n,) float64 on CPU, minus the number of toxic tokens."""

    def __init__(self, toxic):
        self.toxic = torch.tensor(sorted(set(toxic)))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return -torch.isin(tokens.cpu(), self.toxic).sum(-1).double()


@dataclass(frozen=True, eq=False)  # tensors: compared by identity
class MarkovChain:
    """p0: x_0 ~ init, x_i ~ trans[x_{i-1}], for i < L; `toxic` the tokens the reward counts."""

    init: torch.Tensor  # (V,) float64
    trans: torch.Tensor  # (V, V) float64, rows sum to 1
    toxic: tuple
    L: int

    @property
    def V(self) -> int:
        return self.init.shape[0]

    @classmethod
    def random(cls, V: int = 4, L: int = 32, seed: int = 0, toxic=(0,), toxic_rate: float = 0.5,
               sharpness: float = 2.0, context: float = 1.0) -> "MarkovChain":
        """A random chain whose plain samples of length L hold a toxic token with probability
        `toxic_rate`. The non-toxic part of each row is softmax(sharpness · Gaussian) (larger: a more
        predictable chain); every row, the initial one included, enters toxic token t with
        probability q · s[row, t], s = exp(context · Gaussian) (larger: toxicity depends more on the
        preceding token, as toxic words follow some contexts more than others), a toxic token's own
        row at a quarter of that; q is found by bisection on the exact P(no toxic token). So toxic
        tokens are rare at every position, and a toxic answer mostly holds one or two of them."""
        toxic = tuple(sorted(set(int(t) for t in toxic)))
        g = torch.Generator().manual_seed(seed)
        is_toxic = torch.zeros(V, dtype=torch.bool)
        is_toxic[list(toxic)] = True
        scores = torch.randn(V + 1, V, generator=g, dtype=torch.float64) * sharpness
        clean = torch.softmax(scores.masked_fill(is_toxic, float("-inf")), -1)  # row 0: the start
        spread = torch.exp(context * torch.randn(V + 1, V, generator=g, dtype=torch.float64)) * is_toxic
        spread[1:][is_toxic] *= 0.25  # a toxic token is rarely followed by another one

        def build(q: float) -> "MarkovChain":
            rows = clean * (1 - q * spread.sum(-1, keepdim=True)) + q * spread
            return cls(rows[0].clone(), rows[1:].clone(), toxic, L)

        def p_clean(c: "MarkovChain") -> float:  # P(no toxic token in L): toxic states cut out
            keep = (~is_toxic).double()
            walk = torch.linalg.matrix_power(c.trans * keep, L - 1)
            return float((c.init * keep) @ walk @ keep)

        lo, hi = 0.0, 1.0 / float(spread.sum(-1).max())  # P(clean) falls from 1 to 0 as q rises
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if 1 - p_clean(build(mid)) < toxic_rate else (lo, mid)
        return build(0.5 * (lo + hi))

    # ------------------------------------------------------------------ p* as a Markov chain
    def target_chain(self, alpha: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        """p* as an inhomogeneous chain: (start (V,), steps (L-1, V, V)), steps[i-1] the transition
        from position i-1 to i. A backward pass gives b_i(v), the total weight of every continuation
        after x_i = v; then p*(x_i = w | x_{i-1} = v) ∝ trans[v, w] · e_w · b_i(w)."""
        e, V, L = emission(self.V, self.toxic, alpha), self.V, self.L
        b = torch.ones(V, dtype=torch.float64)
        steps = torch.empty(max(L - 1, 0), V, V, dtype=torch.float64)
        for i in range(L - 1, 0, -1):
            w = self.trans * (e * b)[None, :]
            b = w.sum(1)
            steps[i - 1] = w / b[:, None]
            b = b / b.sum()  # only ratios matter: rescaled so long chains never underflow
        start = self.init * e * b
        return start / start.sum(), steps

    def sample_target(self, n: int, alpha: float = math.inf, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, L) long: exact samples of p* (of p0 at α = inf), by ancestral sampling of target_chain."""
        start, steps = self.target_chain(alpha)

        def draw(p: torch.Tensor) -> torch.Tensor:  # one inverse-CDF draw per row of p (n, V)
            u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
            return (p.cumsum(-1) < u).sum(-1).clamp(max=self.V - 1)

        x = torch.empty(n, self.L, dtype=torch.long)
        x[:, 0] = draw(start.expand(n, -1))
        for i in range(1, self.L):
            x[:, i] = draw(steps[i - 1][x[:, i - 1]])
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, L) long: exact samples of p0."""
        return self.sample_target(n, math.inf, generator)

    def marginals(self, x: torch.Tensor, mask_id: int | None = None, alpha: float = math.inf) -> torch.Tensor:
        """(B, L, V) float64: each position's marginal given the revealed tokens of x (B, L), under p*
        (p0 at α = inf); mask_id defaults to V."""
        return forward_backward(self.init, self.trans, x, self.V if mask_id is None else mask_id,
                                emission(self.V, self.toxic, alpha))

    # ------------------------------------------------------------------ exact statistics
    def exact_stats(self, alpha: float = math.inf) -> dict:
        """p*'s (p0's at α = inf) toxic rate P(count > 0), mean reward, reward sd, per-position
        marginals (L, V) and count distribution (L + 1,), the count by dynamic programming over
        (position, state, count) on target_chain."""
        start, steps = self.target_chain(alpha)
        is_toxic = torch.zeros(self.V, dtype=torch.bool)
        is_toxic[list(self.toxic)] = True
        marg = torch.empty(self.L, self.V, dtype=torch.float64)
        f = torch.zeros(self.V, self.L + 1, dtype=torch.float64)  # f[v, k] = P(x_i = v, count so far k)
        f[:, 0] = torch.where(is_toxic, 0.0, start)
        f[:, 1] = torch.where(is_toxic, start, 0.0)
        marg[0] = start
        for i in range(1, self.L):
            h = steps[i - 1].T @ f  # (V, L+1): moved to the next state, count not yet updated
            f = torch.where(is_toxic[:, None], torch.nn.functional.pad(h[:, :-1], (1, 0)), h)
            marg[i] = f.sum(1)
        count = f.sum(0)
        k = torch.arange(self.L + 1, dtype=torch.float64)
        mean = float((count * k).sum())
        sd = math.sqrt(float((count * (k - mean) ** 2).sum()))
        return {"toxic_rate": 1.0 - float(count[0]), "mean_reward": -mean, "reward_sd": sd,
                "marginals": marg, "count_distribution": count}

    def compare(self, samples: torch.Tensor, alpha: float = math.inf) -> dict:
        """Samples (n, L) against p* (p0 at α = inf): the sample mean reward and toxic rate with their
        z-scores against the exact values (exact sd; binomial for the rate), the mean over positions
        of the TV between empirical and exact marginals (of adjacent pairs: pair_tv), and the TV of
        the toxic-count distribution."""
        ex = self.exact_stats(alpha)
        samples = samples.cpu()
        n = samples.shape[0]
        counts = -self.reward()(samples)
        rate = float((counts > 0).double().mean())
        p = ex["toxic_rate"]
        emp = torch.nn.functional.one_hot(samples, self.V).double().mean(0)
        hist = torch.bincount(counts.long(), minlength=self.L + 1).double() / n
        # Adjacent pairs: the per-position marginals and the count can look right while the joint is
        # wrong (a predictor that ignores the evidence keeps every marginal); pairs are not fooled.
        _, steps = self.target_chain(alpha)
        pair = ex["marginals"][:-1, :, None] * steps  # (L-1, V, V): P(x_{i-1} = v, x_i = w)
        idx = samples[:, :-1] * self.V + samples[:, 1:]
        emp_pair = torch.nn.functional.one_hot(idx, self.V * self.V).double().mean(0)
        return {"mean_reward": -float(counts.mean()), "toxic_rate": rate,
                "z": (-float(counts.mean()) - ex["mean_reward"]) / (ex["reward_sd"] / math.sqrt(n)),
                "toxic_rate_z": (rate - p) / math.sqrt(max(p * (1 - p), 1e-300) / n),
                "marginal_tv": float(0.5 * (emp - ex["marginals"]).abs().sum(-1).mean()),
                "count_tv": float(0.5 * (hist - ex["count_distribution"]).abs().sum()),
                "pair_tv": float(0.5 * (emp_pair - pair.reshape(self.L - 1, self.V * self.V)).abs().sum(-1).mean()),
                "exact_mean_reward": ex["mean_reward"], "exact_toxic_rate": p}

    def reward(self) -> ToxicCount:
        return ToxicCount(self.toxic)

    def blame(self):
        """1.0 at each toxic token, 0 elsewhere (toy.toxic_blame): each position's share of the deficit."""
        return toxic_blame(self.toxic)


class MarkovDenoiser(torch.nn.Module):
    """The exact mask predictor of a MarkovChain's p0 (of p* with `alpha`), with toy.TableDenoiser's
    interface: input (B, P + L) ids, the last L the sequence (a prompt is ignored), mask id V; output
    float32 logits (B, P + L, V + 1), log marginals at masked positions, 0 / -inf at revealed ones,
    the mask column -inf, prompt columns 0 at token 0 and -inf elsewhere."""

    def __init__(self, chain: MarkovChain, alpha: float = math.inf):
        super().__init__()
        self.V, self.L, self.mask_id = chain.V, chain.L, chain.V
        self.register_buffer("init", chain.init.double())
        self.register_buffer("trans", chain.trans.double())
        self.register_buffer("weights", emission(chain.V, chain.toxic, alpha))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids[:, -self.L:]
        B, P = input_ids.shape[0], input_ids.shape[1] - self.L
        marg = forward_backward(self.init, self.trans, x, self.mask_id, self.weights)
        out = torch.full((B, P + self.L, self.V + 1), float("-inf"), device=input_ids.device)
        out[:, :P, 0] = 0.0
        out[:, P:, : self.V] = torch.log(marg).float()
        return out
