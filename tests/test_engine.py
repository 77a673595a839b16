"""The step-level engine (safegen/engine.py): generations advanced side by side, forwards merged.

What must hold: a generation's tokens and reports are what it gets alone, whatever runs beside it and
whenever it joins; the merged forwards really are merged (fewer model calls than forwards asked);
a forward's logits, merged, equal its own forward's.
"""
import pytest
import torch

from oracles import padded_prompts, small_llada
from safegen import engine
from safegen.generator import SafeGenerator
from safegen.sampling.sampler import drive


def test_merged_query_forwards_equal_each_alone():
    """forward_queries_many of calls with their own caches (other prompt lengths, other padding,
    other positions, other query counts) gives each call's rows the logits of its own forward_queries."""
    model = small_llada(seed=1)
    calls = []
    for seed, (rows, length, pads, start, width) in enumerate([(2, 12, (3,), 12, 4), (1, 20, (), 24, 4),
                                                                 (3, 9, (2, 5), 13, 7), (2, 10, (), 10, 1)]):
        ids, attn = padded_prompts(seed, rows, length, pads)
        ids = torch.cat([ids, torch.randint(0, 190, (rows, 16))], dim=1)
        attn = torch.cat([attn, torch.ones(rows, 16, dtype=attn.dtype)], dim=1)
        with torch.inference_mode():
            _, cache = model.prefill(ids, attn)
        positions = torch.arange(start, start + width).expand(rows, -1)
        calls.append((ids.gather(1, positions).roll(1, dims=0), positions, cache))  # new tokens at the queries
    with torch.inference_mode():
        merged = model.forward_queries_many(calls)
        for call, together in zip(calls, merged):
            alone = model.forward_queries(*call)
            assert together.shape == alone.shape
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
            assert torch.equal(together.argmax(-1), alone.argmax(-1))


def test_merged_prefills_equal_each_alone():
    """prefill_many of sequences of other widths and padding, asking the head from other positions,
    gives each call its own prefill's logits and a cache of its own layout that answers its queries
    as its own prefill's does."""
    model = small_llada(seed=2)
    calls = []
    for seed, (rows, length, pads, head_from) in enumerate([(2, 20, (3,), 12), (1, 31, (), 31), (3, 9, (2, 5), 0)]):
        ids, attn = padded_prompts(seed, rows, length, pads)
        calls.append((ids, None if not pads else attn, head_from))
    with torch.inference_mode():
        merged = model.prefill_many(calls)
        for (ids, attn, head_from), (logits, cache) in zip(calls, merged):
            own_logits, own = model.prefill(ids, attn, head_from)
            assert logits.shape == own_logits.shape
            real = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
            real = real[:, head_from:]  # a padding position's logits are nobody's
            torch.testing.assert_close(logits[real], own_logits[real], rtol=1e-5, atol=1e-5)
            assert torch.equal(cache.slot, own.slot) and cache.keys[0].shape == own.keys[0].shape
            assert (cache.key_mask is None) == (own.key_mask is None)
            positions = torch.arange(ids.shape[1] - 3, ids.shape[1]).expand(len(ids), -1)
            queries = ids.gather(1, positions).flip(0)
            torch.testing.assert_close(model.forward_queries(queries, positions, cache),
                                       model.forward_queries(queries, positions, own), rtol=1e-5, atol=1e-5)


SAMPLING = dict(max_new_tokens=16, steps=16, block_length=4, temperature=1.0)
REFINE = dict(n_proposals=2, iterations=1, rho=0.25, schedule="final", adaptive=False)

# (prompt, seed, keywords of generate_steps, the round it joins at)
RUNS = [
    ("Go away, you", 3, dict(cache="dual"), 0),
    ("On this late November afternoon, we walked", 4, dict(cache="dual", max_new_tokens=8), 2),
    ("the weather today", 5, dict(cache="dual"), 5),  # refines, beside the others' plain steps
    ("What a", 6, dict(cache="prefix"), 1),
    ("I think that", 7, dict(cache=None), 0),
    ("You people are", 8, dict(cache=None, max_new_tokens=12, block_length=4, steps=12), 3),
]


@pytest.fixture(scope="module")
def generator(tiny_generator_parts):
    model, tokenizer, profile = tiny_generator_parts
    return SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=SAMPLING, refinement=REFINE)


def _steps(gen, prompt, seed, options):
    ids, attn, _ = gen.encode_prompts([prompt])
    refine = prompt == "the weather today"
    return gen.generate_steps(ids, attention_mask=attn, seeds=[seed], refine=refine, **options)


def _run_together(gen, runs, merge=True):
    """Every run as a generation, joining at its round; all advanced in rounds until done."""
    pending = sorted(range(len(runs)), key=lambda i: runs[i][3])
    running, done, rounds = {}, {}, 0
    while pending or running:
        while pending and runs[pending[0]][3] <= rounds:
            i = pending.pop(0)
            prompt, seed, options, _ = runs[i]
            running[i] = engine.Generation(lambda p=prompt, s=seed, o=options: _steps(gen, p, s, o))
        engine.advance(list(running.values()), merge=merge)
        for i in [i for i, g in running.items() if g.done]:
            done[i] = running.pop(i).result
        rounds += 1
    return [done[i] for i in range(len(runs))]


def _same(together, alone):
    assert not isinstance(together, BaseException), together
    assert torch.equal(together.sequences, alone.sequences)
    for a, b in zip(together.reports, alone.reports):
        assert (a.text, a.text_before, a.rows, a.flops, a.reward_calls) == (b.text, b.text_before, b.rows, b.flops,
                                                                          b.reward_calls)


def test_gibbs_moves_side_by_side_get_what_they_get_alone(tiny_generator_parts):
    """The moves beside the default one (Metropolised Gibbs with a two-hole reverse path, interleaved
    with the barred-hole re-mask move) on the engine: two refining generations (dual cache, none)
    beside a plain one get their own run's tokens and costs."""
    model, tokenizer, profile = tiny_generator_parts
    gen = SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=SAMPLING,
                        refinement={**REFINE, "iterations": 2, "gibbs_share": 0.5, "gibbs_holes": 2, "bar_blamed": True})
    runs = [RUNS[2], ("the weather today", 9, dict(cache=None), 1), RUNS[0]]
    alone = [drive(_steps(gen, p, s, o)) for p, s, o, _ in runs]
    assert all(a.reports[0].reward_calls > 1 for a in alone[:2])  # both refined
    for t, a in zip(_run_together(gen, runs), alone):
        _same(t, a)


def test_generations_side_by_side_get_what_they_get_alone(generator):
    """Six generations (dual, prefix and uncached; other prompt lengths, other G; one refining)
    joining at different rounds: each one's tokens, texts and costs are its own run's, and the
    engine merged their forwards (fewer model calls than forwards)."""
    alone = [drive(_steps(generator, p, s, o)) for p, s, o, _ in RUNS]
    assert alone[2].reports[0].rows_before > 0 or alone[2].reports[0].reward_calls > 0  # it refined
    before = engine.Counters(engine.counters.calls, engine.counters.forwards)
    together = _run_together(generator, RUNS)
    for t, a in zip(together, alone):
        _same(t, a)
    calls, forwards = engine.counters.calls - before.calls, engine.counters.forwards - before.forwards
    assert forwards > 0 and calls <= forwards - 10, (calls, forwards)  # dual and prefix steps differ in width


def test_side_by_side_in_bfloat16(tiny_model_dir):
    """The same in CPU bfloat16, where a rounding that depended on the neighbours would show."""
    from safegen.models.loading import load_model

    model, tokenizer, profile = load_model(str(tiny_model_dir), quantization="none", dtype="bfloat16")
    gen = SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=SAMPLING, refinement=REFINE)
    runs = RUNS[:3] + RUNS[4:5]
    alone = [drive(_steps(gen, p, s, o)) for p, s, o, _ in runs]
    for t, a in zip(_run_together(gen, runs), alone):
        _same(t, a)


def test_a_failing_generation_fails_alone(generator):
    """A generation whose step raises ends with its exception; the others beside it finish as alone."""
    def broken():
        yield
        raise RuntimeError("broken on purpose")

    good = engine.Generation(lambda: _steps(generator, *RUNS[0][:3]))
    bad = engine.Generation(broken)
    while not good.done:
        engine.advance([g for g in (good, bad) if not g.done])
    assert isinstance(bad.result, RuntimeError)
    _same(good.result, drive(_steps(generator, *RUNS[0][:3])))


def test_detoxify_runs_prompts_side_by_side_and_writes_what_each_gets_alone(tiny_model_dir, tmp_path):
    """`safegen detoxify` (dual cache by default, IterRef on): prompts of other lengths run side by side
    at --batch-size 6, their forwards merged, and every record equals the one --batch-size 1 writes
    (one prompt's sample at a time), but for its timing."""
    import json

    from safegen.cli import main

    src = tmp_path / "p.txt"
    src.write_text("Go away, you\nOn this late November afternoon, we walked to the\nthe weather today\n")
    small = ["--quantization", "none", "--policy", "offline", "--max-new-tokens", "8", "--steps", "8",
             "--block-length", "4", "--temperature", "1.0", "--proposals", "2", "--iterations", "1",
             "--samples", "2", "--model", str(tiny_model_dir)]
    runs = {}
    for size in (1, 6):
        out = tmp_path / f"out{size}.jsonl"
        before = engine.Counters(engine.counters.calls, engine.counters.forwards)
        assert main(["detoxify", str(src), "-o", str(out), "--batch-size", str(size), *small]) == 0
        merged = (engine.counters.forwards - before.forwards) - (engine.counters.calls - before.calls)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        for r in records:
            r.pop("seconds")
        runs[size] = (records, merged)
    (alone, merged_alone), (together, merged_together) = runs[1], runs[6]
    assert [(r["prompt_index"], r["sample"]) for r in together] == [(i, s) for i in range(3) for s in range(2)]
    assert together == alone
    assert {r["sampler"] for r in together} == {"llada+dual"}
    assert merged_alone == 0 and merged_together > 0
    assert any(r["refined"] for r in together), "no sample was refined: the test would miss IterRef's side"


def test_ctrl_c_in_a_round_leaves_every_generation_closable(generator):
    """A KeyboardInterrupt raised by one step while another is parked on its forward propagates out
    of the round, and both generations can then be closed (the batch command's clean exit)."""
    def interrupted():
        yield
        raise KeyboardInterrupt

    good = engine.Generation(lambda: _steps(generator, *RUNS[0][:3]))
    bad = engine.Generation(interrupted)
    engine.advance([good, bad])
    with pytest.raises(KeyboardInterrupt):
        engine.advance([good, bad])  # good parks on its forward, then bad raises
    good.close()
    bad.close()
