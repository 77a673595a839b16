"""IterRef's settings: pools, iterations, where to refine, how to re-mask, order and select, the
budget; and the named presets. `RefineConfig()` is the "exact" preset (the chain targets p · exp(r/α));
SafeGenerator and the CLI run the "middleware" preset (PRESETS below, with the policy's α)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, updated_config
from ..sampling.config import global_step

SCHEDULES = ("late", "evenly", "final", "steps")
SCOPES = ("block", "all")
SELECTIONS = ("mh", "mtm", "mtm_reuse", "greedy", "remask_only")
REMASKS = ("uniform", "targeted")  # proposal_holes: which decoded tokens a proposal re-masks
PROPOSAL_ORDERS = ("max_prob", "random", "low_confidence")
# Former field names, still accepted by updated() and SafeGenerator's keywords.
RENAMED_FIELDS = {"remask": "proposal_holes"}


def renamed(options: dict) -> dict:
    """`options` with former field names replaced by the current ones (the current name wins)."""
    if not any(k in options for k in RENAMED_FIELDS):
        return options
    out = {RENAMED_FIELDS.get(k, k): v for k, v in options.items() if k in RENAMED_FIELDS}
    return {**out, **{k: v for k, v in options.items() if k not in RENAMED_FIELDS}}


# α, the temperature of the target p · exp(r/α): the one code default. A policy's YAML may set its
# own (reward.alpha); SafeGenerator then uses the policy's.
DEFAULT_ALPHA = 0.1


@dataclass
class RefineConfig:
    """IterRef's settings. The chain at the last point targets p · exp(r/α) exactly (in the limit of
    many iterations) only with selection "mh", proposal_temperature 1, adaptive off and a budget
    that does not cut it short (None, or at least research/planner.py's worst_case_cost): the defaults here, not
    SafeGenerator's (adaptive, budget 4); and on LLaDA's reference sampler (SamplingConfig cache=None:
    with Fast-dLLM's cache, the command line's default, proposals draw from cached conditionals and
    the chain is approximate). Every condition: docs/method.md, "5. Exactness: when it holds"."""

    # Defaults from benchmarks/toy_exact.py (RESULTS.md): at equal rows N = 1 beat every larger pool
    # (an accepted pool's unexamined members are rows spent for nothing), rho 0.5 had the lowest
    # toxic rate on average, and "final" (exact reward) was best or within 0.011 of the best schedule
    # with targeted re-masking; refining each finished block, not only the last, paid on two blocks.
    n_proposals: int = 1  # N, proposals per pool
    iterations: int = 4  # k, kernel applications per refined step
    rho: float = 0.5  # share of the decoded tokens in scope that a proposal re-masks (at least 1)
    alpha: float = DEFAULT_ALPHA  # α, the temperature of the target p · exp(r/α)
    schedule: str = "final"  # where to refine: late | evenly | final | steps (docs/method.md, "Decisions and why")
    start: float = 0.75  # late: refine once this share of the block is decoded
    every: int = 1  # evenly: refine after every m-th step
    at_steps: tuple = ()  # schedule "steps": base steps (1..T) after which to refine
    # Re-mask the current block only, or "all" generated tokens so far. The point after the last
    # step always spans the whole answer, so that the last chain targets p* over all of it.
    scope: str = "block"
    # Which decoded tokens a proposal re-masks (its holes): uniform (the paper's) | targeted: positions
    # in proportion to ε + (1 − ε)·blame, which needs IterRef's `blame`. Uniform stays the default
    # here because a blame is optional. (Formerly `remask`, still accepted by updated(); not to be
    # confused with SamplingConfig.remasking, LLaDA's order of commits within a step.)
    proposal_holes: str = "uniform"
    blame_floor: float = 0.05  # ε: no decoded position is ever impossible to re-mask
    # mh (exact) | mtm: Multiple-Try Metropolis, N tries sharing one hole set, one chosen by
    # exp(r/α), with N − 1 backward draws (exact, 2N − 1 proposals an iteration) | mtm_reuse: the tries
    # not chosen serve as the backward draws (exact here, N proposals: refine/moves.py) | greedy | remask_only
    # (ablations with other targets: docs/method.md, "3. The kernel")
    selection: str = "mh"
    # The share of iterations that make the Metropolised-Gibbs move (refine/moves.py) instead of the
    # re-mask-and-redraw move: re-mask `gibbs_holes` tokens and re-draw each with its current token
    # barred, so that no proposal is a copy of the draft. Iteration i (0-based) is a Gibbs move when
    # floor((i + 1)·share) > floor(i·share): a fixed interleave, so costs are known in advance, and
    # each move leaves p* invariant, so the composition does.
    # With targeted holes, the re-mask move bars the current token at the hole the blame holds most at
    # fault (blame >= 0.5), committed first: a toxic token cannot be re-drawn as itself, at no extra
    # forward (refine/moves.py). An option: ahead of the move without it in every cell of
    # benchmarks/toy_moves.py, but not ahead of every baseline there, and level or slightly behind on
    # the tiny RTP audit (RESULTS.md, "IterRef's moves"). Uniform holes read no blame, and
    # Multiple-Try Metropolis weighs its tries as unbarred draws: with either it changes nothing.
    bar_blamed: bool = False
    gibbs_share: float = 0.0
    gibbs_holes: int = 1  # tokens a Gibbs move re-draws (the reverse path costs gibbs_holes − 1 more forwards)
    # Proposals must be stochastic even when sampling is greedy; only 1 draws from the model's own
    # conditional, which the acceptance assumes (another value is not exact).
    proposal_temperature: float = 1.0
    # The order a proposal commits its holes in (see iterref.py, "How a proposal re-commits its
    # holes"): max_prob (the most likely token's probability, LLaDA's order at temperature 0) and
    # random are exact; low_confidence (LLaDA's: the sampled token's probability) is not, and is here
    # for the benchmark that shows it.
    proposal_order: str = "max_prob"
    # Skip / stop rows that no longer need refining: by the reward's own verdict when it returns a
    # refine.Judged (a policy's "toxic": SafeGenerator's case), else once their reward reaches
    # accept_reward. Knowing costs one reward call per row at every refined point, also for the rows
    # it then skips. A stop that depends on the state: not exact.
    adaptive: bool = False
    accept_reward: Optional[float] = None  # adaptive mode's bar for a reward that gives no verdict
    # Cap on denoiser rows per sample, as a multiple of T. Exact only if it does not stop the last
    # point's chain early.
    budget: Optional[float] = None

    def validate(self) -> "RefineConfig":
        def positive_int(name, minimum):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"refine.{name} must be an integer >= {minimum}, got {v!r}")

        positive_int("n_proposals", 1)
        positive_int("iterations", 0)
        positive_int("every", 1)
        positive_int("gibbs_holes", 1)
        if not (isinstance(self.gibbs_share, (int, float)) and not isinstance(self.gibbs_share, bool)
                and 0 <= self.gibbs_share <= 1):
            raise ConfigError(f"refine.gibbs_share must be in [0, 1], got {self.gibbs_share!r}")
        if self.gibbs_share > 0 and self.selection in ("mtm", "mtm_reuse"):
            raise ConfigError(f"refine.selection {self.selection!r} runs the re-mask move only: set refine.gibbs_share to 0")
        if not isinstance(self.bar_blamed, bool):
            raise ConfigError(f"refine.bar_blamed must be true or false, got {self.bar_blamed!r}")
        if (self.gibbs_share > 0 or (self.bar_blamed and self.proposal_holes == "targeted")) and self.proposal_temperature == 0:
            raise ConfigError("refine.gibbs_share > 0 and refine.bar_blamed (with targeted holes) need "
                              "refine.proposal_temperature > 0 (a barred hole is drawn among the tokens other than "
                              "its current one); set refine.bar_blamed false for deterministic proposals")
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
        if self.proposal_holes not in REMASKS:
            raise ConfigError(f"refine.proposal_holes must be one of {REMASKS}, got {self.proposal_holes!r}")
        if self.proposal_order not in PROPOSAL_ORDERS:
            raise ConfigError(f"refine.proposal_order must be one of {PROPOSAL_ORDERS}, got {self.proposal_order!r}")
        if not (isinstance(self.blame_floor, (int, float)) and 0 < self.blame_floor <= 1):
            raise ConfigError(f"refine.blame_floor must be in (0, 1], got {self.blame_floor!r}")
        if not (isinstance(self.proposal_temperature, (int, float)) and self.proposal_temperature >= 0):
            raise ConfigError(f"refine.proposal_temperature must be >= 0, got {self.proposal_temperature!r}")
        if self.accept_reward is not None and not (isinstance(self.accept_reward, (int, float))
                                                   and not isinstance(self.accept_reward, bool)):
            raise ConfigError(f"refine.accept_reward must be a number, got {self.accept_reward!r}")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and self.budget >= 1):
            raise ConfigError(f"refine.budget must be >= 1 (a multiple of plain sampling's cost), got {self.budget!r}")
        return self

    @classmethod
    def preset(cls, name: str, **overrides) -> "RefineConfig":
        """A named preset (PRESETS) with some fields replaced: `RefineConfig.preset("middleware", alpha=0.2)`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown refinement preset {name!r}; known: {sorted(PRESETS)}")
        return cls().updated(**{**PRESETS[name], **overrides})

    def updated(self, **overrides) -> "RefineConfig":
        overrides = renamed(overrides)
        if "at_steps" in overrides:
            overrides["at_steps"] = tuple(overrides["at_steps"])
        return updated_config(self, "refine", overrides)

    def gibbs_at(self, iteration: int) -> bool:
        """Is iteration `iteration` (0-based) of a point a Metropolised-Gibbs move (gibbs_share)?"""
        return int((iteration + 1) * self.gibbs_share + 1e-9) > int(iteration * self.gibbs_share + 1e-9)

    def applies(self, block: int, step: int, steps_per_block: int, t: Optional[int] = None) -> bool:
        """Is the kernel applied after `step` commits of `block`? Points are steps 1..S of a block
        (S = steps_per_block, the block's own step count: a shorter last block has fewer); step 0 of a
        block is the same draft as the previous block's finished point. t: the global step (default
        block·S + step, right when every block has S steps)."""
        if step < 1:
            return False
        if t is None:
            t = global_step(block, step, steps_per_block)
        if self.schedule == "late":
            return step / steps_per_block >= self.start
        if self.schedule == "evenly":
            return t % self.every == 0
        if self.schedule == "final":
            return step == steps_per_block
        return t in self.at_steps


# What runs, by name. "exact": the defaults above, under which the chain targets p · exp(r/α).
# "middleware": what SafeGenerator and the CLI run (with the policy's α): it re-masks the tokens the
# policy blames (better than uniform at equal rows on both benchmarks, benchmarks/RESULTS.md), refines
# only samples the policy rejects, and caps a sample at 4x plain sampling's denoiser rows. Both of the
# latter make the chain inexact (docs/method.md, "When the chain is exact").
PRESETS = {
    "exact": {},
    "middleware": {"proposal_holes": "targeted", "adaptive": True, "budget": 4.0},
}
