"""Closed-loop load generator for any OpenAI-compatible server (this one or ``vllm serve``).

    python benchmarks/load_client.py --url http://127.0.0.1:8000 --model NAME \
        --concurrency 64 --requests 512 --prompt-tokens 128 --max-tokens 128

Each of ``--concurrency`` workers sends streaming /v1/completions requests back to back
(token-id prompts of ``--prompt-tokens`` random ids, ``ignore_eos`` so every request
generates exactly ``--max-tokens``) until ``--requests`` are done. It prints one JSON line:
requests/s, output tokens/s, time to first token and end-to-end latency percentiles, and
error count. Run it against this server and against ``vllm serve`` on the same checkpoint
and workload to measure the server's overhead. Token counts come from the server's
``usage`` (``stream_options.include_usage``), not from counting chunks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def _one(http: Any, url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """Send one streaming completion; returns (time to first token, total time, completion tokens)."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, tokens


async def run(url: str, model: str, concurrency: int, requests: int, prompt_tokens: int, max_tokens: int,
              vocab: int, seed: int, api_key: str | None) -> dict[str, Any]:
    """Send `requests` streaming completions from `concurrency` workers to the server at `url`.

    Prompts are `prompt_tokens` ids drawn from [100, vocab) with `seed`. Returns the summary
    that `main` prints (rates, TTFT / TPOT / latency percentiles in seconds, error count).
    """
    import httpx

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_tokens)] for _ in range(requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ttfts: list[float] = []
    totals: list[float] = []
    tpots: list[float] = []  # time per output token after the first
    tokens = 0
    errors: list[str] = []
    next_index = 0

    async def worker(http: Any) -> None:
        nonlocal next_index, tokens
        while next_index < requests:
            i = next_index
            next_index += 1
            body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            try:
                ttft, total, n = await _one(http, url, body)
            # A failed request is counted and reported; the run goes on.
            except (RuntimeError, ValueError, httpx.HTTPError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            ttfts.append(ttft)
            totals.append(total)
            if n > 1:
                tpots.append((total - ttft) / (n - 1))
            tokens += n

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(http) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {
        "url": url, "concurrency": concurrency, "requests": requests, "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens, "wall_s": round(wall, 3), "completed": len(totals), "errors": len(errors),
        "first_errors": errors[:3], "requests_per_s": round(len(totals) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1), "output_tokens": tokens,
        "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
        "tpot_p50_s": _percentile(tpots, 50), "tpot_p99_s": _percentile(tpots, 99),
        "latency_p50_s": _percentile(totals, 50), "latency_p99_s": _percentile(totals, 99),
        "latency_mean_s": statistics.fmean(totals) if totals else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/load_client.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn from [100, vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    a = p.parse_args(argv)
    for name in ("concurrency", "requests", "prompt_tokens", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.vocab <= 100:
        p.error(f"--vocab must be > 100, got {a.vocab}")
    result = asyncio.run(run(a.url.rstrip("/"), a.model, a.concurrency, a.requests, a.prompt_tokens,
                             a.max_tokens, a.vocab, a.seed, a.api_key))
    print(json.dumps(result), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
