"""`safegen serve` as a client sees it: the real server process on a free local port, the tiny model,
and the official `openai` client (plain HTTP where the client cannot send the bad request)."""
import concurrent.futures as cf
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from benchmarks.serve_process import REFUSE_POLICY, ServerProcess  # noqa: E402

KEY = "sk-test-0123456789"
# One torch thread in the server: on a shared 2-core machine two spinning threads per process make the
# tiny model's forwards ~10x slower (measured: 64 tokens in 20 s with 2 threads, 1.8 s with 1).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
G = 8  # the servers' default generation length: short, so the tests stay quick
WORDS = ("the neighbours dog was loud again today and i think we should talk about what happened at the "
         "market when the weather turned").split()


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """Two servers, started at once: `main` (two policies, a key file, small limits) and `small`
    (a queue of 3 and batches of one sample: what overload and SIGTERM need)."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "refuse.yaml").write_text(REFUSE_POLICY)
    (tmp / "keys").write_text(f"# test keys\n{KEY}\nsk-second\n")
    main = ServerProcess(tiny_model_dir, tmp / "main.log", "--policy", "offline", "--policy", str(tmp / "refuse.yaml"),
                         "--api-key-file", str(tmp / "keys"), "--max-new-tokens", str(G), "--temperature", "1",
                         "--max-tokens", "16", "--max-n", "4", "--max-prompt-tokens", "40", "--max-body-bytes", "4096",
                         "--max-batch-rows", "16", "--max-queue", "128", "--batch-wait-ms", "20",
                         env=ONE_THREAD, wait=False)
    small = ServerProcess(tiny_model_dir, tmp / "small.log", "--policy", "offline", "--max-new-tokens", str(G),
                          "--max-tokens", "64", "--temperature", "1", "--max-queue", "3", "--max-batch-rows", "1",
                          "--batch-wait-ms", "0", env=ONE_THREAD, wait=False)
    main.refuse = str(tmp / "refuse.yaml")
    try:
        yield main.wait_ready(), small.wait_ready()
    finally:
        main.stop()
        small.stop()
    assert KEY not in main.output()  # keys are never logged
    assert "neighbours dog" not in main.output()  # nor prompts, without --log-content


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small(servers):
    return servers[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_generator_parts):
    """The generator the server runs, in this process: the same model folder, policy and flags."""
    import torch

    from safegen import SafeGenerator

    model, tokenizer, profile = tiny_generator_parts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see ONE_THREAD; restored for the other tests
    yield SafeGenerator(model, tokenizer, policy="offline", profile=profile,
                        sampling={"max_new_tokens": G, "temperature": 1.0, "cache": "dual"})  # serve's default
    torch.set_num_threads(threads)


def messages(i: int):
    return [{"role": "user", "content": " ".join(WORDS[i % 7: i % 7 + 1 + i % 13])}]


def test_health_models_and_keys(server, client, tiny_model_dir):
    assert server.get("/health") == (200, {"status": "ready"})  # no key needed for the probe
    assert [m.id for m in client.models.list().data] == [str(tiny_model_dir)]
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, body = server.get("/v1/models", headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", headers
    assert server.get("/metrics")[0] == 401
    assert server.get("/v1/models", headers={"Authorization": "Bearer sk-second"})[0] == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=str(tiny_model_dir), messages=messages(0))


def test_chat_gives_generate_texts_answer_for_its_seed(client, offline, tiny_model_dir):
    out = client.chat.completions.create(model=str(tiny_model_dir), messages=messages(3), seed=5)
    [choice] = out.choices
    [expected] = offline.generate_text(messages(3), seed=5)
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    report = choice.model_extra["safegen"]
    assert report["seed"] == 5 and report["policy"] == "offline" and report["action"] == expected.action
    assert report["toxicity_after"] == expected.toxicity_after and report["rows"] == expected.rows
    assert report["verdict"] == ("toxic" if expected.toxic_after else "not_toxic")
    assert report["flops_counted"] and report["flops"] == expected.flops + expected.flops_before > 0
    assert 0 < out.usage.completion_tokens <= G and out.usage.prompt_tokens > 5


def test_completion_with_n_continues_the_raw_prompt(client, offline, tiny_model_dir):
    from safegen.serve.engine import completion_ids, left_pad

    out = client.completions.create(model=str(tiny_model_dir), prompt="the weather today", n=3, seed=7,
                                    max_tokens=12)
    ids, mask = left_pad([completion_ids(offline.tokenizer, offline.profile.bos_id, "the weather today")], 0)
    expected = offline.generate(ids, attention_mask=mask, seed=7, num_return_sequences=3, max_new_tokens=12,
                                return_dict_in_generate=True).reports
    assert [c.text for c in out.choices] == [r.text for r in expected]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.model_extra["safegen"]["seed"] for c in out.choices] == [7, 8, 9]


def test_a_request_without_seed_gets_one_that_reproduces_it(client, offline, tiny_model_dir):
    out = client.chat.completions.create(model=str(tiny_model_dir), messages=messages(4))
    seed = out.choices[0].model_extra["safegen"]["seed"]
    assert out.model_extra["safegen"]["seed"] == seed and out.model_extra["safegen"]["seed_given"] is False
    assert out.choices[0].message.content == offline.generate_text(messages(4), seed=seed)[0].text


def test_stream_sends_the_final_text_then_the_report(client, tiny_model_dir):
    whole = client.chat.completions.create(model=str(tiny_model_dir), messages=messages(6), seed=11, max_tokens=16)
    chunks = list(client.chat.completions.create(model=str(tiny_model_dir), messages=messages(6), seed=11,
                                                 max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and len(chunks) >= 3
    last = chunks[-1].choices[0]
    assert last.finish_reason == whole.choices[0].finish_reason
    assert last.model_extra["safegen"] == whole.choices[0].model_extra["safegen"]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_refused_answer_ends_with_content_filter(server, client, tiny_model_dir):
    out = client.chat.completions.create(model=str(tiny_model_dir), messages=messages(2), seed=1,
                                         extra_body={"safegen": {"policy": server.refuse, "budget": 2}})
    [choice] = out.choices
    assert choice.finish_reason == "content_filter"
    assert choice.message.content == "I'm sorry, but I can't help with that."
    report = choice.model_extra["safegen"]
    assert report["action"] == "refuse" and report["verdict"] == "toxic" and report["policy"] == server.refuse
    assert "text_after" not in report and "text_before" not in report  # the refused text is not leaked
    streamed = list(client.completions.create(model=str(tiny_model_dir), prompt="hello", seed=1, stream=True,
                                              extra_body={"safegen": {"policy": server.refuse, "refine": False}}))
    assert streamed[-1].choices[0].finish_reason == "content_filter"


def test_metrics_count_samples_verdicts_and_batches(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert server.metric("safegen_refused_total", auth) >= 2  # the refused answers above
    assert server.metric("safegen_toxic_after_total", auth) >= 2
    assert server.metric("safegen_samples_total", auth) >= server.metric("safegen_batch_rows_sum", auth) - 0.5
    assert server.metric("safegen_batch_rows_count", auth) >= 1
    assert server.metric("safegen_queue_depth", auth) == 0 and server.metric("safegen_ready", auth) == 1
    assert server.metric("safegen_denoiser_rows_total", auth) > 0


@pytest.mark.parametrize("kwargs, param", [
    ({"top_p": 0.5}, "top_p"),
    ({"max_tokens": 17}, "max_tokens"),
    ({"n": 5}, "n"),
    ({"messages": [{"role": "user", "content": " ".join(WORDS * 2)}]}, "messages"),
    ({"extra_body": {"safegen": {"budget": 9}}}, "safegen.budget"),
])
def test_bad_requests_are_refused_naming_the_field(client, tiny_model_dir, kwargs, param):
    args = {"model": str(tiny_model_dir), "messages": messages(1), **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert param in info.value.body["message"]


def test_body_too_big_and_unknown_model(server, tiny_model_dir):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "word " * 1000}]}
    status, _, body = server.request("POST", "/v1/chat/completions", big, headers=auth)
    assert status == 413 and body["error"]["code"] == "body_too_large" and "4096" in body["error"]["message"]
    status, _, body = server.request("POST", "/v1/completions", {"model": "gpt-x", "prompt": "a"}, headers=auth)
    assert status == 404 and body["error"]["param"] == "model"
    status, _, body = server.request("POST", "/v1/completions", b"{not json", headers=auth)
    assert status == 400 and body["error"]["code"] == "invalid_json"


def test_load_64_requests_from_16_clients_equal_offline(server, client, offline, tiny_model_dir):
    """Every request answered once, with the tokens generate_text gives its prompt and seed: the
    whole set in one offline batch, and a few of them alone."""
    n_requests, seeds = 64, [1000 + 3 * i for i in range(64)]
    auth = {"Authorization": f"Bearer {KEY}"}
    rows_before = server.metric("safegen_batch_rows_count", auth)
    forwards, calls = server.metric("safegen_engine_forwards_total", auth), server.metric("safegen_engine_model_calls_total", auth)

    def call(i):
        out = client.chat.completions.create(model=str(tiny_model_dir), messages=messages(i), seed=seeds[i])
        return i, out.choices[0].message.content

    started = time.monotonic()
    with cf.ThreadPoolExecutor(16) as pool:
        answers = dict(pool.map(call, range(n_requests)))
    elapsed = time.monotonic() - started
    assert sorted(answers) == list(range(n_requests))
    expected = offline.generate_text([messages(i) for i in range(n_requests)], seeds=seeds)
    assert [answers[i] for i in range(n_requests)] == [r.text for r in expected]
    for i in (0, 17, 42):
        assert answers[i] == offline.generate_text(messages(i), seed=seeds[i])[0].text
    batches = server.metric("safegen_batch_rows_count", {"Authorization": f"Bearer {KEY}"}) - rows_before
    assert batches < n_requests, "the requests were not batched"
    forwards = server.metric("safegen_engine_forwards_total", auth) - forwards
    calls = server.metric("safegen_engine_model_calls_total", auth) - calls
    assert 0 < calls < forwards, (calls, forwards)  # the groups' forwards were merged
    assert elapsed < 120


# ---------------------------------------------------------------- queue, disconnects, drain
def _chat(server, tiny_model_dir, max_tokens=G, timeout=60.0, seed=0, n=1):
    return server.request("POST", "/v1/chat/completions", {"model": str(tiny_model_dir), "messages": messages(seed),
                                                           "max_tokens": max_tokens, "seed": seed, "n": n},
                          timeout=timeout)


def _long(server, tiny_model_dir):
    """A request that keeps the model busy for a while (about 1 s here): 4 samples of 32 tokens."""
    return _chat(server, tiny_model_dir, max_tokens=32, seed=3, n=4)


def test_load_benchmark_quick_mode(server, small, capsys):
    """benchmarks/serve_load.py --quick against the running servers: main (batches of up to 16) and
    small (batches of one), the same sampler configuration; its exit status says the answers agree."""
    from benchmarks.serve_load import main

    assert main(["--quick", "--batched-url", server.url, "--one-by-one-url", small.url, "--api-key", KEY]) == 0
    out = capsys.readouterr().out
    for mode in ("batched", "one-by-one"):
        for c in (1, 4):
            assert f"{mode:>10}  concurrency {c:>2}:" in out
    assert "answers equal with and without batching: True (8 seeds)" in out
    assert "concurrency  4: throughput x" in out


def test_a_full_queue_answers_429_with_retry_after(small, tiny_model_dir):
    # 6 requests sent while a long one keeps the model busy, each 2 samples of 16 tokens: 3 wait in the
    # queue, the others are refused. Waiting for the long one's batch to run first keeps the test from
    # depending on how fast the machine answers.
    batches = small.metric("safegen_batch_rows_count")
    long = threading.Thread(target=_long, args=(small, tiny_model_dir))
    long.start()
    deadline = time.monotonic() + 30
    while small.metric("safegen_batch_rows_count") == batches and time.monotonic() < deadline:
        time.sleep(0.02)
    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: _chat(small, tiny_model_dir, max_tokens=16, seed=i, n=2), range(6)))
    long.join(60)
    statuses = sorted(r[0] for r in results)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    for status, headers, body in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"
    assert small.metric("safegen_rejected_queue_full_total") == statuses.count(429)


def test_a_queued_request_whose_client_left_never_runs(small, tiny_model_dir):
    import json
    import socket

    samples, batches = small.metric("safegen_samples_total"), small.metric("safegen_batch_rows_count")
    long = threading.Thread(target=_long, args=(small, tiny_model_dir))
    long.start()
    deadline = time.monotonic() + 30
    while small.metric("safegen_batch_rows_count") == batches and time.monotonic() < deadline:
        time.sleep(0.02)  # until the long request's batch is running
    # A client sends a request and leaves at once, while the model is busy: its request is queued.
    body = json.dumps({"model": str(tiny_model_dir), "messages": messages(1), "seed": 1}).encode()
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    long.join(60)
    deadline = time.monotonic() + 10
    while small.metric("safegen_dropped_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert small.metric("safegen_dropped_total") == 1
    assert small.metric("safegen_samples_total") == samples + 4  # only the long request ran


def test_sigterm_drains_requests_in_flight_and_exits_0(small, tiny_model_dir):
    with cf.ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(_long, small, tiny_model_dir), pool.submit(_long, small, tiny_model_dir)]
        # SIGTERM once both requests are in the server (the gauge counts this /metrics call too: 3),
        # not after a fixed sleep: on an idle machine they may be answered before it; then watch
        # /health turn to draining while they finish.
        deadline = time.monotonic() + 30
        while (small.metric("safegen_requests_in_flight") < 3 and time.monotonic() < deadline
               and not any(f.done() for f in in_flight)):
            time.sleep(0.01)
        assert not any(f.done() for f in in_flight), "the requests finished before SIGTERM could be sent"
        small.process.send_signal(15)
        health = None
        while time.monotonic() < deadline and not all(f.done() for f in in_flight):
            health = small.get("/health")
            if health[0] == 503:
                break
            time.sleep(0.01)
        assert health == (503, {"status": "draining"})
        status, _, body = _chat(small, tiny_model_dir)
        assert status == 503 and body["error"]["code"] == "draining"
        assert [f.result(60)[0] for f in in_flight] == [200, 200]
    assert small.process.wait(60) == 0
    assert "drained: exiting" in small.output()
