"""`safegen serve` against what clients actually send: a property-based fuzzer over the request schema
(zero 5xx), the browser door (415, JSON 404/405), the fields OpenAI clients send, usage that counts
what the client receives, the prompt limit by the request's own max_tokens, and a drain deadline that
holds. Every server is the real process on a free local port; every request loop is bounded."""
import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmarks.serve_process import REFUSE_POLICY, ServerProcess  # noqa: E402

ONE_THREAD = ("--threads", "1")  # see test_serve.py: one torch thread on a shared 2-core machine


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """`open` (no key, the default limits of a 512-token model, two policies) for the fuzzer and the
    fields; `deadline` (--drain-timeout 2) and `twice` (a long drain, for the second signal), each
    killed by its test."""
    tmp = tmp_path_factory.mktemp("hardening")
    (tmp / "refuse.yaml").write_text(REFUSE_POLICY)
    common = ("--policy", "offline", "--max-new-tokens", "4", "--temperature", "1", *ONE_THREAD)
    open_ = ServerProcess(tiny_model_dir, tmp / "open.log", *common, "--policy", str(tmp / "refuse.yaml"),
                          "--max-n", "2", "--max-queue", "256", wait=False)
    deadline = ServerProcess(tiny_model_dir, tmp / "deadline.log", *common, "--drain-timeout", "2",
                             "--max-batch-rows", "1", wait=False)
    twice = ServerProcess(tiny_model_dir, tmp / "twice.log", *common, "--drain-timeout", "600",
                          "--max-batch-rows", "1", wait=False)
    open_.refuse = str(tmp / "refuse.yaml")
    try:
        yield {"open": open_.wait_ready(), "deadline": deadline.wait_ready(), "twice": twice.wait_ready()}
    finally:
        for s in (open_, deadline, twice):
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["open"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def raw(server, method, path, body: bytes = b"", content_type="application/json", timeout=60.0):
    """(status, headers, bytes) of one plain HTTP request, whatever its status."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    req = urllib.request.Request(server.url + path, data=body if method != "GET" else None, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def openai_error(payload: bytes) -> dict:
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------------------------- the fuzzer
# JSON values of every kind, strings with lone surrogates among them, numbers at their edges.
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(["", "hi", "\ud800", "a\udfff"])
NUMBER = (st.integers(-3, 20) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from([0, 1, 0.5, 2**32, -1, 1e-300, 1e300]))
SCALAR = st.none() | st.booleans() | NUMBER | TEXT
ANY = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                   max_leaves=8)

# What a client could well send: real text, values near and at the server's limits.
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16) | st.sampled_from(
    ["hello", "the weather today", "tell me about the market", " ", "caf\u00e9 \U0001f600",
     "\ud800", "half a pair \udfff"])  # JSON can spell a lone surrogate; clients send them by mistake
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": WORDS},
    optional={"name": WORDS})
FIELDS = {
    "max_tokens": st.integers(1, 8),
    "max_completion_tokens": st.integers(1, 8),
    "temperature": st.sampled_from([0.7, 1, 2, 1e-30, None]),
    "n": st.sampled_from([1, 2, None]),
    "seed": st.integers(0, 2**32 - 8) | st.none(),
    "stop": WORDS.filter(bool) | st.lists(WORDS.filter(bool), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "top_p": st.sampled_from([1, 1.0, None]),
    "presence_penalty": st.sampled_from([0, None]),
    "user": WORDS,
    "logprobs": st.sampled_from([False, None]),
    "safegen": st.fixed_dictionaries({}, optional={"policy": st.sampled_from(["offline", "REFUSE"]),
                                                  "budget": st.sampled_from([1, 1.5, 2, None]),
                                                  "refine": st.booleans()}),
}
# Names a client might send that the server does not implement, or misspells.
OTHER_NAMES = ["tools", "response_format", "max_token", "top_k", "echo", "suffix", "best_of", "logit_bias",
               "functions", "metadata", "store", "service_tier", "prompt", "messages", "model"]


@st.composite
def request_body(draw, kind: str, model: str, refuse: str):
    """A request as a client would write it; then, in most draws, one field or one level of it
    replaced by anything at all, or (in some) everything drawn from anything."""
    body = {"model": model}
    body["messages" if kind == "chat" else "prompt"] = draw(
        st.lists(MESSAGE, min_size=1, max_size=3) if kind == "chat" else WORDS | st.lists(WORDS, min_size=1, max_size=2))
    names = [n for n in FIELDS if kind == "chat" or n != "max_completion_tokens"]
    for name in draw(st.lists(st.sampled_from(names), max_size=6, unique=True)):
        body[name] = draw(FIELDS[name])
    if isinstance(body.get("safegen"), dict) and body["safegen"].get("policy") == "REFUSE":
        body["safegen"]["policy"] = refuse
    mode = draw(st.sampled_from(["valid", "valid", "field", "field", "nested", "wild"]))
    if mode == "field":  # one field, known or not, set to anything
        body[draw(st.sampled_from(list(FIELDS) + OTHER_NAMES))] = draw(ANY)
    elif mode == "nested":  # one level down: a message's or the extension's field
        if kind == "chat":
            message = draw(st.sampled_from(body["messages"]))
            message[draw(st.sampled_from(["role", "content", "name", "refusal", "tool_calls"]))] = draw(ANY)
        else:
            body["safegen"] = {**body.get("safegen", {}),
                               draw(st.sampled_from(["policy", "budget", "refine", "alpha"])): draw(ANY)}
    elif mode == "wild":
        body = draw(st.dictionaries(st.sampled_from(list(FIELDS) + OTHER_NAMES) | TEXT, ANY, max_size=6))
    return body


def deep(depth: int, kind: str) -> bytes:
    return (b"[" * depth + b"]" * depth) if kind == "list" else (b'{"a":' * depth + b"1" + b"}" * depth)


@st.composite
def http_request(draw, model: str, refuse: str):
    """(path, content type, body bytes): mostly a schema-shaped request, sometimes broken bytes,
    a deep nesting, the wrong content type or a path that does not exist."""
    kind = draw(st.sampled_from(["chat", "completion"]))
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = json.dumps(draw(request_body(kind, model, refuse)), allow_nan=True).encode()
    how = draw(st.sampled_from(["json"] * 12 + ["truncated", "bytes", "deep", "type", "path", "top"]))
    content_type = "application/json"
    if how == "truncated":
        body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
    elif how == "bytes":
        body = draw(st.binary(max_size=40))
    elif how == "deep":
        body = deep(draw(st.sampled_from([10, 900, 5000, 100_000])), draw(st.sampled_from(["list", "dict"])))
    elif how == "type":
        content_type = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", None,
                                             "application/json; charset=utf-8", "APPLICATION/JSON"]))
    elif how == "path":
        path = draw(st.sampled_from(["/v1/embeddings", "/", "/v1/chat/completions/x",  # 404
                                     "/v1/models", "/health", "/metrics"]))  # 405 (GET routes)
    elif how == "top":
        body = json.dumps(draw(ANY), allow_nan=True).encode()
    return path, content_type, body


FUZZ_EXAMPLES = 250  # x 8 bodies each: 2,000 requests
FUZZ_SEEN = {"statuses": {}}


def test_fuzzed_requests_never_get_a_5xx(server, tiny_model_dir):
    """Thousands of generated bodies, 8 at a time (so that valid ones share batches), against the
    real server: every answer is a 2xx, or a 4xx in OpenAI's error JSON."""
    model = str(tiny_model_dir)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(http_request(model, server.refuse), min_size=8, max_size=8))
    def check(requests):
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: (r, raw(server, "POST", r[0], r[2], r[1])), requests))
        for (path, content_type, body), (status, headers, payload) in answers:
            FUZZ_SEEN["statuses"][status] = FUZZ_SEEN["statuses"].get(status, 0) + 1
            assert status < 500, f"{status} for {path} {content_type} {body[:300]!r}: {payload[:500]!r}"
            if status >= 400:
                openai_error(payload)
            elif headers.get("content-type", "").startswith("text/event-stream"):
                assert payload.rstrip().endswith(b"data: [DONE]"), payload[-300:]
            else:
                assert json.loads(payload)["choices"]

    check()
    print("fuzzer statuses:", dict(sorted(FUZZ_SEEN["statuses"].items())))
    seen = FUZZ_SEEN["statuses"]
    # The fuzzer reached the generator, not only the refusals: answers, refusals of many kinds, 415s.
    assert seen.get(200, 0) >= 400 and seen.get(400, 0) >= 400, seen
    assert {404, 405, 415} <= set(seen), seen
    assert server.process.poll() is None
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("case", ["budget", "surrogate-chat", "surrogate-prompt", "deep"])
def test_the_reported_500s_are_400s(server, tiny_model_dir, case):
    model = str(tiny_model_dir)
    body = {
        "budget": json.dumps({"model": model, "prompt": "a", "safegen": {"budget": 0.5}}).encode(),
        "surrogate-chat": b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % model.encode(),
        "surrogate-prompt": b'{"model": "%s", "prompt": "\\ud800"}' % model.encode(),
        "deep": deep(5000, "list"),
    }[case]
    path = "/v1/chat/completions" if case == "surrogate-chat" else "/v1/completions"
    status, _, payload = raw(server, "POST", path, body)
    error = openai_error(payload)
    assert status == 400, payload
    assert error["param"] == {"budget": "safegen.budget", "surrogate-chat": "messages[0].content",
                              "surrogate-prompt": "prompt", "deep": None}[case]


# ---------------------------------------------------------------------------------- the browser door
def test_only_json_bodies_are_read_and_unknown_routes_answer_json(server, tiny_model_dir):
    body = json.dumps({"model": str(tiny_model_dir), "prompt": "hello"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, _, payload = raw(server, "POST", "/v1/completions", body, content_type)
        assert status == 415 and openai_error(payload)["code"] == "unsupported_media_type", content_type
    assert raw(server, "POST", "/v1/completions", body, "application/json; charset=utf-8")[0] == 200
    status, _, payload = raw(server, "GET", "/v1/embeddings")
    assert status == 404 and openai_error(payload)["code"] == "not_found"
    status, headers, payload = raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and openai_error(payload)["code"] == "method_not_allowed" and "POST" in headers["Allow"]
    status, _, payload = raw(server, "DELETE", "/v1/models")
    assert status == 405 and openai_error(payload)["type"] == "invalid_request_error"
    # No CORS header: a page's JSON POST (which needs a preflight) is never allowed by the browser.
    status, headers, _ = raw(server, "OPTIONS", "/v1/completions", b"")
    assert status == 405 and "access-control-allow-origin" not in {k.lower() for k in headers}


# ---------------------------------------------------------------------------------- fields clients send
def test_neutral_fields_nulls_and_the_developer_role(client, tiny_model_dir):
    out = client.chat.completions.create(
        model=str(tiny_model_dir), seed=5, top_p=1, presence_penalty=0, frequency_penalty=0, user="user-42",
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"}])
    same = client.chat.completions.create(model=str(tiny_model_dir), seed=5,
                                          messages=[{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "hi"}],
                                          extra_body={"top_p": None, "logprobs": None})
    assert out.choices[0].message.content == same.choices[0].message.content  # they change nothing
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=str(tiny_model_dir), messages=[{"role": "user", "content": "hi"}],
                                       top_p=0.5)
    assert info.value.body["param"] == "top_p" and info.value.body["code"] == "unsupported_value"


def test_a_stream_with_include_usage_ends_with_the_usage(client, tiny_model_dir):
    kwargs = dict(model=str(tiny_model_dir), messages=[{"role": "user", "content": "the weather"}], seed=3,
                  max_tokens=8, n=2)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1]) and all(c.choices for c in chunks[:-1])
    plain = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_n_without_a_temperature_on_a_greedy_server(tiny_model_dir, tmp_path):
    """The real model's default temperature is 0: n=2 without one samples at 1 (documented), and a
    request that says temperature 0 with n=2 is refused."""
    greedy = ServerProcess(tiny_model_dir, tmp_path / "greedy.log", "--policy", "offline", "--max-new-tokens", "4",
                           "--temperature", "0", *ONE_THREAD)
    try:
        c = openai.OpenAI(base_url=greedy.url + "/v1", api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "tell me about the market"}]
        out = c.chat.completions.create(model=str(tiny_model_dir), messages=msgs, n=2, seed=1)
        assert [ch.index for ch in out.choices] == [0, 1]
        again = c.chat.completions.create(model=str(tiny_model_dir), messages=msgs, n=2, seed=1, temperature=1)
        assert [ch.message.content for ch in out.choices] == [ch.message.content for ch in again.choices]
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model=str(tiny_model_dir), messages=msgs, n=2, temperature=0)
        assert info.value.body["param"] == "n"
    finally:
        greedy.stop()


def test_a_refusal_sets_message_refusal_and_usage_counts_what_is_sent(server, client, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    out = client.chat.completions.create(model=str(tiny_model_dir), messages=[{"role": "user", "content": "hi"}],
                                         seed=2, max_tokens=8, extra_body={"safegen": {"policy": server.refuse}})
    [choice] = out.choices
    assert choice.finish_reason == "content_filter" and choice.message.refusal == choice.message.content
    assert out.usage.completion_tokens == count(choice.message.refusal)
    streamed = list(client.chat.completions.create(model=str(tiny_model_dir), messages=[{"role": "user", "content": "hi"}],
                                                   seed=2, max_tokens=8, stream=True,
                                                   extra_body={"safegen": {"policy": server.refuse}}))
    assert "".join(getattr(c.choices[0].delta, "refusal", None) or "" for c in streamed) == choice.message.refusal
    # A stop cut: the cut text's tokens, fewer than the whole answer's.
    prompt = "the neighbours dog was loud again today"
    whole = client.completions.create(model=str(tiny_model_dir), prompt=prompt, seed=4, max_tokens=16,
                                      extra_body={"safegen": {"refine": False}})
    text = whole.choices[0].text
    words = text.split()
    assert len(words) >= 4, text
    cut = client.completions.create(model=str(tiny_model_dir), prompt=prompt, seed=4, max_tokens=16, stop=[words[3]],
                                    extra_body={"safegen": {"refine": False}})
    returned = cut.choices[0].text
    assert returned == text[:text.find(words[3])] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == count(returned) < whole.usage.completion_tokens


def test_the_prompt_limit_is_the_context_less_the_requests_own_max_tokens(client, tiny_model_dir):
    """The tiny model's context is 512 and the server's --max-tokens cap 256: a 308-token prompt fits
    with max_tokens 4 (it was refused while the limit was 512 - 256), not with 256."""
    words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet " * 40).split()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = " ".join(words[:400])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    prompt = tokenizer.decode(ids[:307])
    n = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # BOS and the text
    assert 300 <= n <= 320, n
    out = client.completions.create(model=str(tiny_model_dir), prompt=prompt, max_tokens=4, seed=0,
                                    extra_body={"safegen": {"refine": False}})
    assert out.usage.prompt_tokens == n
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=str(tiny_model_dir), prompt=prompt, max_tokens=256, seed=0)
    assert info.value.body["code"] == "context_length_exceeded" and "512" in info.value.body["message"]


def test_metrics_count_tokens_per_policy_and_models_says_when(server, client, tiny_model_dir):
    before = server.metric("safegen_completion_tokens_total")
    out = client.completions.create(model=str(tiny_model_dir), prompt="a b c", max_tokens=4, seed=9)
    assert server.metric("safegen_completion_tokens_total") - before == out.usage.completion_tokens
    text = server.get("/metrics")[1]
    assert 'safegen_prompt_tokens_total{policy="offline"}' in text
    assert f'safegen_samples_total{{policy="{server.refuse}"}}' in text
    [model] = client.models.list().data
    assert abs(model.created - time.time()) < 3600
    # The command line's default sampler, said where a client can see it
    assert model.model_extra["safegen"]["samplers"]["offline"] == "llada+dual"
    assert out.choices[0].model_extra["safegen"]["sampler"] == "llada+dual"


# ---------------------------------------------------------------------------------- the drain deadline
def _long_request(server, tiny_model_dir, stream=False, n=1):
    body = json.dumps({"model": str(tiny_model_dir), "prompt": "a long answer", "max_tokens": 256, "seed": 1,
                       "stream": stream, "n": n, "temperature": 1}).encode()
    started = time.monotonic()
    status, headers, payload = raw(server, "POST", "/v1/completions", body, timeout=120)
    return status, headers, payload, time.monotonic() - started


def _wait_in_flight(server, count: int, futures):
    deadline = time.monotonic() + 30
    while server.metric("safegen_requests_in_flight") < count + 1 and time.monotonic() < deadline:
        assert not any(f.done() for f in futures), "a long request finished before the signal"
        time.sleep(0.02)


def test_the_drain_timeout_is_a_deadline(servers, tiny_model_dir):
    """--drain-timeout 2 with 256-token requests in flight (each several seconds here, batches of one):
    at the deadline they get OpenAI's 503 with Retry-After (the stream, an error event), and the
    process exits without waiting for the batch on the model thread."""
    server = servers["deadline"]
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_long_request, server, tiny_model_dir),
                   pool.submit(_long_request, server, tiny_model_dir),
                   pool.submit(_long_request, server, tiny_model_dir, True)]
        _wait_in_flight(server, 3, futures)
        signalled = time.monotonic()
        server.process.send_signal(15)
        answers = [f.result(60) for f in futures]
        code = server.process.wait(30)
        exited = time.monotonic() - signalled
    for status, headers, payload, _ in answers[:2]:
        assert status == 503 and headers["Retry-After"] and openai_error(payload)["code"] == "shutting_down"
    status, _, payload, _ = answers[2]
    assert status == 200 and b'"code": "shutting_down"' in payload  # the stream had started: an error event
    assert code == 0 and exited < 2 + 2, exited  # the deadline, its half-second grace and ticks, a margin for load
    assert "drain deadline: 3 request(s) answered 503" in server.output()


def test_a_second_signal_exits_at_once(servers, tiny_model_dir):
    server = servers["twice"]
    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_long_request, server, tiny_model_dir)
        _wait_in_flight(server, 1, [future])
        server.process.send_signal(15)
        time.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(15)
        server.process.wait(30)
        exited = time.monotonic() - signalled
        try:
            status = future.result(30)[0]
        except OSError:  # the connection closed with the process: no answer
            status = None
        assert status != 200
    assert exited < 3, exited
    assert "second signal: exiting now" in server.output()


# ---------------------------------------------------------------------------------- step-level batching
def test_a_short_request_joins_a_long_one_mid_flight_and_gets_its_own_answer(server, client, tiny_model_dir,
                                                                            tiny_generator_parts):
    """A 4-token request sent while a 256-token one runs is answered while the long one still runs
    (groups advance step by step in turn), with the tokens it gets alone (offline, the same flags)."""
    import torch

    from safegen import SafeGenerator

    msgs = [{"role": "user", "content": "the weather today"}]
    with cf.ThreadPoolExecutor(1) as pool:
        long = pool.submit(_long_request, server, tiny_model_dir, n=2)  # 2 x 256 tokens: a second or more here
        _wait_in_flight(server, 1, [long])
        short = client.chat.completions.create(model=str(tiny_model_dir), messages=msgs, max_tokens=4, seed=5)
        assert not long.done(), "the short request waited for the long one"
        assert long.result(120)[0] == 200
    model, tokenizer, profile = tiny_generator_parts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        offline = SafeGenerator(model, tokenizer, policy="offline", profile=profile,
                                sampling={"max_new_tokens": 4, "temperature": 1.0, "cache": "dual"})
        [alone] = offline.generate_text([msgs], seed=5)
    finally:
        torch.set_num_threads(threads)
    assert short.choices[0].message.content == alone.text
