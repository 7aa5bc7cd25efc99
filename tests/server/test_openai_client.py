"""The live server driven by the official `openai` client (and raw HTTP where the client hides details)."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_config_metrics(live, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    cfg = httpx.get(live.url + "/v1/spinquant/config").json()
    assert cfg["engine"] == "cpu" and cfg["quantization_config"] is None
    assert cfg["model_info"]["max_model_len"] == live.engine.max_model_len
    text = httpx.get(live.url + "/metrics").text
    for series in ("spinquant_requests_total", "spinquant_requests_in_flight", "spinquant_generation_tokens_total",
                   "spinquant_request_latency_seconds_bucket", "spinquant_engine_sequences_in_flight"):
        assert series in text


def test_completion_greedy_is_deterministic(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.object == "text_completion" and a.model == "tiny"
    assert a.choices[0].finish_reason in ("length", "stop")
    assert a.usage.completion_tokens <= 12 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_completion_batch_ids_and_n(client, live):
    tok = live.engine.tokenizer
    ids = tok.encode("Hello world")
    r = client.completions.create(model="tiny", prompt=[ids, tok.encode("Numbers")], max_tokens=4, n=3, seed=5)
    assert sorted(c.index for c in r.choices) == list(range(6))
    # The token-id prompt gives the same greedy text as the same prompt as a string.
    s = client.completions.create(model="tiny", prompt="Hello world", max_tokens=6, temperature=0)
    t = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert s.choices[0].text == t.choices[0].text
    # Same seed, same request -> same choices; choice i of a request uses seed + i.
    again = client.completions.create(model="tiny", prompt=[ids, tok.encode("Numbers")], max_tokens=4, n=3, seed=5)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(again.choices, key=lambda c: c.index)]


def test_echo_logprobs_and_scoring(client, live):
    prompt = "Rotations spread outliers"
    n_prompt = len(live.engine.tokenizer.encode(prompt))
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # max_tokens=0 with echo scores the prompt only.
    s = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert s.choices[0].text == prompt and s.usage.completion_tokens == 0
    assert s.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n_prompt]


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="tiny", prompt="A server answers", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stop_string(client):
    kw = dict(model="tiny", prompt="Numbers 0 1 2", max_tokens=30, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    window = next((full[i:i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2]), None)
    assert window is not None, full
    r = client.completions.create(stop=[window], **kw).choices[0]
    assert r.text == full[:full.find(window)] and r.finish_reason == "stop"


def test_chat(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == c.message.content
    assert chunks[-1].choices[0].finish_reason == c.finish_reason
    # max_completion_tokens and content parts are accepted.
    r2 = client.chat.completions.create(model="tiny", max_completion_tokens=3,
                                        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert r2.usage.completion_tokens <= 3


@pytest.mark.parametrize("kw,param", [
    (dict(max_tokens=10**6), "max_tokens"),
    (dict(temperature=5.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=0), "n"),
    (dict(logprobs=99), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(prompt=[10**7]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="x " * 600), "prompt"),
    (dict(best_of=2), "best_of"),
])
def test_bad_completion_requests_are_400_naming_the_field(client, kw, param):
    args = dict(model="tiny", prompt="hi", max_tokens=2) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_bad_chat_requests(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=10**6)
    assert e.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[]", None),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": "x", "max_tokens": "7"}', "max_tokens"),
    (b'{"prompt": "x", "stream": "yes"}', "stream"),
    (b'{"prompt": "x", "n": 1.5}', "n"),
    (b'{"prompt": [[1, 2], []]}', "prompt"),
    (b'{"prompt": "x", "seed": 99999999999999999999999}', "seed"),
    ("{\"prompt\": \"\\ud800\"}".encode(), "prompt"),
])
def test_raw_bad_bodies_are_400_in_openai_schema(live, body, param):
    r = httpx.post(live.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


def test_unknown_route_and_method(live):
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(live.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key(live_factory):
    srv = live_factory(api_key="sekret")
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
    assert httpx.get(srv.url + "/health").status_code == 200  # health stays open for probes


def test_request_size_limit(live_factory):
    srv = live_factory(max_request_bytes=1024)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="x" * 5000, max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    # Chunked bodies without Content-Length are counted too.
    r = httpx.post(srv.url + "/v1/completions", content=iter([b'{"prompt": "', b"y" * 4000, b'"}']),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_concurrency_limit_answers_429_with_retry_after(live_factory):
    srv = live_factory(max_concurrency=1)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    srv.engine.hold()  # the first request stays in flight until the test releases it
    stream = client.completions.create(model="tiny", prompt="hi", max_tokens=4, stream=True)
    # create() returned with the response headers: the first request is admitted and unfinished.
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    stream.close()
    srv.engine.release()
    srv.wait_idle()
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_non_streaming_disconnect_cancels_in_engine(live_factory, open_request):
    srv = live_factory()
    srv.engine.hold()  # the sequence cannot take a step before the client has left
    sock = open_request(srv.url, "/v1/completions", {"prompt": "hi", "max_tokens": 500, "ignore_eos": True})
    srv.wait_engine_in_flight(1)
    sock.close()
    # A held engine drops a sequence only when it is aborted: this is the cancellation arriving.
    srv.wait_engine_in_flight(0)
    srv.wait_idle()
    srv.engine.release()
    assert srv.engine.num_generated_tokens == 0
    assert 'status="499"' in httpx.get(srv.url + "/metrics").text


def test_graceful_shutdown_drains_in_flight(live_factory):
    srv = live_factory()
    srv.engine.hold()  # the stream stays in flight until the test has seen the drain begin
    result: dict = {}

    def consume():
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=srv.hang_s,
                          json={"prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
            result["lines"] = [line for line in r.iter_lines() if line]
    t = threading.Thread(target=consume, daemon=True)
    t.start()
    srv.wait_engine_in_flight(1)
    srv.server.should_exit = True
    assert srv.state.draining.wait(srv.hang_s), "shutdown did not begin"
    # Draining, with the request held by the engine: the server waits for it, the stream is open.
    assert t.is_alive() and srv.thread.is_alive() and srv.engine.num_in_flight == 1
    srv.engine.release()
    t.join(timeout=srv.hang_s)
    srv.thread.join(timeout=srv.hang_s)
    assert not t.is_alive() and not srv.thread.is_alive()
    assert result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in result["lines"][-2]
    assert srv.engine.num_generated_tokens == 200
    assert srv.engine.num_in_flight == 0


def test_draining_refuses_new_generation_with_503(live_factory):
    from spinquant_server.app import set_draining

    srv = live_factory()
    set_draining(srv.app)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "draining"
    assert httpx.get(srv.url + "/health").status_code == 503
    assert httpx.get(srv.url + "/v1/models").status_code == 200  # reads still answer


def test_server_check_script_passes_against_the_cpu_engine(live):
    """benchmarks/server_check.py's checks (the H100 evidence script) over the CPU engine:
    every check passes but the one that needs a SpinQuant checkpoint, and chat records the
    generated tokens."""
    from spinquant_testutils import load_script

    res = load_script("server_check").run_checks(live.url)
    failed = {k: v for k, v in res["checks"].items() if not v.get("ok")}
    # the tiny checkpoint is unquantized: /v1/spinquant/config answers without "spinquant"
    assert set(failed) == {"endpoints"}, failed
    ep = res["checks"]["endpoints"]
    assert ep["health"] == 200 and ep["metrics_lines"] > 0 and ep["config"]["quantization_config"] is None
    chat = res["checks"]["chat"]
    assert chat["content"] and len(chat["tokens"]) == chat["usage"]["completion_tokens"] == 24
