"""Fast sampling (safegen.sampling.fast): the sampler's block cache and confidence-threshold parallel decoding,
and the FLOP accounting (safegen.models.flops)."""
import pytest
import torch

from safegen.models import flops
from safegen.models.llada import LLaDAConfig, LLaDAModelLM
from safegen.models.family import ModelProfile
from safegen.sampling.sampler import ConfigError, DiffusionSampler, SamplingConfig
from safegen.research.toy import TableDenoiser, random_distribution

MASK = 199


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96, vocab_size=200,
                      embedding_size=200, max_sequence_length=128, mask_token_id=MASK, eos_token_id=198,
                      pad_token_id=198)
    return LLaDAModelLM(cfg).eval()


def prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 190, (3, 8), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :2] = 0
    attn[2, :5] = 0
    ids[attn == 0] = 198
    return ids, attn


def run(model, cfg, ids, attn, seeds=0, hook=None):
    return DiffusionSampler(model, ModelProfile(mask_id=MASK), cfg).run(ids, attn, seeds, hook)


class BlockStartCheck:
    """A hook at every step: a block's first forward is the full forward's; later ones are not."""

    def __init__(self, model):
        self.model, self.diffs = model, {}

    def applies(self, block, step, steps_in_block, t):
        return step < steps_in_block

    def __call__(self, sampler, state):
        full = self.model(state.x, state.attention_mask).logits[:, state.prompt_length:]
        got, want = (t[:, sampler.block_slice(state.block)] for t in (state.logits, full))
        seen = torch.isfinite(got)  # predict() has set the mask's column to -inf
        diff = (got - want)[seen].abs().max()
        self.diffs[(state.block, state.step)] = float(diff)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_sampler_refreshes_at_each_block_start(model, cache):
    ids, attn = prompts()
    cfg = SamplingConfig(max_new_tokens=12, steps=12, block_length=4, cache=cache, temperature=0.5)
    check = BlockStartCheck(model)
    with torch.no_grad():
        run(model, cfg, ids, attn, hook=check)
    starts = [d for (b, s), d in check.diffs.items() if s == 0]
    later = [d for (b, s), d in check.diffs.items() if s > 0 and b < 2]
    assert len(starts) == 3 and max(starts) < 1e-5
    assert max(later) > 1e-5  # the cache is really used in between (else the test says nothing)


@pytest.mark.parametrize("cache, threshold", [("prefix", None), ("dual", None), ("dual", 0.2), (None, 0.2)])
def test_a_row_is_the_same_alone_and_in_a_padded_batch(model, cache, threshold):
    ids, attn = prompts()
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=4, cache=cache, threshold=threshold,
                         temperature=0.7)
    both = run(model, cfg, ids, attn, seeds=[4, 5, 6])
    for i in range(3):
        real = attn[i].bool()
        alone = run(model, cfg, ids[i:i + 1, real], None, seeds=[4 + i])
        assert torch.equal(alone.sequences[0, -8:], both.sequences[i, -8:])
        assert torch.allclose(alone.flops, both.flops[i:i + 1])


def test_flops_follow_the_shape_arithmetic(model):
    ids = torch.randint(0, 190, (1, 8), generator=torch.Generator().manual_seed(0))
    P, G, bl = 8, 16, 4
    dims = flops.dims_of(model)
    L = P + G
    counted = {}
    for cache in (None, "prefix", "dual"):
        out = run(model, SamplingConfig(max_new_tokens=G, steps=G, block_length=bl, cache=cache), ids, None)
        counted[cache] = float(out.flops[0])
        assert float(out.rows[0]) == G  # one forward per step, whatever the cache
    plain = G * flops.forward_flops(dims, L, L * L, L)
    refresh = flops.forward_flops(dims, L, L * L, G)  # the head runs on the generation region only
    dual = G // bl * refresh + G // bl * (bl - 1) * flops.forward_flops(dims, bl, bl * L, bl)
    prefix = G // bl * refresh + sum((bl - 1) * flops.forward_flops(dims, G - b * bl, (G - b * bl) * L, G - b * bl)
                                     for b in range(G // bl))
    assert counted == pytest.approx({None: plain, "prefix": prefix, "dual": dual}, rel=1e-12)


def test_default_config_is_unchanged_and_bad_settings_are_named(model):
    assert SamplingConfig().cache is None and SamplingConfig().threshold is None
    for bad, match in ((dict(cache="full"), "sampling.cache"), (dict(threshold=1.5), "sampling.threshold"),
                       (dict(threshold=0.9, remasking="random"), "low_confidence"),
                       (dict(cache="dual", cfg_scale=1.0), "cfg_scale"),
                       (dict(cache="dual", sampler="mdlm"), "LLaDA's block sampler")):
        with pytest.raises(ConfigError, match=match):
            SamplingConfig(**bad).validate()
    toy = TableDenoiser(random_distribution(2, 3), 2, 3)
    with pytest.raises(Exception, match="prefill"):
        DiffusionSampler(toy, toy.mask_id, SamplingConfig(max_new_tokens=3, steps=3, cache="dual"))


def toy_run(sharpness, threshold, n=200, seeds=0):
    V, Lg = 3, 4
    toy = TableDenoiser(random_distribution(V, Lg, seed=1, sharpness=sharpness), V, Lg)
    cfg = SamplingConfig(max_new_tokens=Lg, steps=Lg, block_length=Lg, temperature=1.0, threshold=threshold)
    return DiffusionSampler(toy, toy.mask_id, cfg).run(torch.zeros((n, 1), dtype=torch.long), seeds=seeds)


def test_threshold_saves_forwards_where_the_model_is_confident_only():
    peaked, peaked_t = toy_run(8.0, None), toy_run(8.0, 0.5)
    assert float(peaked_t.rows.mean()) < float(peaked.rows.mean()) - 0.5
    # A row's forwards are its own: not charged for those its batch neighbours still needed.
    for i in range(6):
        alone = toy_run(8.0, 0.5, n=1, seeds=[i])
        assert torch.equal(alone.sequences[0], peaked_t.sequences[i]) and alone.rows[0] == peaked_t.rows[i]
    # A threshold no probability reaches changes nothing, token for token.
    flat, flat_t = toy_run(0.1, None), toy_run(0.1, 0.99)
    assert torch.equal(flat.sequences, flat_t.sequences) and torch.equal(flat.rows, flat_t.rows)


def test_command_line_flags_reach_the_sampling_config():
    from safegen.cli import _configure, build_parser

    def sampling(*flags):
        args = build_parser().parse_args(["generate", "hi", "--model", "x", *flags])
        args.model = None  # no model lookup: only the flags are read
        return _configure(args)[1]

    assert (sampling().cache, sampling().threshold) == (None, None)
    assert sampling("--fast").cache == "dual" and sampling("--fast").threshold is None
    assert sampling("--fast", "--cache", "none").cache is None  # a flag given beside --fast wins
    assert sampling("--fast", "--threshold", "0.9").threshold == 0.9
    fast = sampling("--cache", "prefix", "--threshold", "0.9")
    assert (fast.cache, fast.threshold) == ("prefix", 0.9)
    with pytest.raises(ConfigError, match="sampling.threshold"):
        sampling("--threshold", "2")


def test_cached_iterref_proposals_cost_their_holes_and_match_the_cost_model(model):
    from safegen.research import planner
    from safegen.refine.iterref import IterRef, RefineConfig

    ids, attn = prompts()
    toxic = torch.tensor([5, 6, 7])
    reward = lambda t: -torch.isin(t, toxic).sum(1).double()  # noqa: E731
    rc = RefineConfig(n_proposals=1, iterations=2, rho=0.5, schedule="final")
    G, bl = 16, 4
    out = {}
    for cache in (None, "dual"):
        cfg = SamplingConfig(max_new_tokens=G, steps=G, block_length=bl, cache=cache, temperature=1.0)
        out[cache] = run(model, cfg, ids, attn, seeds=[1, 2, 3], hook=IterRef(rc, reward))
        # Every iteration draws a pool (N = 1, no budget): the rows are the cost model's worst case.
        assert out[cache].rows.tolist() == [planner.worst_case_rows(cfg, rc)] * 3
    plain = run(model, SamplingConfig(max_new_tokens=G, steps=G, block_length=bl), ids, attn)
    dual = run(model, SamplingConfig(max_new_tokens=G, steps=G, block_length=bl, cache="dual"), ids, attn)
    spent = {c: out[c].flops - (plain.flops if c is None else dual.flops) for c in out}
    # A pool of 3 forwards costs 3 full ones uncached; cached, one full forward (the draft's keys and
    # values), two of the m = 2 holes, and the score's of the holes and the masks left (at most 14 of
    # 24 positions): about 0.55 of it here, less the longer the sequence.
    assert (spent["dual"] < 0.62 * spent[None]).all()


class EditRowZero:
    """A hook that changes row 0's first generated token once the second block has begun (or, with
    edit=False, changes nothing but makes the next step's forward anew all the same)."""

    def __init__(self, edit=True):
        self.edit = edit

    def applies(self, block, step, steps_in_block, t):
        return block == 1 and step == 1

    def __call__(self, sampler, state):
        if self.edit:
            state.x[0, state.prompt_length] = 11
        state.pred = state.logits = None


@pytest.mark.parametrize("padded", [False, True])
def test_a_row_whose_cached_tokens_change_is_refreshed_alone(model, padded):
    ids, attn = prompts()
    attn = attn if padded else None
    cfg = SamplingConfig(max_new_tokens=12, steps=12, block_length=4, cache="dual", temperature=0.7)
    both = run(model, cfg, ids, attn, seeds=[4, 5, 6], hook=EditRowZero())
    plain = run(model, cfg, ids, attn, seeds=[4, 5, 6], hook=EditRowZero(edit=False))
    # Rows 1 and 2 are untouched: they are what they are without the hook (their caches were kept).
    assert torch.equal(both.sequences[1:], plain.sequences[1:])
    assert torch.equal(both.flops[1:], plain.flops[1:])
    # Row 0 paid one more full forward (its refresh) in place of one block step.
    assert both.flops[0] > plain.flops[0] and both.rows[0] == plain.rows[0]


def test_resume_fingerprint_names_the_fast_fields_only_when_set(tmp_path):
    from types import SimpleNamespace

    from safegen.cli import _fingerprint
    from safegen.refine.config import RefineConfig

    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("hello\n")
    args = SimpleNamespace(model="some/hub-id", revision=None, input=str(prompts_file), field=None, skip_bad=False,
                           quantization="none", samples=1, seed=0, no_refine=False, no_before=False, policy="offline")
    policy = SimpleNamespace(source=None)
    plain = _fingerprint(args, policy, SamplingConfig(), RefineConfig())["sampling"]
    assert "cache" not in plain and "threshold" not in plain  # as written before fast sampling existed
    fast = _fingerprint(args, policy, SamplingConfig(cache="dual", threshold=0.9), RefineConfig())["sampling"]
    assert (fast["cache"], fast["threshold"]) == ("dual", 0.9)
