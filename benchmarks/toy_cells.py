"""The toy benchmark's problems and methods: exactly enumerable setups, and one cell (a method at a
budget, or an exactness check) run on them. benchmarks/toy_exact.py plans and runs the cells."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from safegen.research import markov, planner, toy
from safegen.research.baselines import best_of_n, fk_steering, svdd
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SampleOutput, SamplingConfig
from safegen.research.toy import TableDenoiser

from benchmarks.methods import KERNELS

BUDGETS = (1, 2, 4, 8)
DEFAULT_ALPHA = 0.25
FK_EVERY = 2
SVDD_ALPHA = 0.0
SWEEP_BUDGET = 4  # the budget at which the IterRef sweeps run
EXACT_ALPHA, EXACT_K = 0.5, 32
ORDERS = ("max_prob", "low_confidence", "random")  # proposal commit orders compared


# ----------------------------------------------------------------------------- the toy problem
@dataclass(frozen=True)
class Setup:
    name: str
    V: int
    L: int
    block_length: int
    toxic: tuple = (0,)
    sharpness: float = 3.0  # random_distribution's sharpness: how peaked p0 is
    bias: float = 1.0  # p0 tilted by exp(-bias · toxic count): the base model avoids toxicity a bit
    seed: int = 1
    remasking: str = "random"  # the base sampler's order; random: plain sampling is exact for p0

    @property
    def T(self) -> int:
        return self.L  # one token per step: the regime in which plain sampling is exact

    def describe(self) -> str:
        blocks = self.L // self.block_length
        return (f"V={self.V}, L={self.L} ({self.V ** self.L} sequences), {blocks} block(s) of "
                f"{self.block_length}, T={self.T}, toxic tokens {list(self.toxic)}, p0 = "
                f"random_distribution(seed={self.seed}, sharpness={self.sharpness})"
                + (f" · exp(-{self.bias} · toxic count)" if self.bias else ""))


SETUPS = (
    Setup("single", V=4, L=6, block_length=6, sharpness=3.0, bias=1.0),
    Setup("blocks", V=3, L=8, block_length=4, sharpness=3.0, bias=2.0),
    Setup("dense", V=3, L=6, block_length=6, sharpness=1.0, bias=0.0),
)
EXACT_SETUPS = (
    Setup("exact-1", V=3, L=6, block_length=6, sharpness=1.0, bias=0.0, seed=2, remasking="low_confidence"),
    Setup("exact-3", V=3, L=6, block_length=2, sharpness=1.0, bias=0.0, seed=2, remasking="low_confidence"),
)


def make_p0(setup: Setup) -> torch.Tensor:
    base = toy.random_distribution(setup.V, setup.L, seed=setup.seed, sharpness=setup.sharpness)
    if not setup.bias:
        return base
    values = toy.toxic_count_reward(setup.V, setup.L, toxic=setup.toxic).values
    return toy.target(base, values, 1.0 / setup.bias)  # p0 · exp(-bias · count), normalised


def sampling_config(setup: Setup) -> SamplingConfig:
    """One token per step at temperature 1, in the setup's order."""
    return SamplingConfig(max_new_tokens=setup.L, steps=setup.T, block_length=setup.block_length,
                          temperature=1.0, remasking=setup.remasking)


class Problem:
    """A setup made concrete at a temperature α: p0, the reward, the target, the sampler."""

    def __init__(self, setup: Setup, alpha: float, denoiser: Optional[TableDenoiser] = None):
        self.setup, self.alpha = setup, alpha
        V, L = setup.V, setup.L
        self.reward = toy.toxic_count_reward(V, L, toxic=setup.toxic)
        self.blame = toy.toxic_blame(setup.toxic)
        self.p0 = make_p0(setup)
        self.p_star = toy.target(self.p0, self.reward.values, alpha)
        self.cfg = sampling_config(setup)
        self.denoiser = denoiser if denoiser is not None else TableDenoiser(self.p0, V, L)
        self.sampler = DiffusionSampler(self.denoiser, V, self.cfg)

    def exact_stats(self, p: torch.Tensor) -> dict:
        v = self.reward.values
        return {"mean_reward": float((p * v).sum()), "toxic_rate": float(p[v < 0].sum())}

    def measure(self, seqs: torch.Tensor) -> dict:
        r = self.reward(seqs)
        return {"mean_reward": float(r.mean()), "toxic_rate": float((r < 0).double().mean()),
                "tv": toy.tv_distance(seqs, self.p_star, self.setup.V),
                "z": toy.mean_z(r, self.reward.values, self.p_star)}


@dataclass(frozen=True)
class LongSetup:
    """The long problem: a Markov-chain p0 over L tokens (research/markov.py), toxic tokens rare at
    each position but in about half the plain answers, mostly once; several blocks."""

    name: str = "long"
    V: int = 4
    L: int = 32
    block_length: int = 8
    seed: int = 0
    toxic: tuple = (0,)
    remasking: str = "random"

    @property
    def T(self) -> int:
        return self.L

    def describe(self) -> str:
        return (f"V={self.V}, L={self.L}, {self.L // self.block_length} blocks of {self.block_length}, T={self.T}, "
                f"toxic tokens {list(self.toxic)}, p0 = markov.MarkovChain.random(V={self.V}, L={self.L}, "
                f"seed={self.seed}): P(toxic answer) 0.5")


LONG = LongSetup()


class LongProblem:
    """LongSetup at α, with Problem's interface; p* is judged by its exact statistics (forward-backward),
    not enumerated: TV is the mean per-position marginal TV (`tv`), beside the count's and pairs' TV."""

    def __init__(self, setup: LongSetup, alpha: float):
        self.setup, self.alpha = setup, alpha
        self.chain = markov.MarkovChain.random(V=setup.V, L=setup.L, seed=setup.seed, toxic=setup.toxic)
        self.reward, self.blame = self.chain.reward(), self.chain.blame()
        self.cfg = sampling_config(setup)
        self.denoiser = markov.MarkovDenoiser(self.chain)
        self.sampler = DiffusionSampler(self.denoiser, setup.V, self.cfg)

    def exact_stats(self, alpha: Optional[float] = None) -> dict:
        ex = self.chain.exact_stats(self.alpha if alpha is None else alpha)
        return {"mean_reward": ex["mean_reward"], "toxic_rate": ex["toxic_rate"]}

    def measure(self, seqs: torch.Tensor) -> dict:
        c = self.chain.compare(seqs, self.alpha)
        return {"mean_reward": c["mean_reward"], "toxic_rate": c["toxic_rate"], "tv": c["marginal_tv"],
                "z": c["z"], "toxic_rate_z": c["toxic_rate_z"], "count_tv": c["count_tv"], "pair_tv": c["pair_tv"],
                "toxic_rate_error": c["toxic_rate"] - c["exact_toxic_rate"],
                "mean_reward_error": c["mean_reward"] - c["exact_mean_reward"]}


def simulated_floor(p: torch.Tensor, n: int, reps: int = 20, seed: int = 0) -> float:
    """Mean TV of n exact (multinomial) samples of p to p, over `reps` draws: the noise floor
    without toy.expected_tv_noise's normal approximation, which overestimates it when many
    sequences have n·p << 1."""
    g = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(reps):
        counts = torch.bincount(torch.multinomial(p.double(), n, replacement=True, generator=g),
                                minlength=p.numel()).double()
        tvs.append(0.5 * float((counts / n - p.double()).abs().sum()))
    return sum(tvs) / reps


# ----------------------------------------------------------------------------- IterRef settings
@dataclass(frozen=True)
class IterRefChoice:
    """IterRef's settings at a budget; k is fitted to the budget unless given. Schedule "last": only
    the point after the last step (the same as "final" with one block)."""

    n_proposals: int = 1
    rho: float = 0.5
    schedule: str = "final"
    start: float = 0.75
    every: int = 1
    iterations: Optional[int] = None  # None: the largest k whose worst case fits the budget
    selection: str = "mh"
    remask: str = "uniform"
    blame_floor: float = RefineConfig.blame_floor
    gibbs_share: float = 0.0  # RefineConfig.gibbs_share: the share of Metropolised-Gibbs moves
    gibbs_holes: int = 1
    bar_blamed: bool = RefineConfig.bar_blamed

    def config(self, cfg: SamplingConfig, alpha: float, budget: float) -> RefineConfig:
        last = self.schedule == "last"
        rc = RefineConfig(n_proposals=self.n_proposals, iterations=1, rho=self.rho, alpha=alpha,
                          schedule="steps" if last else self.schedule, at_steps=(cfg.steps,) if last else (),
                          start=self.start, every=self.every, selection=self.selection, budget=budget,
                          proposal_holes=self.remask, blame_floor=self.blame_floor,
                          gibbs_share=self.gibbs_share, gibbs_holes=self.gibbs_holes, bar_blamed=self.bar_blamed)
        k = self.iterations if self.iterations is not None else planner.plan(cfg, rc, budget).iterations
        return rc.updated(iterations=k)


DEFAULT_ITERREF = IterRefChoice()
DEFAULT_TARGETED = IterRefChoice(remask="targeted", rho=0.5, blame_floor=0.05)

# ----------------------------------------------------------------------------- running a cell
@dataclass(frozen=True)
class Task:
    setup: str
    table: str  # "main" or a sweep's name
    method: str
    budget: int
    alpha: float
    choice: Optional[IterRefChoice] = None  # None: the method's default
    label: str = ""


def run_method(problem: Problem, method: str, budget: int, samples: int, seed: int,
               choice: Optional[IterRefChoice] = None) -> tuple[dict, SampleOutput]:
    sampler, reward, alpha = problem.sampler, problem.reward, problem.alpha
    if choice is None:
        choice = DEFAULT_TARGETED if method == "iterref_targeted" else DEFAULT_ITERREF
    ids = torch.empty((samples, 0), dtype=torch.long)
    if method == "plain":
        params = {}
        run = lambda: sampler.run(ids, seeds=seed)  # noqa: E731
    elif method == "best_of_n":
        params = {"N": budget}
        run = lambda: best_of_n(sampler, ids, reward, n=budget, seeds=seed)  # noqa: E731
    elif method == "svdd":
        params = {"M": budget, "alpha": SVDD_ALPHA}
        run = lambda: svdd(sampler, ids, reward, n_candidates=budget, alpha=SVDD_ALPHA, seeds=seed)  # noqa: E731
    elif method == "fk_steering":
        params = {"K": budget, "every": FK_EVERY, "lam": 1 / alpha}
        run = lambda: fk_steering(sampler, ids, reward, n_particles=budget, every=FK_EVERY,  # noqa: E731
                                  lam=1 / alpha, seeds=seed)
    elif method in KERNELS:
        if method == "remask_only":
            choice = replace(choice, selection="remask_only")
        rc = choice.config(problem.cfg, alpha, budget)
        params = {"N": rc.n_proposals, "k": rc.iterations, "rho": rc.rho,
                  "schedule": "last" if choice.schedule == "last" else rc.schedule, "selection": rc.selection}
        if rc.schedule == "late":
            params["start"] = rc.start
        if rc.schedule == "evenly":
            params["every"] = rc.every
        if rc.proposal_holes == "targeted":
            params["floor"] = rc.blame_floor
        hook = IterRef(rc, reward, problem.blame)
        run = lambda: sampler.run(ids, seeds=seed, hook=hook)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    seqs = out.sequences
    if seqs.shape != (samples, problem.setup.L):
        raise RuntimeError(f"{method}: expected ({samples}, {problem.setup.L}) sequences, got {tuple(seqs.shape)}")
    T = problem.cfg.steps
    proposed = float(out.proposed.sum())
    cell = {
        "method": method, "budget": budget, "params": params, "samples": samples, **problem.measure(seqs),
        "rows_mean": float(out.rows.mean()), "rows_max": float(out.rows.max()),
        "rows_budget": float(budget * T), "within_budget": bool(float(out.rows.max()) <= budget * T + 1e-9),
        "reward_calls_mean": float(out.reward_calls.mean()),
        "accept_rate": float(out.accepted.sum()) / proposed if proposed > 0 else None,
        "seconds": seconds,
    }
    return cell, out


def exactness_cell(problem: Problem, remask: str, n_proposals: int, order: str, samples: int,
                   seed: int) -> dict:
    """IterRef with RefineConfig's defaults but k, alpha, remask, N; proposals in `order`."""
    rc = RefineConfig(iterations=EXACT_K, alpha=problem.alpha, proposal_holes=remask, n_proposals=n_proposals,
                      proposal_order=order)
    hook = IterRef(rc, problem.reward, problem.blame)
    t0 = time.perf_counter()
    out = problem.sampler.run(torch.empty((samples, 0), dtype=torch.long), seeds=seed, hook=hook)
    return {"setup": problem.setup.name, "remask": remask, "N": n_proposals, "order": order,
            "k": EXACT_K, **problem.measure(out.sequences), "rows_mean": float(out.rows.mean()),
            "accept_rate": float(out.accepted.sum() / out.proposed.sum()),
            "seconds": time.perf_counter() - t0}
