"""Keys and values of LLaDA's attention kept between forwards, and forwards that run only some positions.

LLaDA attends bidirectionally, so no position's key or value is exact once any token changes. Fast-dLLM
(Wu et al. 2025) observes that outside the block being denoised they change little across the block's
steps, and reuses them: `prefill` runs every position once and keeps each layer's (rotated) keys and
values; `forward_queries` then runs only the query positions, each layer attending from them to the
kept keys and values of every other position and to the queries' own fresh ones. With the cache made
from the very tokens the queries then run on, a query's logits are the full forward's (up to float
rounding of a matmul over fewer rows): that is the test that the plumbing is right.

The functions take a family's cache view (LLaDABackbone itself; DreamModel.cache_view()): its
embedding, its blocks (each with project and finish), its head, and whether it is shifted (Dream's
position i - 1 predicts token i, which the cached forwards follow as its own forward does).

Positions follow LLaDABackbone.forward: a padded row's real tokens are packed to positions 0..n-1 (in
order), the cache is held in that packed order, and queries are named by their unpacked position, so
a row's result does not depend on its neighbours' padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .attention import attend
from .rope import rotary_angles

__all__ = ["CacheView", "CachedForwards", "packed_states", "KVCache", "prefill", "prefill_many", "forward_queries", "forward_queries_many", "shifted_width"]


@dataclass
class KVCache:
    """Per layer, keys and values (B, n_kv_heads, L, head_dim) after RoPE, in packed order."""

    keys: list
    values: list
    slot: torch.Tensor  # (B, L) long: packed index of each (unpacked) position
    key_mask: Optional[torch.Tensor]  # (B, 1, 1, L) bool over packed keys; None: all attended
    cos: torch.Tensor  # (L, head_dim) float32, RoPE angles of packed positions 0..L-1
    sin: torch.Tensor
    # (B, L) the tokens the cache was made from, unpacked: a shifted family (Dream) reads the token
    # before a query there when that position is not a query itself.
    tokens: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return self.slot.shape[1]

    def select(self, index: torch.Tensor) -> "KVCache":
        """The cache of rows `index` (a row may appear several times: IterRef's proposals)."""
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values], self.slot[index],
                       None if self.key_mask is None else self.key_mask[index], self.cos, self.sin,
                       None if self.tokens is None else self.tokens[index])


def _block(block, x, cos, sin, key_mask):
    """LLaDABlock's computation for the whole sequence x (B, L, d), whose RoPE angles are cos/sin;
    returns the block's output and its keys and values (n_kv heads)."""
    q, k, v = block.project(x, cos, sin)
    att = attend(q, k, v, key_mask, block.n_heads // block.n_kv_heads)
    return block.finish(x, att), k, v


def _packing(attention_mask, shape, device):
    """(order, slot, real) of LLaDABackbone's packing: order[b, i] is the unpacked position at packed
    index i, slot its inverse; real (B, L) bool in packed order, None when nothing is padded."""
    B, L = shape
    if attention_mask is None or bool(attention_mask.bool().all()):
        ar = torch.arange(L, device=device).expand(B, L).clone()  # a tensor of its own: rows get replaced
        return ar, ar, None
    real = attention_mask.bool()
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    slot = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=device).expand(B, L))
    return order, slot, real.gather(1, order)


def packed_states(run, input_ids, attention_mask=None):
    """run(ids, real) on each row's real tokens moved to the front (stable: their order kept), its
    output (B, L, ...) moved back: a row's tokens sit at positions 0..n-1 whatever its neighbours'
    padding (LLaDABackbone.forward says why that matters in bf16). Unpadded batches run as they are,
    with real None."""
    real = None if attention_mask is None else attention_mask.bool()
    if real is None or bool(real.all()):
        return run(input_ids, None)
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    packed = run(input_ids.gather(1, order), real.gather(1, order))
    return torch.empty_like(packed).scatter_(1, order[..., None].expand_as(packed), packed)


class CacheView:
    """A Qwen-layout family's view for the functions here: `embed_tokens`, `layers` and `norm` on the
    backbone, `lm_head` on the model; `shifted`: position i - 1 predicts token i (Dream)."""

    def __init__(self, model, shifted: bool):
        self.model, self.config, self.shifted = model, model.config, shifted
        self.cache_blocks = model.model.layers

    def embed(self, input_ids):
        return self.model.model.embed_tokens(input_ids)

    def head(self, x):
        return self.model.lm_head(self.model.model.norm(x))


class CachedForwards:
    """The block-wise cache's forwards for a model class (Fast-dLLM's prefix and dual caches), through
    its `cache_view()`: what safegen.sampling.fast and safegen.engine call."""

    def cache_view(self):
        raise NotImplementedError

    def prefill(self, input_ids, attention_mask=None, logits_from: int = 0):
        """(logits of positions logits_from.., KVCache): the full forward, keeping keys and values."""
        return prefill(self.cache_view(), input_ids, attention_mask, logits_from)

    def prefill_many(self, calls):
        """prefill of several (input_ids, attention_mask, logits_from) in one pass: [(logits, KVCache)]."""
        return prefill_many(self.cache_view(), calls)

    def forward_queries(self, query_ids, positions, cache):
        """Logits (B, Q, V) of only the query positions (B, Q), attending to `cache` for the rest."""
        return forward_queries(self.cache_view(), query_ids, positions, cache)

    def forward_queries_many(self, calls):
        """forward_queries of several (query_ids, positions, cache) in one pass: a list of logits."""
        return forward_queries_many(self.cache_view(), calls)


def prefill(backbone, input_ids, attention_mask=None, logits_from: int = 0):
    """The full forward of a family's backbone (every position a query) that also keeps each layer's
    keys and values. Returns (logits of positions logits_from.. (B, L - logits_from, V), KVCache).
    The backbone is a family's cache view: `embed`, `cache_blocks` (each with project and finish),
    `head` (final norm and output head), `config` (head_dim, rope_theta) and `shifted` (position i - 1
    predicts token i: Dream)."""
    B, L = input_ids.shape
    order, slot, real = _packing(attention_mask, input_ids.shape, input_ids.device)
    cfg = backbone.config
    cos, sin = rotary_angles(L, cfg.head_dim, cfg.rope_theta, input_ids.device)
    key_mask = None if real is None else (real | ~real.any(-1, keepdim=True))[:, None, None, :]
    x = backbone.embed(input_ids.gather(1, order))
    keys, values = [], []
    for block in backbone.cache_blocks:
        x, k, v = _block(block, x, cos, sin, key_mask)
        keys.append(k)
        values.append(v)
    if backbone.shifted:  # among the real tokens (packed first), as the family's own forward shifts
        x = torch.cat([x[:, :1], x[:, :-1]], dim=1)
    # Back to unpacked order, then the head on the positions asked for only (d_model wide until then).
    x = torch.empty_like(x).scatter_(1, order[..., None].expand_as(x), x)[:, logits_from:]
    return backbone.head(x), KVCache(keys, values, slot, key_mask, cos, sin,
                                     input_ids.clone() if backbone.shifted else None)


def prefill_many(backbone, calls):
    """prefill of several (input_ids, attention_mask, logits_from), in one pass (safegen/engine.py
    merges the forwards of generations that run side by side): the sequences left padded to the
    longest, run together, and each call given back its own logits and a cache in its own layout
    (its width, its packing), as its own prefill makes them. A list of (logits, KVCache)."""
    if len(calls) == 1:
        return [prefill(backbone, *calls[0])]
    width = max(ids.shape[1] for ids, _, _ in calls)
    tail = max(ids.shape[1] - start for ids, _, start in calls)  # the most head positions asked
    ids, masks = [], []
    for input_ids, mask, _ in calls:
        pad = width - input_ids.shape[1]
        mask = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.dtype)
        ids.append(torch.nn.functional.pad(input_ids, (pad, 0), value=0))
        masks.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
    logits, merged = prefill(backbone, torch.cat(ids), torch.cat(masks), logits_from=width - tail)
    out, start = [], 0
    for input_ids, mask, logits_from in calls:
        n, length = input_ids.shape
        rows = slice(start, start + n)
        start += n
        # Packed order puts a row's real tokens first wherever its padding was, so its first `length`
        # packed keys are what its own prefill keeps; its own packing names them.
        _, slot, real = _packing(mask, input_ids.shape, input_ids.device)
        key_mask = None if real is None else (real | ~real.any(-1, keepdim=True))[:, None, None, :]
        cache = KVCache([k[rows, :, :length].contiguous() for k in merged.keys],
                        [v[rows, :, :length].contiguous() for v in merged.values], slot, key_mask,
                        merged.cos[:length], merged.sin[:length], None if merged.tokens is None else input_ids.clone())
        out.append((logits[rows, tail - (length - logits_from):], cache))
    return out


def forward_queries(backbone, query_ids, positions, cache: KVCache):
    """Logits (B, Q, V) of the tokens query_ids (B, Q) at the unpacked positions `positions` (B, Q),
    attending to the cache's keys and values of every other position and to their own."""
    return forward_queries_many(backbone, [(query_ids, positions, cache)])[0]


def forward_queries_many(backbone, calls):
    """forward_queries for several (query_ids, positions, cache), in one pass (safegen/engine.py merges
    the forwards of generations that run side by side): their query tokens, however many each row
    has, go through every token-wise layer (norms, projections, RoPE, the MLP, the head) as one
    sequence, one weight read for all, and each call's rows attend to their own cache only. A list
    of logits, one (B_i, Q_i, V) per call.

    A shifted family (Dream: position i - 1 predicts token i) also runs the position before each
    query, whose state gives the query's logits: the one before a block, or before each hole."""
    if not backbone.shifted:
        return [backbone.head(x) for x in _query_states(backbone, calls)]
    runs, picks = [], []
    for ids, positions, cache in calls:
        before = (positions - 1).clamp(min=0)  # the first position keeps its own state, as in Dream's code
        if shifted_width(positions) == positions.shape[1] + 1:
            run = torch.cat([before[:, :1], positions], dim=1)  # a block: one position more
        else:
            run = torch.cat([before, positions], dim=1)  # holes: the position before each (duplicates agree)
        pick = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        tokens = cache.tokens.scatter(1, positions, ids)  # queries' tokens are current, the rest the cache's
        runs.append((tokens.gather(1, run), run, cache))
        picks.append(pick)
    states = _query_states(backbone, runs)
    return [backbone.head(x.gather(1, pick[..., None].expand(-1, -1, x.shape[-1])))
            for x, pick in zip(states, picks)]


def shifted_width(positions: torch.Tensor) -> int:
    """How many positions a shifted family's cached forward runs for the queries `positions` (B, Q):
    a block (every row's positions consecutive, none the first) one more, scattered holes twice as
    many (each and the one before it). What the FLOP accounting charges (sampling/fast.py)."""
    Q = positions.shape[1]
    if Q > 0 and bool((positions[:, 1:] - positions[:, :-1] == 1).all()) and bool((positions[:, 0] > 0).all()):
        return Q + 1
    return 2 * Q


def _query_states(backbone, calls):
    """The last layer's states (B_i, Q_i, d) of each call's queries, before the head."""
    caches = [cache for _, _, cache in calls]
    slots = [cache.slot.gather(1, positions) for _, positions, cache in calls]
    if len(calls) == 1:  # alone: in the call's own (B, Q) layout, no copies
        (ids, _, cache), s = calls[0], slots[0]
        cos, sin = cache.cos[s][:, None], cache.sin[s][:, None]
        x = backbone.embed(ids)
        for layer, block in enumerate(backbone.cache_blocks):
            q, k, v = block.project(x, cos, sin)
            x = block.finish(x, _attend_cached(block, layer, q, k, v, cache, s))
        return [x]
    shapes = [tuple(ids.shape) for ids, _, _ in calls]
    # All query tokens as one row (1, T, d): each token keeps its own RoPE angles.
    cos = torch.cat([c.cos[s].reshape(-1, c.cos.shape[-1]) for c, s in zip(caches, slots)])[None, None]
    sin = torch.cat([c.sin[s].reshape(-1, c.sin.shape[-1]) for c, s in zip(caches, slots)])[None, None]
    x = backbone.embed(torch.cat([ids.reshape(-1) for ids, _, _ in calls]))[None]
    for layer, block in enumerate(backbone.cache_blocks):
        q, k, v = block.project(x, cos, sin)  # (1, heads, T, head_dim)
        parts, start = [], 0
        for cache, s, (n, width) in zip(caches, slots, shapes):
            tokens = slice(start, start + n * width)
            start += n * width
            rows = [a[0, :, tokens].unflatten(1, (n, width)).transpose(0, 1) for a in (q, k, v)]
            att = _attend_cached(block, layer, *rows, cache, s)  # (n, heads, width, head_dim)
            parts.append(att.transpose(0, 1).flatten(1, 2))
        x = block.finish(x, torch.cat(parts, dim=1)[None])
    out, start = [], 0
    for n, width in shapes:
        out.append(x[0, start:start + n * width].unflatten(0, (n, width)))
        start += n * width
    return out


def _attend_cached(block, layer: int, q, k, v, cache: KVCache, slots):
    """Attention of the queries q (B, heads, Q, head_dim) at `slots` (B, Q) to the cache's keys and
    values of layer `layer`, with the queries' own (k, v) in their slots (a copy: the cache is shared
    by every step of its block, and by a pool's proposals)."""
    index = slots[:, None, :, None].expand(-1, block.n_kv_heads, -1, block.head_dim)
    keys = cache.keys[layer].scatter(2, index, k)
    values = cache.values[layer].scatter(2, index, v)
    return attend(q, keys, values, cache.key_mask, block.n_heads // block.n_kv_heads)
