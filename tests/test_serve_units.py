"""The server's parts in-process: request validation, keys, the batcher's queue, and the engine's
batch invariance (a request's tokens do not depend on the other requests of its batch)."""
import asyncio
import json
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("starlette")

from safegen.serve.auth import Gate, KeyFileError, read_keys  # noqa: E402
from safegen.serve.batcher import Batcher, QueueFull  # noqa: E402
from safegen.serve.engine import cut_at_stop, split_for_stream  # noqa: E402
from safegen.serve.schema import APIError, Limits, ServerDefaults, parse  # noqa: E402

DEFAULTS = ServerDefaults(model="tiny", max_tokens=8, temperature=1.0, policies=("offline", "refuse"),
                          budget=4.0, refine=True)
LIMITS = Limits(max_body_bytes=4096, max_prompt_tokens=40, max_tokens=16, max_n=4)


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


def refusal(kind, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse(kind, body, DEFAULTS, LIMITS, lambda: 7)
    return info.value


def test_a_valid_request_gets_the_defaults_and_a_drawn_seed():
    req = parse("chat", chat(), DEFAULTS, LIMITS, lambda: 7)
    assert (req.max_tokens, req.temperature, req.n, req.seed, req.seed_given) == (8, 1.0, 1, 7, False)
    assert (req.extension.policy, req.extension.budget, req.extension.refine) == ("offline", 4.0, True)
    req = parse("completion", {"model": "tiny", "prompt": ["a", "b"], "n": 2, "seed": 3, "stop": "x",
                               "safegen": {"policy": "refuse", "budget": 2, "refine": False}},
                DEFAULTS, LIMITS, lambda: 7)
    assert (req.rows, req.seed, req.seed_given, req.stop) == (4, 3, True, ["x"])
    assert (req.extension.policy, req.extension.budget, req.extension.refine) == ("refuse", 2.0, False)
    # null means "not given", as in OpenAI's API, for fields this server does not implement too
    assert parse("chat", chat(seed=None, stop=None, top_p=None, tools=None), DEFAULTS, LIMITS, lambda: 9).seed == 9


def test_values_that_change_nothing_are_accepted():
    neutral = chat(top_p=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="u-17", logit_bias={},
                   stream=True, stream_options={"include_usage": True})
    neutral["messages"] = [{"role": "developer", "content": "be kind"}, {"role": "user", "content": "hi", "name": "ann"},
                           {"role": "assistant", "content": None, "refusal": "I can't"}, {"role": "user", "content": "ok"}]
    req = parse("chat", neutral, DEFAULTS, LIMITS, lambda: 7)
    # developer is system; a refused answer sent back is its text; names change nothing
    assert req.prompts == [[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "I can't"}, {"role": "user", "content": "ok"}]]
    assert req.include_usage and req.stream
    # include_usage means nothing without a stream
    assert not parse("chat", chat(stream_options={"include_usage": True}), DEFAULTS, LIMITS, lambda: 7).include_usage
    assert parse("completion", {"model": "tiny", "prompt": "x", "echo": False, "best_of": 1, "logprobs": 0},
                 DEFAULTS, LIMITS, lambda: 7).prompts == ["x"]


def test_n_without_a_temperature_samples_where_the_server_default_is_greedy():
    greedy = ServerDefaults(model="tiny", max_tokens=8, temperature=0.0, policies=("offline",), budget=None, refine=True)
    assert parse("chat", chat(n=2), greedy, LIMITS, lambda: 7).temperature == 1.0
    assert parse("chat", chat(n=1), greedy, LIMITS, lambda: 7).temperature == 0.0
    assert parse("chat", chat(n=2), DEFAULTS, LIMITS, lambda: 7).temperature == 1.0
    assert refusal("chat", {**chat(n=2, temperature=0)}).param == "n"  # asked for explicitly: refused


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"model": "tiny", "prompt": ["ok", "\udfff"]}, "prompt[1]"),
    ({"model": "tiny", "prompt": "x", "stop": ["\ud83d"]}, "stop[0]"),
    ({"model": "tiny", "prompt": "x", "\ud800": 1}, "\ud800"),
])
def test_text_that_is_not_unicode_is_refused_by_its_path(body, param):
    from safegen.serve.schema import check_text

    data = json.loads(json.dumps(body))  # as the server parses it: a JSON escape spells the surrogate
    with pytest.raises(APIError) as info:
        check_text(data)
    assert info.value.status == 400 and info.value.param == param.encode("utf-8", "backslashreplace").decode()
    check_text(json.loads('{"prompt": "caf\\u00e9 \\ud83d\\ude00"}'))  # a surrogate pair is one character: fine


@pytest.mark.parametrize("kind, body, param, status", [
    ("chat", chat(top_p=0.5), "top_p", 400),
    ("chat", chat(logprobs=True), "logprobs", 400),
    ("completion", {"model": "tiny", "prompt": "x", "echo": True}, "echo", 400),
    ("chat", chat(safegen={"alpha": 1}), "safegen.alpha", 400),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "name": 3}]}, "messages[0].name", 400),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "refusal": "no"}]},
     "messages[0].refusal", 400),
    ("chat", chat(top_p=True), "top_p", 400),
    ("chat", chat(presence_penalty=0.5), "presence_penalty", 400),
    ("chat", chat(user=5), "user", 400),
    ("chat", chat(logit_bias={"1": 5}), "logit_bias", 400),
    ("chat", chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", 400),
    ("chat", chat(stream=True, stream_options={"chunk": 1}), "stream_options.chunk", 400),
    ("chat", chat(safegen={"budget": 0.5}), "safegen.budget", 400),
    ("chat", chat(safegen={"budget": float("nan")}), "safegen.budget", 400),
    ("chat", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", 400),
    ("chat", {"model": "tiny", "messages": []}, "messages", 400),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "model", 400),
    ("chat", chat(model="gpt-4"), "model", 404),
    ("chat", chat(max_tokens=17), "max_tokens", 400),
    ("chat", chat(max_completion_tokens=0), "max_completion_tokens", 400),
    ("chat", chat(n=5), "n", 400),
    ("chat", chat(n=2, temperature=0), "n", 400),
    ("completion", {"model": "tiny", "prompt": ["a", "b", "c"], "n": 2}, "prompt", 400),
    ("completion", {"model": "tiny", "prompt": [1, 2]}, "prompt", 400),
    ("chat", chat(temperature=3), "temperature", 400),
    ("chat", chat(seed=-1), "seed", 400),
    ("chat", chat(seed=1.5), "seed", 400),
    ("chat", chat(stop=["a", "b", "c", "d", "e"]), "stop", 400),
    ("chat", chat(stream="yes"), "stream", 400),
    ("chat", chat(safegen={"policy": "strict"}), "safegen.policy", 400),
    ("chat", chat(safegen={"budget": 5}), "safegen.budget", 400),
    ("chat", chat(safegen={"refine": 1}), "safegen.refine", 400),
])
def test_each_bad_field_is_refused_by_name(kind, body, param, status):
    error = refusal(kind, body)
    assert (error.status, error.param) == (status, param)
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and param in body["message"]


def test_keys_file_and_gate(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsk-one\n\n  sk-two  \n")
    gate = Gate(read_keys(str(keys)))

    def scope(header):
        return {"headers": [(b"authorization", header)] if header is not None else []}

    assert gate.allows(scope(b"Bearer sk-one")) and gate.allows(scope(b"bearer sk-two"))
    for header in (None, b"Bearer sk-on", b"Bearer sk-one2", b"Basic sk-one", b"sk-one", b"Bearer "):
        assert not gate.allows(scope(header)), header
    assert Gate(None).allows(scope(None))
    (tmp_path / "empty").write_text("# nothing\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(KeyFileError, match=str(path)):
            read_keys(str(path))


def test_stop_and_stream_pieces():
    assert cut_at_stop("one two. three", ["three", "."]) == ("one two", True)
    assert cut_at_stop("one", ["x"]) == ("one", False)
    text = "a few words of an answer, streamed in pieces of about twenty four characters"
    pieces = split_for_stream(text)
    assert "".join(pieces) == text and len(pieces) > 2 and all(len(p) <= 30 for p in pieces)
    assert split_for_stream("") == []


def test_batcher_groups_by_key_caps_rows_and_bounds_the_queue():
    batches = []

    def run(payloads):
        batches.append(list(payloads))
        return [p * 10 for p in payloads]

    async def main():
        b = Batcher(run, max_queue=5, max_rows=3, max_wait=0.05)
        jobs = [b.submit(("A",), 1, 1), b.submit(("B",), 1, 2), b.submit(("A",), 2, 3), b.submit(("A",), 1, 4),
                b.submit(("A",), 1, 5), b.submit(("A",), 1, 6), b.submit(("A",), 1, 7)]
        with pytest.raises(QueueFull) as full:
            b.submit(("A",), 1, 8)  # seven queued: the first two fit in 3 rows and start next, five wait
        assert full.value.retry_after >= 1
        results = await asyncio.gather(*(j.future for j in jobs))
        b.close()
        return results

    results = asyncio.run(main())
    assert results == [10, 20, 30, 40, 50, 60, 70]
    # The oldest first; same-key jobs join it while they fit in 3 rows; the rest keep their order.
    assert batches == [[1, 3], [2], [4, 5, 6], [7]]


def test_batcher_waits_to_fill_only_while_requests_are_arriving():
    batches = []

    def run(payloads):
        batches.append(list(payloads))
        return payloads

    async def main(arriving):
        b = Batcher(run, max_queue=5, max_rows=4, max_wait=0.5, arriving=lambda: arriving)
        started = time.monotonic()
        first = b.submit(("A",), 1, "first")
        await asyncio.sleep(0.1)
        second = b.submit(("A",), 1, "second")
        await asyncio.gather(first.future, second.future)
        b.close()
        return time.monotonic() - started

    assert asyncio.run(main(arriving=0)) < 0.4 and batches == [["first"], ["second"]]  # no one to wait for
    batches.clear()
    assert asyncio.run(main(arriving=1)) >= 0.5 and batches == [["first", "second"]]  # waits 0.5 s to fill


def test_batcher_drops_a_queued_job_whose_client_left():
    ran = []

    def run(payloads):
        ran.extend(payloads)
        import time
        time.sleep(0.2)
        return list(payloads)

    async def main():
        dropped = []
        b = Batcher(run, max_queue=5, max_rows=1, max_wait=0, on_drop=lambda: dropped.append(1))
        first = b.submit(("A",), 1, "first")
        await asyncio.sleep(0.05)  # the first is running
        second = b.submit(("A",), 1, "second")
        b.cancel(second)
        third = b.submit(("A",), 1, "third")
        await first.future, await third.future
        b.close()
        return dropped, second

    dropped, second = asyncio.run(main())
    assert ran == ["first", "third"] and dropped == [1] and second.state == "cancelled"


def test_groups_run_step_by_step_a_short_one_joins_and_leaves_first():
    """Step generators: a 40-step group runs; a 3-step group submitted meanwhile joins at the next
    round and is answered while the long one still runs; a group whose clients all left stops."""
    log = []

    def run(payloads):
        name, steps = payloads[0]

        def steps_of():
            for k in range(steps):
                log.append((name, k))
                time.sleep(0.002)
                yield
            return [f"{name} done"] * len(payloads)
        return steps_of()

    async def main():
        b = Batcher(run, max_queue=5, max_rows=4, max_wait=0)
        long = b.submit(("A",), 1, ("long", 40))
        while not any(n == "long" for n, _ in log):
            await asyncio.sleep(0.001)
        short = b.submit(("B",), 1, ("short", 3))
        gone = b.submit(("C",), 1, ("gone", 1000))
        assert await short.future == "short done"
        assert not long.future.done()  # the short one did not wait for the long one
        b.cancel(gone)
        assert await long.future == "long done"
        b.close()

    asyncio.run(main())
    names = [n for n, _ in log]
    # interleaved: the short group's steps come between the long group's, not after them
    assert names.index("short") < len(names) - names[::-1].index("long") - 1
    assert [k for n, k in log if n == "long"] == list(range(40))
    assert names.count("gone") < 40  # it stopped once its client left, well before its 1000 steps


def test_serve_without_the_extra_is_one_clear_line(tmp_path):
    # A fresh interpreter in which uvicorn cannot be imported (as if the extra were not installed).
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from safegen.cli import main\n"
            f"sys.exit(main(['serve', '--model', {str(tmp_path)!r}, '--policy', 'offline']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines == ["safegen serve: error: serving needs the optional packages uvicorn: pip install 'safegen[serve]'"]


# ---------------------------------------------------------------- batch invariance of the engine
PROMPTS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "tell me what you think about my neighbours and their very loud dog"}],
    [{"role": "system", "content": "be kind"}, {"role": "user", "content": "what now"}],
    [{"role": "user", "content": "the weather today is"}],
]


def _requests(kind="chat"):
    from safegen.serve.schema import parse

    defaults = ServerDefaults(model="tiny", max_tokens=8, temperature=1.0, policies=("offline",), budget=4.0,
                              refine=True)
    return [parse("chat", {"model": "tiny", "messages": p, "seed": 11 + 5 * i, "n": 1 + (i == 1)},
                  defaults, Limits(), None) for i, p in enumerate(PROMPTS)]


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine a second spinning thread makes the tiny model ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _invariance(model, tokenizer, profile, cache=None):
    """Each request run in one batch with the others gives generate_text's texts for its seeds alone."""
    from safegen import SafeGenerator
    from safegen.serve.engine import Engine

    gen = SafeGenerator(model, tokenizer, policy="offline", profile=profile,
                        sampling={"max_new_tokens": 8, "temperature": 1.0, "cache": cache})
    engine = Engine({"offline": gen}, "tiny")
    requests = _requests()
    outcomes = engine.run(requests, [engine.encode(r) for r in requests])
    for request, outcome in zip(requests, outcomes):
        alone = gen.generate_text(request.prompts[0], seed=request.seed, num_return_sequences=request.n,
                                  max_new_tokens=8, temperature=1.0)
        assert [c.text for c in outcome.choices] == [r.text for r in alone]
        assert [c.report["seed"] for c in outcome.choices] == [r.seed for r in alone]
        assert [c.report["toxicity_after"] for c in outcome.choices] == [r.toxicity_after for r in alone]


@pytest.mark.parametrize("cache", [None, "dual"])  # the reference sampler, and the command line's default
def test_a_batch_gives_each_request_its_tokens_alone_fp32(tiny_generator_parts, one_thread, cache):
    _invariance(*tiny_generator_parts, cache=cache)


def test_a_batch_gives_each_request_its_tokens_alone_bf16(tiny_model_dir, one_thread):
    """bf16 under left padding: fails while rotary positions shift with the padding (llada.py)."""
    from safegen.models.loading import load_model

    model, tokenizer, profile = load_model(str(tiny_model_dir), quantization="none", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    _invariance(model, tokenizer, profile)


def test_completion_prompts_are_raw_text_without_the_chat_template(tiny_generator_parts):
    from safegen import SafeGenerator
    from safegen.serve.engine import Engine, completion_ids

    model, tokenizer, profile = tiny_generator_parts
    engine = Engine({"offline": SafeGenerator(model, tokenizer, policy="offline", profile=profile)}, "tiny")
    req = parse("completion", {"model": "tiny", "prompt": "the weather today is"}, DEFAULTS, LIMITS, lambda: 1)
    ids = engine.encode(req)[0]
    assert ids == completion_ids(tokenizer, profile.bos_id, "the weather today is")
    assert ids[0] == profile.bos_id and tokenizer.decode(ids[1:]) == "the weather today is"
    assert json.dumps(ids)  # plain ints


def test_several_prompts_with_n_get_the_seeds_generate_gives_them(tiny_generator_parts, one_thread):
    """Sample j of prompt i gets seed + i·n + j, as generate(prompts, seed, num_return_sequences=n)."""
    from safegen import SafeGenerator
    from safegen.serve.engine import Engine, left_pad

    model, tokenizer, profile = tiny_generator_parts
    gen = SafeGenerator(model, tokenizer, policy="offline", profile=profile,
                        sampling={"max_new_tokens": 6, "temperature": 1.0})
    engine = Engine({"offline": gen}, "tiny")
    req = parse("completion", {"model": "tiny", "prompt": ["the weather", "my neighbours were loud"], "n": 2,
                               "seed": 20, "max_tokens": 6}, DEFAULTS, LIMITS, None)
    [outcome] = engine.run([req], [engine.encode(req)])
    ids, mask = left_pad(engine.encode(req), engine.pad_id)
    expected = gen.generate(ids, attention_mask=mask, seed=20, num_return_sequences=2, max_new_tokens=6,
                            return_dict_in_generate=True).reports
    assert [c.report["seed"] for c in outcome.choices] == [20, 21, 22, 23] == [r.seed for r in expected]
    assert [c.text for c in outcome.choices] == [r.text for r in expected]


def test_serve_listens_on_this_machine_only_by_default():
    from safegen.cli import build_parser

    args = build_parser().parse_args(["serve", "--policy", "offline", "--policy", "strict"])
    assert (args.host, args.port, args.policy, args.api_key_file, args.log_content) == \
        ("127.0.0.1", 8000, ["offline", "strict"], None, False)


def _asgi_get(app, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, dict]:
    """One request through the ASGI app, in-process: (status, JSON body)."""
    sent, received = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return received.pop(0) if received else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_health_is_ready_only_once_the_model_is_loaded_and_not_draining():
    from safegen.serve.app import Service, create_app
    from safegen.serve.metrics import Metrics

    service = Service(DEFAULTS, LIMITS, Metrics(), Gate(None))
    app = create_app(service)
    assert _asgi_get(app, "/health") == (503, {"status": "loading"})
    status, body = _asgi_get(app, "/v1/chat/completions", "POST", json.dumps(chat()).encode())
    assert status == 503 and body["error"]["code"] == "not_ready"
    service.engine = object()  # loaded
    assert _asgi_get(app, "/health") == (200, {"status": "ready"})
    service.draining = True
    assert _asgi_get(app, "/health") == (503, {"status": "draining"})
    status, body = _asgi_get(app, "/v1/models")
    assert status == 503 and body["error"]["code"] == "draining"
    assert service.in_flight == 0
