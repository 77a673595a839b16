"""What IterRef's proposals cost in denoiser rows per sample, counted at the model, at common settings.

A proposal re-denoises its m re-masked tokens one per forward, whatever the base sampler's
tokens_per_step (several holes drawn from one forward come from their separate marginals, not their
joint: docs/method.md, exactness). This script runs the sampler with IterRef on a small random mask
predictor (the rows do not depend on the weights) and counts the rows the model receives per sample:

  k=4     RefineConfig's defaults (N = 1, k = 4, rho 0.5, schedule final), no budget cap: every
          iteration draws one pool, so this is also the cost model's worst case;
  budget  the same with SafeGenerator's run-time cap of 4x plain sampling (DEFAULT_BUDGET), and
          the proposals it could afford;
and the k that planner.plan fits into 4x plain. Run it on a checkout before this change for the old
figures (the script uses nothing that changed):

    python benchmarks/proposal_cost.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safegen.research import planner  # noqa: E402
from safegen.refine.iterref import IterRef, RefineConfig  # noqa: E402
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig  # noqa: E402

VOCAB, MASK = 32, 31
SETTINGS = {  # name: (G, T, block_length)
    "LLaDA common (256 tokens, 128 steps, blocks of 32)": (256, 128, 32),
    "LLaDA 256 tokens, 64 steps, blocks of 32": (256, 64, 32),
    "SafeGenerator default (128 tokens, 128 steps, blocks of 32)": (128, 128, 32),
    "make demo (16 tokens, 16 steps, one block)": (16, 16, 16),
}
BUDGET = 4.0


class RandomPredictor(torch.nn.Module):
    """Logits that depend on the input (bidirectional mean of embeddings), from fixed random weights."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, 16, generator=g), requires_grad=False)
        self.pos = torch.nn.Parameter(torch.randn(512, 16, generator=g), requires_grad=False)
        self.out = torch.nn.Parameter(torch.randn(16, VOCAB, generator=g), requires_grad=False)

    def forward(self, input_ids):
        h = self.emb[input_ids] + self.emb[input_ids].mean(1, keepdim=True) + self.pos[:input_ids.shape[1]]
        return h @ self.out


def rows(sampling: SamplingConfig, rc: RefineConfig) -> tuple[float, float]:
    """(denoiser rows, proposals examined) of one sample."""
    hook = IterRef(rc, lambda ids: -(ids == 0).sum(1).double())
    out = DiffusionSampler(RandomPredictor(), MASK, sampling).run(torch.randint(0, 30, (1, 4)), seeds=0, hook=hook)
    return float(out.rows[0]), float(out.proposed[0])


def main() -> None:
    torch.set_num_threads(1)
    print("| setting | tokens/step | plain rows | k=4: rows (x plain) | budget 4x: rows (x plain) | "
          "budget 4x: proposals | k planned at 4x |")
    print("|---|---|---|---|---|---|---|")
    for name, (G, T, bl) in SETTINGS.items():
        sampling = SamplingConfig(max_new_tokens=G, steps=T, block_length=bl, temperature=1.0)
        rc = RefineConfig()
        free, _ = rows(sampling, rc)
        capped, proposed = rows(sampling, RefineConfig(budget=BUDGET))
        k = planner.plan(sampling, rc, BUDGET).iterations
        print(f"| {name} | {sampling.tokens_per_step} | {T} | {free:.0f} ({free / T:.2f}) | "
              f"{capped:.0f} ({capped / T:.2f}) | {proposed:.0f} | {k} |")


if __name__ == "__main__":
    main()
