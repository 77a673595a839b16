"""The sampling settings (SamplingConfig: LLaDA's, and which sampler runs) and the validated-update
helper that every config dataclass of safegen shares; the samplers are in safegen/sampling/sampler.py and
safegen/sampling/mdlm.py."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, updated_config  # noqa: F401 (re-exported)

# LLaDA's orders, then Dream's (its generation utilities' `alg`: the drawn token's probability, the
# margin between the two most likely tokens, the negative entropy; each on the tempered, top-p/top-k
# filtered distribution, as Dream computes them).
DREAM_ORDERS = ("maskgit_plus", "topk_margin", "entropy", "origin")
REMASKING = ("low_confidence", "random", *DREAM_ORDERS)
# How many tokens a step commits: "linear" (LLaDA's: constant, the remainder first) or "dream" (Dream's:
# floor(n · (1 - s/t)) of the n still masked on its grid of times t = 1 .. 1e-3, all at the last step).
TRANSFERS = ("linear", "dream")
# "llada": LLaDA's blocks and fixed commit counts (safegen.sampling.sampler); "mdlm": MDLM's ancestral sampler
# with the log-linear schedule over the whole answer, one block (safegen.sampling.mdlm).
SAMPLERS = ("llada", "mdlm")
# Fast-dLLM's block-wise key/value cache (sampling/fast.py): None (exact, LLaDA's reference sampler),
# "prefix" (prompt and finished blocks cached) or "dual" (the masked suffix too).
CACHES = (None, "prefix", "dual")
# What --fast (and the recommended fast setting) sets: the dual cache alone. It cuts the model FLOPs of
# plain sampling about 7.8x at G = 256 and keeps the step count fixed, so IterRef's refinement points,
# budget plans and allowances stay as computed; the threshold makes the steps depend on the model's
# confidence and commits several tokens from their separate marginals, a further departure from
# LLaDA's sampler: it stays opt-in.
FAST = {"cache": "dual"}


@dataclass
class SamplingConfig:
    """LLaDA's sampling settings, with the names of the LLaDA reference code.

    IterRef's chain stays exact (docs/method.md, "5. Exactness: when it holds") whatever the order, temperature, pace
    (tokens per step, Dream's transfer too) and block settings, with Dream's orders and alg_temp (the base sampler's only),
    and with confidence_eos_eot_inf; cfg_scale > 0, logits_eos_inf and top_p / top_k change the
    conditionals its proposals draw from, so that "p" in its target p · exp(r/α) is no longer the
    model's own distribution (the guided or truncated one); and `cache` (prefix or dual) makes the
    proposals draw from cached conditionals, so that the chain is only approximate. The default here
    (cache None) is LLaDA's reference sampler; the command line defaults to the dual cache.
    """

    max_new_tokens: int = 128  # G, the generation length (LLaDA's gen_length)
    steps: int = 128  # T, denoising steps over the whole generation
    block_length: int = 32
    temperature: float = 0.0  # 0: argmax candidates; > 0: sampling from softmax(logits / T)
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance; 0 disables it (> 0: "p" is the guided model)
    logits_eos_inf: bool = False  # forbid EOS as a candidate token (also in proposals: not exact for p)
    # Commit EOS/EOT candidates only when nothing else is left. The base sampler judges by the sampled
    # token (LLaDA's rule); IterRef's proposals by the most likely one, so that they stay exact.
    confidence_eos_eot_inf: bool = False
    sampler: str = "llada"  # one of SAMPLERS; "mdlm" has one block (the answer) and ignores remasking
    cache: str | None = None  # one of CACHES; approximate logits (docs/method.md, "Fast sampling")
    # Fast-dLLM's parallel decoding (None: off): a step commits the block's most confident candidate
    # and every other one whose probability is at least this, and a block takes the steps it needs
    # (at most its length), whatever `steps` says.
    threshold: float | None = None
    # Dream's generation settings (None: off). alg_temp > 0 commits positions drawn in proportion to
    # softmax(confidence / alg_temp) instead of the most confident ones; top_p / top_k truncate the
    # token distribution every draw comes from (the proposals' too: "p" is then the truncated model).
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    transfer: str = "linear"  # one of TRANSFERS; remasking "origin" draws its own counts (Dream's rule)

    def validate(self) -> "SamplingConfig":
        for name in ("max_new_tokens", "steps", "block_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"sampling.{name} must be a positive integer, got {value!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampling.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.threshold is not None and self.sampler == "llada":
            # Fast-dLLM's threshold ignores the step schedule: a block takes the steps it needs, at most
            # its length, so the loop (and the budget's cost model) count one step per position.
            self.steps = self.max_new_tokens
        # MDLM's sampler has one block, the whole answer, and takes any number of steps (a step may
        # unmask nothing); LLaDA's commits a fixed number of tokens a step in each block.
        if self.sampler == "llada" and self.steps > self.max_new_tokens:
            raise ConfigError(
                f"sampling.steps ({self.steps}) exceeds sampling.max_new_tokens "
                f"({self.max_new_tokens}): a step would commit nothing")
        if self.n_blocks > 1 and block_steps(self.block_lengths, self.steps) is None:
            near = sorted({total_steps(self.block_lengths, s) for s in range(1, self.block_length + 1)},
                          key=lambda t: (abs(t - self.steps), t))[:2]
            raise ConfigError(
                f"sampling.steps ({self.steps}) does not fit blocks of {self.block_lengths}: every full "
                f"block takes S steps and a shorter last one its share ceil(length·S/"
                f"{self.block_length}), so steps must be one of (n_blocks - 1)·S + that share; the "
                f"nearest are {' and '.join(map(str, sorted(near)))}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature!r}")
        if self.remasking not in REMASKING:
            raise ConfigError(f"sampling.remasking must be one of {REMASKING}, got {self.remasking!r}")
        if not (isinstance(self.cfg_scale, (int, float)) and self.cfg_scale >= 0):
            raise ConfigError(f"sampling.cfg_scale must be >= 0, got {self.cfg_scale!r}")
        if self.cache not in CACHES:
            raise ConfigError(f"sampling.cache must be one of {CACHES}, got {self.cache!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and not isinstance(self.threshold, bool) and 0 < self.threshold < 1):
            raise ConfigError(f"sampling.threshold must be None or a number in (0, 1), got {self.threshold!r}")
        if (self.cache or self.threshold is not None) and self.sampler != "llada":
            raise ConfigError("sampling.cache and sampling.threshold apply to LLaDA's block sampler only "
                              f"(sampling.sampler is {self.sampler!r})")
        if self.threshold is not None and self.remasking != "low_confidence":
            raise ConfigError("sampling.threshold compares the candidates' probabilities: it needs "
                              f"sampling.remasking 'low_confidence', got {self.remasking!r}")
        if self.alg_temp is not None and not (isinstance(self.alg_temp, (int, float))
                                               and not isinstance(self.alg_temp, bool) and self.alg_temp > 0):
            raise ConfigError(f"sampling.alg_temp must be None or a number > 0, got {self.alg_temp!r}")
        if self.transfer not in TRANSFERS:
            raise ConfigError(f"sampling.transfer must be one of {TRANSFERS}, got {self.transfer!r}")
        if (self.transfer == "dream" or self.remasking == "origin") and self.threshold is not None:
            raise ConfigError("sampling.threshold sets its own counts: not with sampling.transfer 'dream' or "
                              "remasking 'origin'")
        if self.alg_temp is not None and self.remasking in ("random", "origin"):
            raise ConfigError("sampling.alg_temp draws positions by their confidence: it needs an order that has "
                              "one (not sampling.remasking 'random')")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool)
                                           and 0 < self.top_p <= 1):
            raise ConfigError(f"sampling.top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                                           and self.top_k >= 1):
            raise ConfigError(f"sampling.top_k must be None or a positive integer, got {self.top_k!r}")
        if (self.alg_temp is not None or self.remasking in DREAM_ORDERS) and self.threshold is not None:
            raise ConfigError("sampling.threshold commits by probability alone: not with Dream's orders or alg_temp")
        if self.cache and self.cfg_scale > 0:
            raise ConfigError("sampling.cache is not implemented with sampling.cfg_scale > 0")
        return self

    def describe(self) -> str:
        """Which sampler produced a sample, as reports and the server say it: "llada" (LLaDA's reference
        sampler), "llada+dual" / "llada+prefix" (Fast-dLLM's cache), "+threshold=τ", or "mdlm"."""
        dream = (f"+{self.remasking}" if self.remasking in DREAM_ORDERS else "") + \
            ("+transfer=dream" if self.transfer == "dream" else "") + "".join(
            f"+{k}={v:g}" for k, v in (("alg_temp", self.alg_temp), ("top_p", self.top_p), ("top_k", self.top_k))
            if v is not None)
        return self.sampler + (f"+{self.cache}" if self.cache else "") + \
            (f"+threshold={self.threshold:g}" if self.threshold is not None else "") + dream

    def updated(self, **overrides) -> "SamplingConfig":
        return updated_config(self, "sampling", overrides)

    @property
    def block_size(self) -> int:
        """Positions per full block as the sampler runs it: MDLM's sampler has one block, the answer."""
        return self.max_new_tokens if self.sampler == "mdlm" else self.block_length

    @property
    def block_lengths(self) -> list[int]:
        """Tokens of each block: block_size each, the last one shorter where block_size does not
        divide max_new_tokens (one block of max_new_tokens when that is shorter than a block)."""
        G, bl = self.max_new_tokens, self.block_size
        return [min(bl, G - start) for start in range(0, G, bl)]

    @property
    def n_blocks(self) -> int:
        return -(-self.max_new_tokens // self.block_size)

    @property
    def steps_per_block(self) -> int:
        """S, the steps of a full block (of the only block when there is one): global step t of
        (block, step) is block·S + step, the last block being the only one that may be shorter."""
        if self.n_blocks == 1:
            return self.steps
        return block_steps(self.block_lengths, self.steps)

    def steps_in_block(self, block: int) -> int:
        """Steps of `block`: S, or the last block's share ceil(its length·S / block_length), which
        keeps the full blocks' tokens per step."""
        S = self.steps_per_block
        if block < self.n_blocks - 1 or self.n_blocks == 1:
            return S
        return last_block_steps(self.block_lengths, S)

    @property
    def tokens_per_step(self) -> int:
        """Commits per step in a full block (at least 1): the pace proposals re-denoise at."""
        return max(1, self.block_lengths[0] // self.steps_per_block)


def last_block_steps(lengths: list[int], S: int) -> int:
    return -(-lengths[-1] * S // lengths[0])


def total_steps(lengths: list[int], S: int) -> int:
    """T for S steps per full block over blocks of `lengths` (the first one full)."""
    return (len(lengths) - 1) * S + last_block_steps(lengths, S)


def block_steps(lengths: list[int], steps: int):
    """The S whose total_steps is `steps` (None if none): unique, total_steps growing with S."""
    for S in range(1, lengths[0] + 1):
        if total_steps(lengths, S) == steps:
            return S
    return None


def fit_lengths(base: SamplingConfig, options: dict) -> dict:
    """`options` with steps and block_length fitted to a max_new_tokens (G) that they leave unset:
    block_length stays base's (G itself when G is shorter; a last block shorter than the others
    takes the rest), and steps keep base's tokens per step: G·base.steps/base.max_new_tokens rounded
    up to the next count that fits the blocks (S per full block, the last block its share), at most
    G. With the defaults (128 tokens, 128 steps, blocks of 32), G = 127 gives blocks of 32, 32, 32
    and 31 in 127 steps, G = 48 blocks of 32 and 16 in 48 steps, and G = 16 one block of 16 steps."""
    if "max_new_tokens" not in options:
        return options
    G = options["max_new_tokens"]
    if not isinstance(G, int) or isinstance(G, bool) or G < 1:
        return options  # validation names the problem
    out = dict(options)
    if "block_length" not in out:
        out["block_length"] = min(G, base.block_length)
    bl = out["block_length"]
    if "steps" not in out and isinstance(bl, int) and not isinstance(bl, bool) and bl >= 1:
        wanted = -(-G * base.steps // base.max_new_tokens)
        lengths = SamplingConfig(max_new_tokens=G, steps=1, block_length=bl).block_lengths
        if len(lengths) == 1:
            out["steps"] = min(G, wanted)
        else:
            out["steps"] = next((T for T in (total_steps(lengths, S) for S in range(1, bl + 1)) if T >= wanted), G)
    return out


def global_step(block: int, step: int, steps_per_block: int) -> int:
    """Base steps done at (block, step) of the loop: t in 1..T at the points a hook sees after a
    commit (step 0 of a block is the previous block's finished point)."""
    return block * steps_per_block + step
