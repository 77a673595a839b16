"""What the sampler passes around: a batch in flight (SamplerState), what one forward says about it
(Prediction), the step-hook protocol refinement plugs into (StepHook), and the result (SampleOutput)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Protocol

import torch


@dataclass
class Prediction:
    """What one forward says about a state, in the generation region (n, G).

    candidates: the token each committable position would take (sampled); elsewhere x̂0.
    confidence: the commit score of committable positions, -inf elsewhere.
    xhat0: the predicted clean sequence (masks filled by argmax), which IterRef's reward reads.
    """

    candidates: torch.Tensor
    confidence: torch.Tensor
    xhat0: torch.Tensor

    def select(self, index: torch.Tensor) -> "Prediction":
        return Prediction(self.candidates[index], self.confidence[index], self.xhat0[index])


@dataclass
class SamplerState:
    """A batch in flight. Row i's generation region is x[i, prompt_length:]."""

    x: torch.Tensor  # (B, P+G) token ids, prompt left padded
    attention_mask: Optional[torch.Tensor]  # (B, P+G) or None when nothing is padded
    prompt_length: int
    keys: torch.Tensor  # (B,) per-row random keys (rng.seed_keys of the row seeds)
    block: int = 0
    step: int = 0  # step within the block; == its steps_in_block at the "block finished" point
    pred: Optional[Prediction] = None  # prediction at x for the next commit; None when stale
    logits: Optional[torch.Tensor] = None  # logits of x (generation region); None once x changed
    # MDLM's sampler keeps `logits` across steps: (B,) the rows whose logits are still those of x.
    fresh: Optional[torch.Tensor] = None
    # Accounting per row (docs/cost.md): denoiser rows, reward texts, proposals.
    rows: torch.Tensor = None
    reward_calls: torch.Tensor = None
    proposed: torch.Tensor = None
    accepted: torch.Tensor = None
    flops: torch.Tensor = None  # model FLOPs (safegen.models.flops; 0 for models of unknown shape)
    kv: Optional[Any] = None  # the cached sampler's block cache (sampling/fast.py BlockCache), if any

    def __post_init__(self):
        for name in ("rows", "reward_calls", "proposed", "accepted", "flops"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.x.shape[0], dtype=torch.float64))

    @property
    def gen(self) -> torch.Tensor:
        return self.x[:, self.prompt_length:]

    def copy(self) -> "SamplerState":
        s = replace(self, x=self.x.clone())
        for name in ("rows", "reward_calls", "proposed", "accepted", "flops"):
            setattr(s, name, torch.zeros_like(getattr(self, name)))
        return s

    def concat(self, other: "SamplerState") -> "SamplerState":
        """This state's rows, then `other`'s (at the same point): tokens, keys, predictions, the rows and
        FLOPs spent, and the block cache where both hold one of the same block (sampling/fast.py)."""
        cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        p, q = self.pred, other.pred
        return SamplerState(
            x=cat(self.x, other.x), attention_mask=cat(self.attention_mask, other.attention_mask),
            prompt_length=self.prompt_length, keys=cat(self.keys, other.keys), block=self.block, step=self.step,
            pred=Prediction(*(cat(getattr(p, f), getattr(q, f)) for f in ("candidates", "confidence", "xhat0"))),
            rows=cat(self.rows, other.rows), flops=cat(self.flops, other.flops),
            kv=None if self.kv is None or other.kv is None else self.kv.concat(other.kv))


class StepHook(Protocol):
    """An extension of the sampler at chosen (block, step) points.

    `applies(block, step, steps_in_block, t)` is asked before each commit (step < steps_in_block) and
    once when a block is finished (step == steps_in_block); steps_in_block is the block's own step
    count (a shorter last block has fewer) and t the global step (SamplingConfig.steps_per_block ·
    block + step). When it answers True the sampler calls
    `hook(sampler, state)` with `state.pred` fresh for `state.x` (and `state.logits`, unless x has no
    mask left and needed no forward). The hook may
    replace `state.x` and `state.pred` (keeping every row's number of decoded tokens) and must add
    what it spends to the state's accounting tensors.
    """

    def applies(self, block: int, step: int, steps_in_block: int, t: int) -> bool: ...

    # `sampler` is the DiffusionSampler (or subclass) running the loop; typed as Any because this
    # module sits below sampler.py and must not import it.
    def __call__(self, sampler: Any, state: SamplerState) -> None: ...


@dataclass
class SampleOutput:
    sequences: torch.Tensor  # (B, P+G) prompt + generation, stop-cut and padded
    rows: torch.Tensor  # (B,) denoiser rows spent per sample (safegen.refine.cost)
    reward_calls: torch.Tensor  # (B,) texts scored by the reward per sample
    proposed: torch.Tensor  # (B,) refinement proposals examined
    accepted: torch.Tensor  # (B,) refinement proposals accepted
    seconds: float  # wall time of the whole batch
    # Plain sampling of the same prompts and seeds, forked where refinement first applied.
    plain_sequences: Optional[torch.Tensor] = None
    plain_rows: Optional[torch.Tensor] = None  # extra denoiser rows the plain branch cost
    flops: Optional[torch.Tensor] = None  # (B,) model FLOPs per sample (safegen.models.flops)
    plain_flops: Optional[torch.Tensor] = None  # extra FLOPs of the plain branch
