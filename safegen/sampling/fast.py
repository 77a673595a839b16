"""Fast sampling (Fast-dLLM, Wu et al. 2025), training-free: the sampler's block-wise key/value cache
and confidence-threshold parallel decoding. Both are off by default (SamplingConfig cache=None,
threshold=None), which is LLaDA's reference sampler, unchanged.

* cache "prefix": at a block's first forward, one full forward (safegen.models.kvcache.prefill) keeps every
  position's keys and values; the block's later steps run the block and everything after it as
  queries against the kept keys and values of the prompt and the finished blocks.
* cache "dual": the masked suffix is kept too; a step runs only the block's positions.
  Positions that are not queries keep the logits of the block's full forward (x̂0 there is only read
  by refinement's reward, and is a mask's argmax either way).
* A row's cache is refreshed, alone, whenever one of its cached (non-query) tokens differs from the
  tokens it was made from (a refinement hook changed them), so that a row's output depends only on its
  own history, never on its neighbours'.
* threshold τ, as in Fast-dLLM: a step commits the block's most confident candidate and every other
  committable position whose candidate's probability is at least τ, and a block runs until nothing
  is left in it, ignoring the step schedule: SamplingConfig gives a block as many steps as its length
  (at least one commit a step), and once a block is done its remaining steps make no forward. With
  confidence_eos_eot_inf an EOS/EOT candidate's confidence is -inf, so it never counts as above τ:
  it is committed only as a step's one most confident candidate, when every position left in the
  block proposes EOS/EOT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import engine
from ..errors import ArgumentError
from ..models import flops
from ..models.kvcache import KVCache


@dataclass
class BlockCache:
    """SamplerState.kv of the cached sampler: per row, the cache and what it was made from."""

    block: int  # the block whose steps it serves
    x: torch.Tensor  # (n, P+G) the tokens of each row's last refresh
    logits: torch.Tensor  # (n, G, V) the generation region's logits at that refresh
    cache: KVCache

    def select(self, index: torch.Tensor) -> "BlockCache":
        return BlockCache(self.block, self.x[index], self.logits[index], self.cache.select(index))

    def assign(self, index: torch.Tensor, other: "BlockCache") -> None:
        """Rows `index` replaced by `other`'s (a refresh of those rows only)."""
        self.x[index], self.logits[index] = other.x, other.logits
        c, o = self.cache, other.cache
        for mine, theirs in ((c.keys, o.keys), (c.values, o.values)):
            for layer in range(len(mine)):
                mine[layer][index] = theirs[layer]
        c.slot[index] = o.slot
        if c.key_mask is not None:
            c.key_mask[index] = o.key_mask if o.key_mask is not None else True

    def concat(self, other: "BlockCache") -> Optional["BlockCache"]:
        """The caches of two row sets, this one's first (None unless both serve the same block)."""
        if self.block != other.block:
            return None
        ca, cb = self.cache, other.cache
        mask = None
        if ca.key_mask is not None or cb.key_mask is not None:
            full = lambda c, n: c.key_mask if c.key_mask is not None else torch.ones(  # noqa: E731
                n, 1, 1, c.length, dtype=torch.bool, device=c.slot.device)
            mask = torch.cat([full(ca, len(self.x)), full(cb, len(other.x))])
        cache = KVCache([torch.cat(p) for p in zip(ca.keys, cb.keys)], [torch.cat(p) for p in zip(ca.values, cb.values)],
                        torch.cat([ca.slot, cb.slot]), mask, ca.cos, ca.sin)
        return BlockCache(self.block, torch.cat([self.x, other.x]), torch.cat([self.logits, other.logits]), cache)


def check_cacheable(sampler) -> None:
    """The cache needs a model with prefill/forward_queries (LLaDA's and Dream's classes) whose logits
    need no shift by the sampler (remote-code Dream's do)."""
    if not (hasattr(sampler.model, "prefill") and hasattr(sampler.model, "forward_queries")):
        raise ArgumentError(f"sampling.cache={sampler.config.cache!r} needs a model with prefill() and "
                            f"forward_queries() (safegen's LLaDA and Dream classes); {type(sampler.model).__name__} "
                            "has none: use cache=None")
    if sampler.profile.shift_logits:
        raise ArgumentError("sampling.cache is not implemented for shifted-logit (Dream-style) models")


def query_positions(sampler, block: int, P: int) -> slice:
    """The generation-region slice a cached step runs: the block (dual) or the block onwards (prefix)."""
    sl = sampler.block_slice(block)
    return slice(sl.start, sl.stop if sampler.config.cache == "dual" else sampler.config.max_new_tokens)


def cached_logits(sampler, state) -> torch.Tensor:
    """Logits (n, G, V) of the generation region for the next commit, from the block cache; charges
    the state's rows (one forward each) and FLOPs (what the forward computed)."""
    x, P, attn = state.x, state.prompt_length, state.attention_mask
    n = x.shape[0]
    block = sampler.next_block(state)
    if block >= sampler.config.n_blocks:  # the finished answer (a hook's last point): a plain forward
        return sampler.forward(state, x, torch.arange(n, device=x.device))
    q = query_positions(sampler, block, P)
    kv: Optional[BlockCache] = state.kv
    outside = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    outside[P + q.start:P + q.stop] = False
    if kv is None or kv.block != block or kv.x.shape != x.shape:
        stale = torch.ones(n, dtype=torch.bool, device=x.device)
    else:
        stale = (x[:, outside] != kv.x[:, outside]).any(1)
    G = sampler.config.max_new_tokens
    if stale.any():
        idx = stale.nonzero().squeeze(1)
        sub_attn = None if attn is None else attn[idx]
        logits, cache = engine.prefill(sampler.model, x[idx], sub_attn, logits_from=P)
        fresh = BlockCache(block, x[idx].clone(), logits, cache)
        if bool(stale.all()):
            state.kv = kv = fresh
        else:
            kv.assign(idx, fresh)
        state.flops.index_add_(0, idx.cpu(), flops.sequence_flops(sampler.dims, x[idx], sub_attn, heads=G))
    # The block cache's logits are updated in place and returned, not copied: the queries' positions
    # are recomputed at every step, and the others keep their last forward's (an (n, G, V) copy a
    # step was 7% of a dual step's time).
    out = kv.logits
    run = (~stale).nonzero().squeeze(1)
    if len(run):
        pos = torch.arange(P + q.start, P + q.stop, device=x.device).expand(len(run), -1)
        cache = kv.cache if len(run) == n else kv.cache.select(run)
        fresh = engine.forward_queries(sampler.model, x[run][:, P + q.start:P + q.stop], pos, cache).to(out.dtype)
        if len(run) == n:
            out[:, q] = fresh
        else:
            out[run, q] = fresh
        sub_attn = None if attn is None else attn[run]
        state.flops.index_add_(0, run.cpu(), flops.sequence_flops(
            sampler.dims, x[run], sub_attn, queries=_ran(sampler, pos), heads=q.stop - q.start))
    state.rows += 1.0
    return out


def threshold_counts(sampler, state) -> Optional[torch.Tensor]:
    """Commits per row this step under the threshold (Fast-dLLM's rule): the most confident candidate
    and every other committable position whose probability is at least the threshold; 0 for a row with
    nothing left in its block (the step schedule's count is not used). None when no row has anything
    left in the block (the step makes no forward)."""
    committable = sampler.committable(state.gen, sampler.next_block(state))
    left = committable.sum(1)
    if not bool(left.any()):
        return None
    # A row with nothing left is not charged for the forward its neighbours still need (the batch's
    # waste, like padding): its cost, as its output, depends only on its own prompt and seed.
    done = (left == 0).cpu()
    rows, spent = state.rows[done].clone(), state.flops[done].clone()
    sampler.refresh(state)
    state.rows[done], state.flops[done] = rows, spent
    above = ((state.pred.confidence >= sampler.config.threshold) & committable).sum(1)
    return torch.minimum(above.clamp(min=1), left)



# ------------------------------------------------------------------------------ IterRef's proposals
class ProposalCache:
    """Keys and values of the refining rows' current drafts, computed once per pool (one full forward
    per row, shared by its N proposals); a proposal's forwards then run only its holes as queries.

    Every hole stays a query in every sub-step, filled or not, so that its keys and values are the
    proposal's own (the draft's token there was re-masked); the scoring forward, after the last hole,
    adds the positions still masked (their x̂0 is the reward's input). What is approximate: the
    positions outside the queries keep the draft's keys and values, computed with the old tokens at
    the holes (docs/method.md, "Fast sampling")."""

    def __init__(self, sampler, state, parent: torch.Tensor, head: bool = False):
        """The drafts of the state rows `parent` (repeats allowed). `head`: also the head on the
        generation region, `self.head_logits` (rows, G, V): the drafts' own full forward, which gives the
        current draft's x̂0 from the same keys and values its proposals run against."""
        self.rows, self.of = torch.unique(parent, return_inverse=True)  # refining rows; parent -> index
        x, P = state.x[self.rows], state.prompt_length
        attn = None if state.attention_mask is None else state.attention_mask[self.rows]
        with torch.inference_mode():
            logits, self.cache = engine.prefill(sampler.model, x, attn, logits_from=P if head else x.shape[1])
        self.head_logits = logits if head else None
        self._buffer = None  # logits(): the pool's (n, G, V) buffer
        state.rows.index_add_(0, self.rows.cpu(), torch.ones(len(self.rows), dtype=torch.float64))
        state.flops.index_add_(0, self.rows.cpu(), flops.sequence_flops(
            sampler.dims, x, attn, heads=x.shape[1] - P if head else 0))

    def serving(self, parent: torch.Tensor) -> Optional["ProposalCache"]:
        """This cache for the proposals of `parent` when it holds all their rows (their drafts
        unchanged since it was made: the caller's part), else None."""
        rows, of = torch.unique(parent, return_inverse=True)
        where = torch.searchsorted(self.rows, rows)
        if bool((where >= len(self.rows)).any()) or not torch.equal(self.rows[where.clamp(max=len(self.rows) - 1)], rows):
            return None
        out = object.__new__(ProposalCache)
        out.rows, out.of, out.head_logits, out._buffer = rows, of, None, None
        out.cache = self.cache if torch.equal(rows, self.rows) else self.cache.select(where)
        return out

    def logits(self, sampler, state, gen: torch.Tensor, queries: torch.Tensor, proposals: torch.Tensor,
               owner: torch.Tensor) -> torch.Tensor:
        """Logits (n, G, V) of the proposals `gen` (n, G) at their `queries` (n, G bool; elsewhere an
        earlier call's values, never read), `proposals` (n,) their index in the pool (-> the cache of their parent)."""
        P = state.prompt_length
        n, G = gen.shape
        counts = queries.sum(1)
        # One (n, G, V) buffer for all of a pool's forwards, not a new zeroed one a sub-step (that was
        # the largest single cost of cached IterRef on the CPU): positions that are not this call's
        # queries hold an earlier call's finite logits, never read.
        out = None if self._buffer is None or self._buffer.shape[0] < n else self._buffer[:n]
        x = torch.cat([state.x[owner, :P], gen], dim=1)
        for q in counts.unique().tolist():  # rows with as many queries run together
            sel = (counts == q).nonzero().squeeze(1)
            order = torch.argsort(queries[sel].to(torch.int8), dim=1, descending=True, stable=True)[:, :q]
            pos = P + order
            cache = self.cache.select(self.of[proposals[sel]])
            lg = engine.forward_queries(sampler.model, x[sel].gather(1, pos), pos, cache)
            if out is None:
                self._buffer = torch.zeros((n, G, lg.shape[-1]), dtype=lg.dtype, device=lg.device)
                out = self._buffer
            out[sel[:, None], order] = lg
            attn = None if state.attention_mask is None else state.attention_mask[owner[sel]]
            state.flops.index_add_(0, owner[sel].cpu(), flops.sequence_flops(sampler.dims, x[sel], attn,
                                                                              queries=_ran(sampler, pos), heads=q))
        state.rows.index_add_(0, owner.cpu(), torch.ones(n, dtype=torch.float64))
        return out


def _ran(sampler, positions: torch.Tensor) -> int:
    """The query positions a cached forward runs for `positions`: themselves, and for a shifted family
    (Dream) the position before each too (safegen.models.kvcache.shifted_width)."""
    if sampler.model.cache_view().shifted:
        from ..models.kvcache import shifted_width

        return shifted_width(positions)
    return positions.shape[1]
