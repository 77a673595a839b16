"""The block-wise key/value cache (safegen.models.kvcache) through LLaDAModelLM's public methods: refreshed
on the very tokens the queries run on, a query's logits are the uncached forward's."""
import pytest
import torch

from safegen.models.llada import LLaDAConfig, LLaDAModelLM


def small(**kw):
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_layers=3, n_heads=4, mlp_hidden_size=96, vocab_size=200, embedding_size=208,
               max_sequence_length=128, mask_token_id=199, eos_token_id=198, pad_token_id=198)
    cfg.update(kw)
    return LLaDAModelLM(LLaDAConfig(**cfg)).eval()


def batch(B=3, P=10, G=16, padded=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 190, (B, P + G), generator=g)
    x[:, P + 4:] = 199  # masked tail
    attn = torch.ones_like(x)
    if padded:
        attn[1, :3] = 0  # left padding of different lengths
        attn[2, :7] = 0
        x[attn == 0] = 198
    return x, attn


def queries(x, start, stop):
    pos = torch.arange(start, stop).expand(x.shape[0], -1)
    return x.gather(1, pos), pos


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", ["prefix", "dual"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cache_refreshed_on_the_same_tokens_gives_the_uncached_logits(padded, kind, kv_heads):
    model = small(n_kv_heads=kv_heads)
    x, attn = batch(padded=padded)
    P = 10
    start, stop = P + 4, (P + 12 if kind == "dual" else x.shape[1])  # a block, or a block and all after
    with torch.no_grad():
        full = model(x, attn if padded else None).logits
        head, cache = model.prefill(x, attn if padded else None, logits_from=P)
        torch.testing.assert_close(head, full[:, P:], rtol=0, atol=1e-5)
        ids, pos = queries(x, start, stop)
        got = model.forward_queries(ids, pos, cache)
    torch.testing.assert_close(got, full[:, start:stop], rtol=0, atol=1e-5)


def test_a_stale_cache_is_only_an_approximation():
    # After a commit inside the block, the other positions' keys and values of layers >= 1 change too
    # (attention is bidirectional): the cached queries then differ from the full forward, while a cache
    # refreshed on the new tokens does not. (This is what makes the refresh test above able to fail.)
    model = small()
    x, attn = batch()
    P = 10
    y = x.clone()
    y[:, P + 5] = 7
    ids, pos = queries(y, P + 4, P + 12)
    with torch.no_grad():
        _, cache = model.prefill(x, attn, logits_from=P)
        stale = model.forward_queries(ids, pos, cache)
        _, fresh_cache = model.prefill(y, attn, logits_from=P)
        exact = model.forward_queries(ids, pos, fresh_cache)
        full = model(y, attn).logits[:, P + 4:P + 12]
    torch.testing.assert_close(exact, full, rtol=0, atol=1e-5)
    assert (stale - full).abs().max() > 1e-4


def test_a_row_is_the_same_alone_and_in_a_padded_batch():
    model = small()
    x, attn = batch()
    P = 10
    with torch.no_grad():
        _, cache = model.prefill(x, attn, logits_from=P)
        ids, pos = queries(x, P + 4, P + 12)
        both = model.forward_queries(ids, pos, cache)
        real = attn[2].bool()
        alone_x = x[2:3, real]
        shift = int((~real).sum())
        _, c1 = model.prefill(alone_x, None, logits_from=P - shift)
        ids1, pos1 = queries(alone_x, P + 4 - shift, P + 12 - shift)
        alone = model.forward_queries(ids1, pos1, c1)
    torch.testing.assert_close(both[2:3], alone, rtol=0, atol=1e-5)


def test_four_bit_cache_refreshed_gives_the_uncached_logits(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from safegen.models.loading import load_model

    model, _, _ = load_model(str(tiny_model_dir), quantization="4bit", device_map="cpu")
    x, attn = batch()
    x = x.clamp(max=150)
    x[:, 14:] = model.config.mask_token_id
    x[attn == 0] = model.config.pad_token_id
    P = 10
    with torch.no_grad():
        full = model(x, attn).logits
        _, cache = model.prefill(x, attn, logits_from=P)
        for start, stop in ((14, 22), (14, x.shape[1])):
            ids, pos = queries(x, start, stop)
            torch.testing.assert_close(model.forward_queries(ids, pos, cache), full[:, start:stop],
                                       rtol=0, atol=1e-5)
