"""Tests that a wrong block cache fails (the issue "two wrong caches pass every test").

* forward_queries must use the queries' own fresh keys and values, not only the cached ones. With the
  cache made from the very tokens the queries run on, both give the same numbers, so the queries here
  carry tokens that changed after the prefill, on a ONE-layer model: there a position's keys and
  values are a function of its own token and packed position only (embedding -> RMSNorm -> k/v
  projection -> RoPE), so the cached keys and values of the other positions are still exact and the
  cached forward of the queries must equal the uncached forward of the changed sequence.
* A row refreshed alone (fast.cached_logits: a row whose cached tokens changed, among rows whose did
  not) must get the keys, values and logits of its new tokens, not only be charged for them: checked
  by its logits (against the uncached forward at the refresh, and against the row run alone, whose
  refresh replaces the whole cache, at every later step) and by its committed tokens.
"""
import pytest
import torch

from oracles import padded_prompts
from safegen.models.family import ModelProfile
from safegen.models.llada import LLaDAConfig, LLaDAModelLM
from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

MASK, PAD = 199, 198


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Sampler runs of many small forwards: on a loaded 2-core machine, thread hand-offs cost more than
    the work (tens of seconds instead of a few)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_of(n_layers, n_kv_heads=4):
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, mlp_hidden_size=96,
                      vocab_size=200, embedding_size=208, max_sequence_length=128, mask_token_id=MASK,
                      eos_token_id=PAD, pad_token_id=PAD)
    return LLaDAModelLM(cfg).eval()


# ------------------------------------------------------------------ forward_queries on changed tokens
P, G = 10, 16


def batch(padded):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 190, (3, P + G), generator=g)
    x[:, P + 4:] = MASK  # the first 4 generated tokens committed, the rest masked
    attn = torch.ones_like(x)
    if padded:
        attn[1, :3] = 0  # left padding of different lengths
        attn[2, :7] = 0
        x[attn == 0] = PAD
    return x, (attn if padded else None)


QUERIES = {
    "block": list(range(P + 4, P + 12)),  # a dual cache's step: the block
    "suffix": list(range(P + 4, P + G)),  # a prefix cache's step: the block and everything after it
    # IterRef's holes: scattered, out of order, committed tokens and masks, one left as it was.
    "holes": [P + 13, P + 1, P + 6, P + 9, P + 2, P + 15],
}


@pytest.mark.parametrize("queries", sorted(QUERIES))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_one_layer_queries_whose_tokens_changed_after_the_prefill_get_the_uncached_logits(queries, padded,
                                                                                          kv_heads):
    model = model_of(1, kv_heads)
    x, attn = batch(padded)
    pos = torch.tensor(QUERIES[queries]).expand(3, -1)
    y = x.clone()
    new = torch.randint(0, 190, pos.shape, generator=torch.Generator().manual_seed(2))
    new[:, -1] = x.gather(1, pos)[:, -1]  # one query keeps its token
    y.scatter_(1, pos, new)
    with torch.no_grad():
        _, cache = model.prefill(x, attn, logits_from=P)  # made from the OLD tokens
        got = model.forward_queries(y.gather(1, pos), pos, cache)
        want = model(y, attn).logits.gather(1, pos[..., None].expand(-1, -1, got.shape[-1]))
        before = model(x, attn).logits.gather(1, pos[..., None].expand(-1, -1, got.shape[-1]))
    # The change matters (else the test could not tell old keys from new ones) ...
    assert (want[:, :-1] - before[:, :-1]).abs().amax() > 1e-2
    # ... and one layer makes the cached forward exact: the queries' own keys and values are their new
    # tokens', the others' cached ones are unchanged by the queries' tokens.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_one_layer_queries_changed_twice_on_one_cache_get_the_uncached_logits_each_time():
    # The cache is read, never written, by forward_queries: a second set of tokens on the same cache
    # is exact too (IterRef's N proposals share their parent's cache).
    model = model_of(1, 2)
    x, attn = batch(True)
    pos = torch.arange(P + 4, P + 12).expand(3, -1)
    with torch.no_grad():
        _, cache = model.prefill(x, attn, logits_from=P)
        for seed in (3, 4):
            y = x.clone()
            y.scatter_(1, pos, torch.randint(0, 190, pos.shape, generator=torch.Generator().manual_seed(seed)))
            got = model.forward_queries(y.gather(1, pos), pos, cache)
            torch.testing.assert_close(got, model(y, attn).logits[:, P + 4:P + 12], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ a row refreshed alone
def prompts():
    return padded_prompts(3, 3, 8, pads=(2, 5))


class EditAndRecord:
    """A hook at every base step of blocks >= `first_block`: records each row's logits (the sampler's,
    for the step's commit); at (block 1, step 1) it first changes the first generated token (block
    0's, so a cached token outside the window of every cache kind) of rows `edit` (none: no change),
    and makes the sampler make the step's prediction anew, so that the refreshed rows' logits are
    recorded and checked against the uncached forward of the new tokens."""

    def __init__(self, model, edit, first_block=1):
        self.model, self.edit, self.first_block = model, list(edit), first_block
        self.logits, self.refresh_errors = {}, []

    def applies(self, block, step, steps_in_block, t):
        return block >= self.first_block and step < steps_in_block

    def __call__(self, sampler, state):
        if (state.block, state.step) == (1, 1):
            P = state.prompt_length
            for r in self.edit:
                state.x[r, P] = 11 if int(state.x[r, P]) != 11 else 12
            # The step's forward anew (a partial refresh of the edited rows), with or without an edit,
            # so that a row pays the same for it alone and in the batch.
            state.pred = state.logits = None
            sampler.refresh(state)
            if self.edit:
                got = state.logits[self.edit]
                want = self.model(state.x, state.attention_mask).logits[self.edit, P:]
                seen = torch.isfinite(got)  # predict() has set the mask's column to -inf
                self.refresh_errors.append(float((got - want)[seen].abs().max()))
        self.logits[(state.block, state.step)] = state.logits.clone()


def run(model, cfg, ids, attn, seeds, hook):
    return DiffusionSampler(model, ModelProfile(mask_id=MASK), cfg).run(ids, attn, seeds, hook)


@pytest.mark.parametrize("cache", ["dual", "prefix"])
@pytest.mark.parametrize("padded", [True, False])
def test_a_row_refreshed_alone_gets_its_new_tokens_logits_and_tokens(cache, padded):
    model = model_of(2, 2)
    ids, attn = prompts()
    attn = attn if padded else None
    cfg = SamplingConfig(max_new_tokens=12, steps=12, block_length=4, cache=cache, temperature=0.7)
    edit = [0, 2]  # row 1 kept: a partial refresh (rows 0 and 2, one padded when padded), not a full one
    seeds = [4, 5, 6]
    with torch.no_grad():
        both = run(model, cfg, ids, attn, seeds, hook := EditAndRecord(model, edit))
        # The refresh's logits are the uncached forward's of the new tokens.
        assert len(hook.refresh_errors) == 1 and hook.refresh_errors[0] < 1e-5, \
            f"rows {edit} refreshed alone: logits off the uncached forward's by {hook.refresh_errors}"
        for i in range(3):
            real = torch.ones(ids.shape[1], dtype=torch.bool) if attn is None else attn[i].bool()
            alone = run(model, cfg, ids[i:i + 1, real], None, [seeds[i]],
                        solo := EditAndRecord(model, [0] if i in edit else []))
            # Alone, the row's refresh is the whole batch's: a cache made anew. Every later step's logits
            # (the cache's queries against the refreshed keys and values) and every token agree.
            assert solo.logits.keys() == hook.logits.keys()
            for point, logits in hook.logits.items():
                torch.testing.assert_close(logits[i:i + 1], solo.logits[point], rtol=0, atol=1e-5,
                                           msg=lambda m, i=i, point=point: f"row {i} at {point}: {m}")
            assert torch.equal(both.sequences[i, -12:], alone.sequences[0, -12:]), i
            assert torch.allclose(both.flops[i:i + 1], alone.flops), i
    # The edit changed the refreshed rows' later logits (else the comparison above says nothing).
    plain = run(model, cfg, ids, attn, seeds, keep := EditAndRecord(model, []))
    assert max(float((hook.logits[(1, s)][edit] - keep.logits[(1, s)][edit]).nan_to_num(0, 0, 0).abs().max())
               for s in (1, 2, 3)) > 1e-2
    assert torch.equal(plain.sequences[1], both.sequences[1]) and torch.equal(plain.flops[1], both.flops[1])


@pytest.mark.parametrize("cache", ["dual", "prefix"])
@pytest.mark.parametrize("edit", [[], [0, 2]])
def test_one_layer_cached_sampler_commits_what_the_uncached_one_does(cache, edit):
    # With one layer, the kept keys and values of the positions outside a step's queries are exact as
    # long as their tokens are those the cache was made from, which the sampler keeps so (a row whose
    # cached tokens change is refreshed): every cached step's logits of the block are the uncached
    # step's, so the tokens are the same. This needs the queries' own keys and values (the block's
    # tokens change at every step after the prefill) and, with `edit`, rows refreshed alone.
    model = model_of(1, 2)
    ids, attn = prompts()
    seeds = [4, 5, 6]
    base = dict(max_new_tokens=12, steps=12, block_length=4, temperature=0.7)
    with torch.no_grad():
        want = run(model, SamplingConfig(**base), ids, attn, seeds, ref := EditAndRecord(model, edit, 0))
        got = run(model, SamplingConfig(**base, cache=cache), ids, attn, seeds,
                  mine := EditAndRecord(model, edit, 0))
    assert mine.logits.keys() == ref.logits.keys()
    for (block, step), logits in mine.logits.items():
        sl = slice(4 * block, 4 * block + 4)
        torch.testing.assert_close(logits[:, sl], ref.logits[(block, step)][:, sl], rtol=0, atol=1e-5,
                                   msg=lambda m, point=(block, step): f"at {point}: {m}")
    assert torch.equal(got.sequences, want.sequences)
    assert (got.flops < want.flops).all()  # the cache was used
