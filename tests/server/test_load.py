"""Bounded loopback load: 64 concurrent streaming clients, a quarter of them leaving early;
the load client of benchmarks/ against the live server."""
from __future__ import annotations

import asyncio
import json

import httpx

CLIENTS = 64
MAX_TOKENS = 24


async def _client(url: str, i: int, http: httpx.AsyncClient, leave: asyncio.Event) -> dict:
    """One streaming request. Early leavers wait for `leave` after the response headers and
    close the connection there, mid-response."""
    leave_early = i % 4 == 0
    body = {"model": "tiny", "prompt": f"client {i} says", "max_tokens": MAX_TOKENS, "stream": True,
            "seed": i, "ignore_eos": True}
    chunks, done, finish = 0, False, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        if leave_early:
            await leave.wait()
            return {"early": True, "done": False, "finish": None, "chunks": 0}
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            payload = json.loads(data)
            assert "error" not in payload, payload
            chunks += 1
            finish = payload["choices"][0]["finish_reason"] or finish
    return {"early": False, "done": done, "finish": finish, "chunks": chunks}


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} {labels} missing")


def test_64_streaming_clients_some_leaving(live_factory):
    srv = live_factory()
    early = CLIENTS // 4
    # Held, the engine generates nothing until every client is in and the early ones have gone,
    # so the token count below is exact whatever the machine's load.
    srv.engine.hold()

    async def main():
        leave = asyncio.Event()
        limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=srv.hang_s, limits=limits) as http:
            tasks = [asyncio.ensure_future(_client(srv.url, i, http, leave)) for i in range(CLIENTS)]
            await asyncio.to_thread(srv.wait_engine_in_flight, CLIENTS)
            leave.set()
            # Stayed sequences cannot finish while held: CLIENTS - early means the early ones were aborted.
            await asyncio.to_thread(srv.wait_engine_in_flight, CLIENTS - early)
            srv.engine.release()
            return await asyncio.gather(*tasks)
    results = asyncio.run(main())
    stayed = [r for r in results if not r["early"]]
    assert len(stayed) == CLIENTS - early
    assert all(r["done"] and r["finish"] == "length" for r in stayed), stayed
    srv.wait_idle()
    metrics = httpx.get(srv.url + "/metrics").text
    assert _metric(metrics, "spinquant_requests_total", path="/v1/completions", status="200") == CLIENTS
    assert _metric(metrics, "spinquant_requests_in_flight") == 0
    assert _metric(metrics, "spinquant_engine_sequences_in_flight") == 0
    # Clients that stayed got every token; those that left were cancelled inside the engine.
    assert _metric(metrics, "spinquant_generation_tokens_total") == len(stayed) * MAX_TOKENS
    assert srv.engine.num_generated_tokens == len(stayed) * MAX_TOKENS
    # The server still answers normally afterwards.
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_load_client_counts_every_token(live_factory, capsys):
    from spinquant_testutils import load_script

    load_client = load_script("load_client")
    srv = live_factory()
    assert load_client.main(["--url", srv.url, "--model", "tiny", "--concurrency", "4", "--requests", "8",
                             "--prompt-tokens", "5", "--max-tokens", "6", "--vocab", "384"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["completed"], result["errors"], result["output_tokens"]) == (8, 0, 48)
    assert result["ttft_p50_s"] <= result["latency_p50_s"]
    srv.wait_idle()


def test_sse_events_survive_splitlines_readers():
    """Generated text may hold U+2028 / U+0085: each SSE event must stay one line for any reader."""
    from spinquant_server.responses import sse

    event = sse({"choices": [{"text": "a\u2028b\x85c\u2029d\r\n"}]})
    assert event.endswith("\n\n") and len(event.strip().splitlines()) == 1
    assert json.loads(event[len("data: "):])["choices"][0]["text"] == "a\u2028b\x85c\u2029d\r\n"
