"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming as SSE or not),
GET /v1/models, GET /v1/models/{model}, GET /health, GET /metrics (Prometheus text),
GET /v1/spinquant/config (the checkpoint's quantization settings).

A pure ASGI guard in front of the routes answers, before any JSON is parsed:
401 (API key on /v1/*), 413 (body over `max_request_bytes`), 429 with Retry-After
(more than `max_concurrency` generation requests in flight) and 503 with Retry-After
(draining for shutdown). Every error body is OpenAI's ``{"error": {...}}``; bad input
is a 4xx naming the field. A client that disconnects (streaming or not) cancels its
sequences inside the engine.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from spinquant_server.engine import Engine, GenerationOutput, SamplingOptions, TokenLogprob
from spinquant_server.protocol import (ERROR_RESPONSES, ChatCompletionRequest, CompletionRequest, OpenAIError,
                                       validation_param)

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
_METRIC_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics", "/v1/spinquant/config")
# Status recorded for a request whose client went away before the answer.
CLIENT_CLOSED = 499


@dataclass
class ServerSettings:
    """Limits and options of one server.

    Attributes:
        served_model_name: the ``model`` clients name (requests naming another get 404).
        api_key: when set, /v1/* needs ``Authorization: Bearer <api_key>``.
        max_concurrency: generation requests in flight at most; more are answered 429.
        max_request_bytes: request bodies above this are answered 413.
        max_choices: prompts x n per request at most (400 above).
        retry_after_s: the Retry-After of 429 / 503 answers.
    """
    served_model_name: str
    api_key: str | None = None
    max_concurrency: int = 256
    max_request_bytes: int = 4 * 1024 * 1024
    max_choices: int = 256
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_request_bytes", "max_choices", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not self.served_model_name:
            raise ValueError("ServerSettings.served_model_name must be non-empty")


class Metrics:
    """Prometheus series of one server (own registry, so several apps can live in one process)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("spinquant_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.in_flight = Gauge("spinquant_requests_in_flight", "Generation requests being answered", registry=r)
        self.rejected = Counter("spinquant_requests_rejected", "Requests refused by a limit",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("spinquant_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("spinquant_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("spinquant_request_latency_seconds", "Time to the end of the answer",
                                 ["path"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.engine_in_flight = Gauge("spinquant_engine_sequences_in_flight",
                                      "Sequences inside the engine", registry=r)
        self.engine_in_flight.set_function(lambda: engine.num_in_flight)


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    metrics: Metrics
    draining: bool = False
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------- helpers
def _error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _send_error(send: Any, err: OpenAIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _GuardMiddleware:
    """Auth, body size, concurrency, draining and request metrics, ahead of routing."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, settings, metrics = self.state, self.state.settings, self.state.metrics
        path = scope["path"]
        label = path if path in _METRIC_PATHS else "other"
        generation = path in GENERATION_PATHS
        status_seen = [CLIENT_CLOSED]
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
                await _send_error(send_wrapper, err)
                return
            if not generation:
                await self.app(scope, receive, send_wrapper)
                return
            state.in_flight += 1
            metrics.in_flight.inc()
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                state.in_flight -= 1
                metrics.in_flight.dec()
        finally:
            metrics.requests.labels(label, str(status_seen[0])).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - t0)

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
        if generation and state.draining:
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
        """Read the whole body (at most max_request_bytes) and replay it to the app."""
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


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await `work` unless the client disconnects first; then cancel it (aborting the engine)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise _ClientGone()


async def _merge(engine: Engine, jobs: list[tuple[int, list[int], SamplingOptions, str]]
                 ) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Run several sequences at once; yield (choice index, output) as they arrive.

    Leaving early (exception, cancellation, closing) cancels every sequence.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], options: SamplingOptions, rid: str) -> None:
        try:
            async for out in engine.generate(ids, options, rid):
                queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which decides
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(*job)) for job in jobs]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(payload: dict[str, Any]) -> str:
    # ASCII-only JSON: generated text may hold U+2028 / U+0085, which line readers built on
    # str.splitlines (httpx's aiter_lines among them) take for line breaks.
    return f"data: {json.dumps(payload, ensure_ascii=True)}\n\n"


def _engine_error(exc: Exception) -> OpenAIError:
    if isinstance(exc, ValueError):
        return OpenAIError(400, str(exc), code="invalid_value")
    logger.error("engine failure: %s: %s", type(exc).__name__, exc)
    return OpenAIError(500, f"engine failure: {type(exc).__name__}", type="server_error", code="engine_error")


# ---------------------------------------------------------------------------- request handling
@dataclass
class _Job:
    """One prompt of a request, tokenized and checked."""
    text: str
    ids: list[int]


class _Handler:
    """Turns validated request models into engine jobs and OpenAI responses."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.engine = state.engine
        self.settings = state.settings

    # -- checks shared by both endpoints
    def check_model(self, model: str | None) -> str:
        name = self.settings.served_model_name
        if model is not None and model != name:
            raise OpenAIError(404, f"model {model!r} does not exist; this server serves {name!r}",
                              type="not_found_error", param="model", code="model_not_found")
        return name

    def check_common(self, req: Any) -> None:
        if req.stop is not None:
            stops = [req.stop] if isinstance(req.stop, str) else req.stop
            if any(s == "" for s in stops):
                raise OpenAIError(400, "stop strings must be non-empty, got ''", param="stop", code="invalid_value")

    def max_tokens_for(self, prompt_len: int, asked: int | None, default: int | None, param: str,
                       prompt_param: str) -> int:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise OpenAIError(400, f"prompt has {prompt_len} tokens; the context is max_model_len={limit} "
                              "tokens and leaves no room to generate", param=prompt_param,
                              code="context_length_exceeded")
        room = limit - prompt_len
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise OpenAIError(400, f"{param}={asked} plus the prompt's {prompt_len} tokens exceeds "
                              f"max_model_len={limit}", param=param, code="context_length_exceeded")
        return asked

    def options(self, req: Any, max_tokens: int, choice: int, logprobs: int | None,
                prompt_logprobs: int | None) -> SamplingOptions:
        stop = () if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
        seed = None if req.seed is None else (req.seed + choice) % 2**63
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            seed=seed, stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            ignore_eos=bool(req.ignore_eos))

    def check_choices(self, n_prompts: int, n: int) -> None:
        if n_prompts * n > self.settings.max_choices:
            raise OpenAIError(400, f"{n_prompts} prompts x n={n} choices exceeds max_choices="
                              f"{self.settings.max_choices} per request", param="n", code="too_many_choices")

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON can carry lone surrogates ("\ud800") that no tokenizer accepts.
            raise OpenAIError(400, f"{param} is not valid Unicode text: {exc.reason} at index {exc.start}",
                              param=param, code="invalid_value") from exc
        return list(self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- completions
    def completion_jobs(self, req: CompletionRequest) -> list[_Job]:
        prompt = req.prompt
        if isinstance(prompt, str):
            raw: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            raw = [prompt]
        else:
            raw = list(prompt)
        jobs = []
        vocab = self.engine.vocab_size
        for p in raw:
            if isinstance(p, str):
                ids = self.encode(p, "prompt")
                text = p
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise OpenAIError(400, f"prompt token ids must be in [0, {vocab}), got {bad[:4]}",
                                      param="prompt", code="invalid_value")
                ids = list(p)
                text = self.decode(ids)
            if not ids:
                raise OpenAIError(400, "prompt must not be empty (it encodes to 0 tokens)", param="prompt",
                                  code="invalid_value")
            jobs.append(_Job(text, ids))
        return jobs

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        model = self.check_model(req.model)
        self.check_common(req)
        for name in ("best_of", "suffix", "logit_bias"):
            if getattr(req, name) is not None:
                raise OpenAIError(400, f"{name} is not supported by this server, got {getattr(req, name)!r}",
                                  param=name, code="unsupported_parameter")
        echo = bool(req.echo)
        if req.max_tokens == 0 and not echo:
            raise OpenAIError(400, "max_tokens=0 is only allowed with echo=true (prompt scoring)",
                              param="max_tokens", code="invalid_value")
        n = req.n or 1
        jobs = self.completion_jobs(req)
        self.check_choices(len(jobs), n)
        score_only = req.max_tokens == 0
        engine_jobs = []
        for p, job in enumerate(jobs):
            max_tokens = self.max_tokens_for(len(job.ids), 1 if score_only else req.max_tokens, 16,
                                             "max_tokens", "prompt")
            for i in range(n):
                opts = self.options(req, max_tokens, i, req.logprobs,
                                    req.logprobs if (echo and req.logprobs is not None) else None)
                engine_jobs.append((p * n + i, job.ids, opts, ""))
        rid = f"cmpl-{uuid.uuid4().hex}"
        engine_jobs = [(idx, ids, opts, f"{rid}-{idx}") for idx, ids, opts, _ in engine_jobs]
        ctx = _CompletionContext(self, req, model, rid, jobs, n, echo, score_only)
        if req.stream:
            return StreamingResponse(ctx.stream(engine_jobs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        body = await _until_disconnect(request, ctx.collect(engine_jobs))
        return JSONResponse(body)

    # -- chat
    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise OpenAIError(400, "the served model's tokenizer has no chat template; use /v1/completions",
                              param="messages", code="no_chat_template")
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            msg: dict[str, Any] = {"role": m.role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        try:
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=bool(req.add_generation_prompt))
        # Templates reject conversations with raise_exception() (e.g. roles out of order).
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
            raise OpenAIError(400, f"chat template rejected the messages: {exc}", param="messages",
                              code="invalid_messages") from exc
        ids = self.encode(text, "messages", add_special_tokens=False)
        if not ids:
            raise OpenAIError(400, "messages render to an empty prompt", param="messages", code="invalid_value")
        return ids

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        model = self.check_model(req.model)
        self.check_common(req)
        for name in ("tools", "response_format", "logit_bias"):
            if getattr(req, name) is not None:
                raise OpenAIError(400, f"{name} is not supported by this server", param=name,
                                  code="unsupported_parameter")
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        n = req.n or 1
        self.check_choices(1, n)
        ids = self.chat_prompt(req)
        asked, param = ((req.max_completion_tokens, "max_completion_tokens")
                        if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
        max_tokens = self.max_tokens_for(len(ids), asked, None, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        engine_jobs = [(i, ids, self.options(req, max_tokens, i, logprobs, None), f"{rid}-{i}") for i in range(n)]
        ctx = _ChatContext(self, req, model, rid, len(ids), n)
        if req.stream:
            return StreamingResponse(ctx.stream(engine_jobs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        body = await _until_disconnect(request, ctx.collect(engine_jobs))
        return JSONResponse(body)


class _CompletionLogprobs:
    """Accumulates OpenAI completions-style logprobs of one choice."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, entries: list[TokenLogprob | None], offset: int, prompt_first: str | None = None) -> int:
        """Append entries; `offset` is the text offset of the first. Returns the offset after them."""
        for e in entries:
            self.text_offset.append(offset)
            if e is None:  # the first prompt token: nothing predicts it
                token = prompt_first or ""
                self.tokens.append(token)
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
            else:
                token = e.token
                self.tokens.append(token)
                self.token_logprobs.append(e.logprob)
                top = {t: lp for _, t, lp in e.top}
                top.setdefault(e.token, e.logprob)
                self.top_logprobs.append(top)
            offset += len(token)
        return offset

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}

    def slice_from(self, start: int) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


class _CompletionContext:
    def __init__(self, h: _Handler, req: CompletionRequest, model: str, rid: str, jobs: list[_Job],
                 n: int, echo: bool, score_only: bool) -> None:
        self.h, self.req, self.model, self.rid, self.jobs, self.n = h, req, model, rid, jobs, n
        self.echo, self.score_only = echo, score_only
        self.created = int(time.time())
        self.want_logprobs = req.logprobs is not None
        count = len(jobs) * n
        self.text = [""] * count
        self.offset = [0] * count
        self.lps = [_CompletionLogprobs() for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.completion_tokens = 0
        self.started = [False] * count

    def _job(self, index: int) -> _Job:
        return self.jobs[index // self.n]

    def _absorb(self, index: int, out: GenerationOutput) -> tuple[str, int]:
        """Fold one output into choice `index`; returns (new text, index of its first new logprob)."""
        first_lp = len(self.lps[index].tokens)
        new = ""
        if not self.started[index]:
            self.started[index] = True
            if self.echo:
                job = self._job(index)
                new += job.text
                if self.want_logprobs and out.prompt_logprobs is not None:
                    self.offset[index] = self.lps[index].add(out.prompt_logprobs, 0,
                                                             prompt_first=self.h.decode(job.ids[:1]))
                self.offset[index] = len(job.text)
        if self.score_only:
            # max_tokens=0 scoring: the one token the engine had to generate is dropped.
            self.finish[index] = "length" if out.finished else None
            self.text[index] += new
            return new, first_lp
        self.completion_tokens += len(out.token_ids)
        self.h.state.metrics.generated_tokens.inc(len(out.token_ids))
        new += out.text
        if self.want_logprobs and out.logprobs:
            self.offset[index] = self.lps[index].add(out.logprobs, self.offset[index])
        self.text[index] += new
        self.finish[index] = out.finish_reason
        return new, first_lp

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(j.ids) for j in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _count_prompt(self) -> None:
        self.h.state.metrics.prompt_tokens.inc(sum(len(j.ids) for j in self.jobs))

    async def collect(self, engine_jobs: list) -> dict[str, Any]:
        self._count_prompt()
        try:
            async for index, out in _merge(self.h.engine, engine_jobs):
                self._absorb(index, out)
        except Exception as exc:  # noqa: BLE001 - engine errors become OpenAI errors (400 / 500)
            raise _engine_error(exc) from exc
        choices = [{"index": i, "text": self.text[i],
                    "logprobs": self.lps[i].to_dict() if self.want_logprobs else None,
                    "finish_reason": self.finish[i]} for i in range(len(self.text))]
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}

    async def stream(self, engine_jobs: list) -> AsyncIterator[str]:
        self._count_prompt()
        base = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model}
        try:
            async for index, out in _merge(self.h.engine, engine_jobs):
                new, first_lp = self._absorb(index, out)
                finish = self.finish[index]
                if not new and finish is None and not (self.want_logprobs and out.logprobs):
                    continue
                choice = {"index": index, "text": new,
                          "logprobs": self.lps[index].slice_from(first_lp) if self.want_logprobs else None,
                          "finish_reason": finish}
                yield _sse({**base, "choices": [choice]})
        # The status line is already sent: an engine error ends the stream with an error event.
        except Exception as exc:  # noqa: BLE001
            yield _sse(_engine_error(exc).body())
        else:
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage()})
        yield "data: [DONE]\n\n"


def _chat_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode("utf-8")),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                              for _, t, lp in e.top]} for e in entries]


class _ChatContext:
    def __init__(self, h: _Handler, req: ChatCompletionRequest, model: str, rid: str, prompt_len: int,
                 n: int) -> None:
        self.h, self.req, self.model, self.rid, self.prompt_len, self.n = h, req, model, rid, prompt_len, n
        self.created = int(time.time())
        self.want_logprobs = bool(req.logprobs)
        self.text = [""] * n
        self.lps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.completion_tokens = 0

    def _absorb(self, index: int, out: GenerationOutput) -> list[dict[str, Any]]:
        self.completion_tokens += len(out.token_ids)
        self.h.state.metrics.generated_tokens.inc(len(out.token_ids))
        self.text[index] += out.text
        self.finish[index] = out.finish_reason
        new_lps = _chat_logprobs(out.logprobs) if (self.want_logprobs and out.logprobs) else []
        self.lps[index].extend(new_lps)
        return new_lps

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_len + self.completion_tokens}

    async def collect(self, engine_jobs: list) -> dict[str, Any]:
        self.h.state.metrics.prompt_tokens.inc(self.prompt_len)
        try:
            async for index, out in _merge(self.h.engine, engine_jobs):
                self._absorb(index, out)
        except Exception as exc:  # noqa: BLE001 - engine errors become OpenAI errors (400 / 500)
            raise _engine_error(exc) from exc
        choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                    "logprobs": {"content": self.lps[i]} if self.want_logprobs else None,
                    "finish_reason": self.finish[i]} for i in range(self.n)]
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}

    async def stream(self, engine_jobs: list) -> AsyncIterator[str]:
        self.h.state.metrics.prompt_tokens.inc(self.prompt_len)
        base = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        for i in range(self.n):
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        try:
            async for index, out in _merge(self.h.engine, engine_jobs):
                new_lps = self._absorb(index, out)
                if not out.text and not out.finished and not new_lps:
                    continue
                delta = {"content": out.text} if out.text else {}
                yield _sse({**base, "choices": [{"index": index, "delta": delta,
                                                 "logprobs": {"content": new_lps} if self.want_logprobs else None,
                                                 "finish_reason": out.finish_reason}]})
        # The status line is already sent: an engine error ends the stream with an error event.
        except Exception as exc:  # noqa: BLE001
            yield _sse(_engine_error(exc).body())
        else:
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage()})
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------- the app
def create_app(engine: Engine, settings: ServerSettings, *, manage_engine: bool = True) -> FastAPI:
    """Build the FastAPI app serving `engine`.

    Args:
        engine: the engine; started in the app's lifespan and shut down after the
            in-flight requests drained (unless `manage_engine` is False).
        settings: limits and the served model name.
    """
    state = ServerState(engine=engine, settings=settings, metrics=Metrics(engine))
    handler = _Handler(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            state.draining = True
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="spinquant-vllm OpenAI-compatible server", version="0.1.0", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return _error_response(OpenAIError(400, f"request body is not valid JSON: {first.get('msg')}",
                                               code="invalid_json"))
        param = validation_param(loc)
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        msg = f"{param or 'body'}: {first.get('msg')} (got {shown})"
        if len(errors) > 1:
            msg += f"; and {len(errors) - 1} more error(s)"
        return _error_response(OpenAIError(400, msg, param=param, code="invalid_type"
                                           if "type" in str(first.get("type")) else "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(OpenAIError(exc.status_code, str(exc.detail), type=kind, code=None,
                                           headers=dict(exc.headers or {})))

    @app.exception_handler(_ClientGone)
    async def _client_gone(_request: Request, _exc: _ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _error_response(OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                           code="internal_error"))

    @app.get("/health", responses={503: ERROR_RESPONSES[503]})
    async def health() -> Response:
        if state.draining:
            return _error_response(OpenAIError(503, "server is draining", type="server_error", code="draining",
                                               headers={"Retry-After": str(settings.retry_after_s)}))
        try:
            await engine.check_health()
        # vLLM raises EngineDeadError (an Exception, not a RuntimeError) for a dead engine core.
        except Exception as exc:  # noqa: BLE001
            return _error_response(OpenAIError(503, f"engine unhealthy: {exc}", type="server_error",
                                               code="engine_unhealthy"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_card() -> dict[str, Any]:
        return {"id": settings.served_model_name, "object": "model", "created": state.created,
                "owned_by": "spinquant", "root": engine.model_info().get("path"),
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model}", responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]})
    async def model(model: str) -> dict[str, Any]:
        handler.check_model(model)
        return _model_card()

    @app.get("/v1/spinquant/config", responses={401: ERROR_RESPONSES[401]})
    async def spinquant_config() -> dict[str, Any]:
        return {"model": settings.served_model_name, "engine": engine.kind,
                "quantization_config": engine.quantization_config(), "checkpoint_meta": engine.checkpoint_meta(),
                "model_info": engine.model_info()}

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await handler.completions(body, request)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await handler.chat(body, request)

    app.add_middleware(_GuardMiddleware, state=state)
    return app


def set_draining(app: FastAPI) -> None:
    """Refuse new generation requests (503) while the in-flight ones finish."""
    app.state.server.draining = True


class Server(uvicorn.Server):
    """uvicorn's server, marking the app as draining as soon as shutdown begins.

    uvicorn stops accepting connections and waits (up to timeout_graceful_shutdown)
    for in-flight responses; requests arriving on open keep-alive connections in
    the meantime get 503 + Retry-After instead of being started.
    """

    def __init__(self, config: uvicorn.Config, on_started: Any = None) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started(self)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._mark_draining()
        super().handle_exit(sig, frame)
        # Exit with status 0 after a graceful drain instead of re-raising the signal
        # (uvicorn 0.54 records handled signals here and raises them again on exit).
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    async def shutdown(self, sockets: list | None = None) -> None:
        self._mark_draining()
        await super().shutdown(sockets=sockets)

    def _mark_draining(self) -> None:
        app = self.config.app
        if isinstance(app, FastAPI) and hasattr(app.state, "server"):
            app.state.server.draining = True
