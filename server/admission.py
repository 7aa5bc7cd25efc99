"""Admission: the limits a request passes before any route sees it.

`AdmissionGuard` is a pure ASGI middleware in front of the routes. Before any JSON is
parsed it answers, in this order:

* 401: an API key is set and the request to ``/v1/*`` lacks ``Authorization: Bearer <key>``
  (``/health`` and ``/metrics`` stay open for probes);
* 503 + Retry-After: a generation request while the server drains for shutdown;
* 429 + Retry-After: a generation request beyond ``max_concurrency`` in flight
  (refused, not queued: the engine does the queueing of admitted sequences);
* 413: a body over ``max_request_bytes``, by ``Content-Length`` or counted while a
  chunked body is read.

It also records every request in the Prometheus series (path, status, latency).
"""
from __future__ import annotations

import json
import time
from typing import Any

from spinquant_server.protocol import OpenAIError
from spinquant_server.state import CLIENT_CLOSED, ServerState

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# Paths with their own metric label; anything else is counted as "other".
METRIC_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics", "/v1/spinquant/config")


async def send_error(send: Any, err: OpenAIError) -> None:
    """Answer `err` through a raw ASGI `send` (OpenAI's error body, its headers)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AdmissionGuard:
    """Auth, draining, concurrency and body size, ahead of routing; request metrics.

    Args:
        app: the ASGI app behind the guard.
        state: the server's state (settings, metrics, `in_flight`, `draining`).
    """

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, metrics = self.state, self.state.metrics
        path = scope["path"]
        label = path if path in METRIC_PATHS else "other"
        generation = path in GENERATION_PATHS
        status_seen = [CLIENT_CLOSED]
        admitted = False
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
            await send(message)

        try:
            err = self._admission_error(scope, generation)
            if err is None:
                receive, err = await self._buffer_body(scope, receive)
            if err is not None:
                await send_error(send_wrapper, err)
                return
            if generation:
                state.in_flight += 1
                metrics.in_flight.inc()
                admitted = True
            await self.app(scope, receive, send_wrapper)
        finally:
            # Counted before it leaves `in_flight`: whoever sees in_flight drop sees its status too.
            metrics.requests.labels(label, str(status_seen[0])).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - t0)
            if admitted:
                state.in_flight -= 1
                metrics.in_flight.dec()

    def _admission_error(self, scope: dict, generation: bool) -> OpenAIError | None:
        state, settings = self.state, self.state.settings
        retry = {"Retry-After": str(settings.retry_after_s)}
        if settings.api_key is not None and scope["path"].startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or token.strip() != settings.api_key:
                state.metrics.rejected.labels("auth").inc()
                return OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   type="authentication_error", code="invalid_api_key")
        if generation and state.draining.is_set():
            state.metrics.rejected.labels("draining").inc()
            return OpenAIError(503, "server is shutting down and drains in-flight requests",
                               type="server_error", code="draining", headers=retry)
        if generation and state.in_flight >= settings.max_concurrency:
            state.metrics.rejected.labels("concurrency").inc()
            return OpenAIError(429, f"too many concurrent requests: {state.in_flight} in flight, "
                               f"limit max_concurrency={settings.max_concurrency}",
                               type="rate_limit_error", code="concurrency_limit", headers=retry)
        return None

    async def _buffer_body(self, scope: dict, receive: Any) -> tuple[Any, OpenAIError | None]:
        """Read the whole body (at most max_request_bytes) and replay it to the app.

        Returns (the receive callable the app should use, the 413 error or None).
        """
        limit = self.state.settings.max_request_bytes

        def too_large(seen: int) -> OpenAIError:
            self.state.metrics.rejected.labels("size").inc()
            return OpenAIError(413, f"request body of {seen} bytes exceeds max_request_bytes={limit}",
                               type="invalid_request_error", code="request_too_large")

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return receive, too_large(int(declared))
        if scope.get("method") in ("GET", "HEAD"):
            return receive, None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # Disconnected while sending the body: let the app see it.
                chunks_done = [message]
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return receive, too_large(size)
            chunks.append(body)
            if not message.get("more_body", False):
                chunks_done = []
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}] + chunks_done

        async def replay_receive() -> dict:
            if replay:
                return replay.pop(0)
            return await receive()

        return replay_receive, None
