"""The OpenAI routes: completions, chat completions, models, health, metrics, config.

`add_routes` puts on a FastAPI app the routes and the exception handlers that turn
every failure into OpenAI's ``{"error": {...}}`` body; bad input is a 4xx naming the
field. `RequestHandler` checks a validated request against the model and the limits,
tokenizes it into engine jobs and hands them to `spinquant_server.responses`, which
answers as one body or as server-sent events. A client that disconnects (streaming
or not) cancels its sequences inside the engine.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from spinquant_server.engine import SamplingOptions
from spinquant_server.protocol import (ERROR_RESPONSES, ChatCompletionRequest, CompletionRequest, OpenAIError,
                                       validation_param)
from spinquant_server.responses import ChatBuilder, CompletionBuilder, EngineJob, Job, decode
from spinquant_server.state import CLIENT_CLOSED, ServerState

logger = logging.getLogger(__name__)


def error_response(err: OpenAIError) -> JSONResponse:
    """`err` as a JSON response (OpenAI's error body, its status and headers)."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the request body was read before)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


async def until_disconnect(request: Request, work: Any) -> Any:
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
    raise ClientGone()


class RequestHandler:
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

    # -- completions
    def completion_jobs(self, req: CompletionRequest) -> list[Job]:
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
                text = decode(self.engine.tokenizer, ids)
            if not ids:
                raise OpenAIError(400, "prompt must not be empty (it encodes to 0 tokens)", param="prompt",
                                  code="invalid_value")
            jobs.append(Job(text, ids))
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
        engine_jobs: list[EngineJob] = []
        for p, job in enumerate(jobs):
            max_tokens = self.max_tokens_for(len(job.ids), 1 if score_only else req.max_tokens, 16,
                                             "max_tokens", "prompt")
            for i in range(n):
                opts = self.options(req, max_tokens, i, req.logprobs,
                                    req.logprobs if (echo and req.logprobs is not None) else None)
                engine_jobs.append((p * n + i, job.ids, opts, ""))
        rid = f"cmpl-{uuid.uuid4().hex}"
        engine_jobs = [(idx, ids, opts, f"{rid}-{idx}") for idx, ids, opts, _ in engine_jobs]
        ctx = CompletionBuilder(self.engine, self.state.metrics, req, model, rid, jobs, n, echo, score_only)
        if req.stream:
            return StreamingResponse(ctx.stream(engine_jobs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        body = await until_disconnect(request, ctx.collect(engine_jobs))
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
        engine_jobs: list[EngineJob] = [(i, ids, self.options(req, max_tokens, i, logprobs, None), f"{rid}-{i}")
                                        for i in range(n)]
        ctx = ChatBuilder(self.engine, self.state.metrics, req, model, rid, len(ids), n)
        if req.stream:
            return StreamingResponse(ctx.stream(engine_jobs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        body = await until_disconnect(request, ctx.collect(engine_jobs))
        return JSONResponse(body)


def add_routes(app: FastAPI, state: ServerState) -> None:
    """Register the routes and the OpenAI error handlers of `state`'s server on `app`."""
    engine, settings = state.engine, state.settings
    handler = RequestHandler(state)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return error_response(OpenAIError(400, f"request body is not valid JSON: {first.get('msg')}",
                                              code="invalid_json"))
        param = validation_param(loc)
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        msg = f"{param or 'body'}: {first.get('msg')} (got {shown})"
        if len(errors) > 1:
            msg += f"; and {len(errors) - 1} more error(s)"
        return error_response(OpenAIError(400, msg, param=param, code="invalid_type"
                                          if "type" in str(first.get("type")) else "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(OpenAIError(exc.status_code, str(exc.detail), type=kind, code=None,
                                          headers=dict(exc.headers or {})))

    @app.exception_handler(ClientGone)
    async def _client_gone(_request: Request, _exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                          code="internal_error"))

    @app.get("/health", responses={503: ERROR_RESPONSES[503]})
    async def health() -> Response:
        if state.draining.is_set():
            return error_response(OpenAIError(503, "server is draining", type="server_error", code="draining",
                                              headers={"Retry-After": str(settings.retry_after_s)}))
        try:
            await engine.check_health()
        # vLLM raises EngineDeadError (an Exception, not a RuntimeError) for a dead engine core.
        except Exception as exc:  # noqa: BLE001
            return error_response(OpenAIError(503, f"engine unhealthy: {exc}", type="server_error",
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
