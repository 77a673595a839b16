"""Dream's decoding settings on LLaDA's sampler (safegen.sampling.sampler): its generation utilities'
orders (`alg`), `alg_temp`, `top_p` / `top_k` and its commits per step, as SamplingConfig settings
(docs/configuration.md, "Dream's own decoding settings")."""
from __future__ import annotations

from typing import Optional

import torch


def truncate(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Dream's token filters on logits (..., V): keep the top_k largest, then the smallest set of most
    likely tokens whose probability reaches top_p (the most likely always kept); the rest -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, index = logits.sort(dim=-1, descending=True)
        cumulative = torch.softmax(ordered, -1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, index, drop), float("-inf"))
    return logits


def confidence(order: str, p_t: torch.Tensor, picked: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Dream's confidence of each committable position under `order`, from its tempered, truncated
    distribution p_t (..., V) and the token drawn there: "maskgit_plus" the drawn token's
    probability, "topk_margin" the two most likely tokens' margin, "entropy" the negative entropy,
    "origin" minus the position's keyed uniform `u` (counts() commits those below 1 - s/t)."""
    if order == "maskgit_plus":
        return p_t.gather(-1, picked[..., None]).squeeze(-1)
    if order == "topk_margin":
        top = p_t.topk(2, dim=-1).values if p_t.shape[-1] > 1 else torch.cat([p_t, torch.zeros_like(p_t)], -1)
        return top[..., 0] - top[..., 1]
    if order == "entropy":
        return (p_t * torch.log(p_t + 1e-10)).sum(-1)
    if order == "origin":
        return -u
    raise ValueError(f"not one of Dream's orders: {order!r}")


def drawn_order(score: torch.Tensor, alg_temp: float, u: torch.Tensor) -> torch.Tensor:
    """Dream's alg_temp: the positions to commit drawn from softmax(score / alg_temp) without
    replacement. The top-n of score / alg_temp plus Gumbel noise (from the keyed uniforms `u`) is
    that draw."""
    return (score.double() / alg_temp - torch.log(-torch.log(u.double()))).float()


def counts(sampler, state) -> torch.Tensor:
    """Dream's commits at this step (its generation utilities, per row): on the time grid t_i = 1 -
    i(1 - 1e-3)/S of the block's S steps, floor(n · (1 - s/t)) of the block's n masked positions
    (s = t_{i+1}), all of them at the last step; with remasking "origin" each masked position
    commits when its uniform is below 1 - s/t (the positions `predict` ranked by that uniform)."""
    S, i = sampler.config.steps_in_block(state.block), state.step
    n = (state.gen[:, sampler.block_slice(state.block)] == sampler.mask_id).sum(1)
    if i >= S - 1:
        return n
    t, s = 1 - i * (1 - 1e-3) / S, 1 - (i + 1) * (1 - 1e-3) / S
    share = 1 - s / t
    if sampler.config.remasking == "origin":
        return (state.pred.confidence > -share).sum(1).clamp(max=n)
    return torch.floor(n.double() * share).long()
