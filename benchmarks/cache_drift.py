"""How far the block cache's logits drift from the uncached forward's, on the tiny model (random
weights: they say little about a trained model, whose states change less between steps).

* base sampler: at every step of a block, the cached logits (prefix, dual) of the block's masked
  positions against the full forward on the same tokens (step 0 of a block is the refresh itself);
* IterRef's cached proposals: at every sub-step, the logits of the queries (the holes, and the masks
  left for the score) against the full forward of the same proposal;
* like with like (schedule `late`): at each refinement point, the share of the current draft's masked
  positions whose x̂0 differs from a full forward's on the same draft, for the sampler's cached
  prediction (the adaptive gate's input, and the chain's reward until the chain got its own forward)
  and for what the chain scores now (its own forward, fast.ProposalCache with the head).

Per position, the softmax over the vocabulary: the largest absolute difference of a probability, and
the total variation 0.5·Σ|p - q|, reported as max and mean over positions.

    python -m benchmarks.cache_drift [--json OUT] [--quick]
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

from safegen.sampling import fast
from safegen.models.loading import load_model
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig
from safegen.models.tiny import write_tiny_model


class Drift:
    def __init__(self):
        self.max_abs, self.tv = [], []

    def add(self, cached: torch.Tensor, full: torch.Tensor) -> None:
        """cached, full: (n, V) logits of the same positions."""
        if len(cached) == 0:
            return
        p, q = torch.softmax(cached.double(), -1), torch.softmax(full.double(), -1)
        self.max_abs.append((p - q).abs().max(-1).values)
        self.tv.append(0.5 * (p - q).abs().sum(-1))

    def summary(self) -> dict:
        if not self.tv:
            return {"positions": 0}
        m, tv = torch.cat(self.max_abs), torch.cat(self.tv)
        return {"positions": len(tv), "max_abs_prob_diff": float(m.max()), "mean_abs_prob_diff_max": float(m.mean()),
                "tv_max": float(tv.max()), "tv_mean": float(tv.mean())}


class BlockDrift:
    """A hook at every step before a commit: the cached logits of the block's masks vs the full forward."""

    def __init__(self, model):
        self.model, self.at_refresh, self.later = model, Drift(), Drift()

    def applies(self, block, step, steps_in_block, t):
        return step < steps_in_block

    def __call__(self, sampler, state):
        P = state.prompt_length
        full = self.model(state.x, state.attention_mask).logits[:, P:].float()
        sl = sampler.block_slice(state.block)
        where = torch.zeros_like(state.gen, dtype=torch.bool)
        where[:, sl] = state.gen[:, sl] == sampler.mask_id
        cached = state.logits.float().clone()
        V = min(cached.shape[-1], sampler.profile.vocab_size or cached.shape[-1])
        mask_col = sampler.mask_id
        keep = [i for i in range(V) if i != mask_col]  # predict() set the mask column to -inf
        (self.at_refresh if state.step == 0 else self.later).add(cached[where][:, keep], full[where][:, keep])


def proposal_drift(model, profile, ids, attn, G, bl) -> dict:
    drift = Drift()
    original = fast.ProposalCache.logits

    def checked(self, sampler, state, gen, queries, proposals, owner):
        out = original(self, sampler, state, gen, queries, proposals, owner)
        x = torch.cat([state.x[owner, :state.prompt_length], gen], dim=1)
        a = None if state.attention_mask is None else state.attention_mask[owner]
        full = model(x, a).logits[:, state.prompt_length:]
        keep = torch.arange(out.shape[-1]) != sampler.mask_id
        drift.add(out[queries][:, keep].float(), full[queries][:, keep].float())
        return out

    fast.ProposalCache.logits = checked
    try:
        toxic = torch.tensor([5, 6, 7])
        hook = IterRef(RefineConfig(n_proposals=2, iterations=2, rho=0.5, schedule="final"),
                       lambda t: -torch.isin(t.cpu(), toxic).sum(1).double())
        cfg = SamplingConfig(max_new_tokens=G, steps=G, block_length=bl, cache="dual", temperature=1.0)
        with torch.inference_mode():
            DiffusionSampler(model, profile, cfg).run(ids, attn, seeds=0, hook=hook)
    finally:
        fast.ProposalCache.logits = original
    return drift.summary()


def mismatch(model, profile, ids, attn, G, bl, cache: str) -> dict:
    """Shares of masked x̂0 positions that differ from the full forward's on the same drafts."""
    shares = {"sampler_prediction": [], "chain_current": []}

    def full_xhat0(sampler, state, x, owner):
        a = None if state.attention_mask is None else state.attention_mask[owner]
        logits = model(x, a).logits[:, state.prompt_length:]
        return sampler.next_prediction(state, logits, x[:, state.prompt_length:], owner).xhat0

    class Measured(IterRef):
        def begin(self, sampler, state):
            self.scored = []
            chain = super().begin(sampler, state)
            if self.scored:
                owner = self.scored[-1][0].to(state.x.device)
                full = full_xhat0(sampler, state, state.x[owner], owner)
                masked = state.gen[owner] == sampler.mask_id
                if masked.any():
                    shares["sampler_prediction"].append(float((self.scored[0][1][masked] != full[masked]).double().mean()))
                    shares["chain_current"].append(float((self.scored[-1][1][masked] != full[masked]).double().mean()))
            self.scored = None
            return chain

        def score(self, state, xhat0, owner):
            if getattr(self, "scored", None) is not None:
                self.scored.append((owner.clone(), xhat0.clone()))
            return super().score(state, xhat0, owner)

    toxic = torch.tensor([5, 6, 7])
    hook = Measured(RefineConfig(n_proposals=2, iterations=2, rho=0.5, schedule="late", adaptive=False),
                    lambda t: -torch.isin(t.cpu(), toxic).sum(1).double())
    cfg = SamplingConfig(max_new_tokens=G, steps=G, block_length=bl, cache=cache, temperature=1.0)
    with torch.inference_mode():
        DiffusionSampler(model, profile, cfg).run(ids, attn, seeds=0, hook=hook)
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {k: {"points": len(v), "mean": mean(v), "max": max(v, default=float("nan"))} for k, v in shares.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    G, bl, B = (16, 4, 2) if args.quick else (64, 16, 4)
    with tempfile.TemporaryDirectory() as d:
        model, tokenizer, profile = load_model(str(write_tiny_model(d, seed=0)), quantization="none")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 3000, (B, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :4] = 0
    ids[attn == 0] = profile.fill_id
    result = {}
    for cache in ("prefix", "dual"):
        hook = BlockDrift(model)
        cfg = SamplingConfig(max_new_tokens=G, steps=G, block_length=bl, cache=cache, temperature=1.0)
        with torch.inference_mode():
            DiffusionSampler(model, profile, cfg).run(ids, attn, seeds=0, hook=hook)
        result[f"base_{cache}_at_refresh"] = hook.at_refresh.summary()
        result[f"base_{cache}_later_steps"] = hook.later.summary()
    result["iterref_dual_proposals"] = proposal_drift(model, profile, ids, attn, G, bl)
    for cache in ("prefix", "dual"):
        result[f"like_with_like_{cache}"] = mismatch(model, profile, ids, attn, G, bl, cache)
    for k, v in result.items():
        print(k, json.dumps(v))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
