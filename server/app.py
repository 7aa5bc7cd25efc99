"""The app's lifecycle: `create_app` builds the FastAPI app over an `Engine`; `Server`
runs it under uvicorn and drains it on shutdown.

Module layout of the server: `spinquant_server.state` (settings, metrics, shared
counters), `spinquant_server.admission` (the ASGI guard: API key, draining,
concurrency, body size), `spinquant_server.handlers` (the OpenAI routes) and
`spinquant_server.responses` (bodies and server-sent events from engine outputs).

Lifecycle: the app's lifespan starts the engine before the first request. Shutdown
(SIGTERM, Ctrl-C, or ``Server.should_exit``) first sets `ServerState.draining`, so new
generation requests and /health get 503 + Retry-After; uvicorn stops accepting
connections and waits up to ``timeout_graceful_shutdown`` for the in-flight responses
to finish; then the lifespan shuts the engine down (aborting whatever is left).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from spinquant_server.admission import AdmissionGuard
from spinquant_server.engine import Engine
from spinquant_server.handlers import add_routes
from spinquant_server.state import Metrics, ServerSettings, ServerState


def create_app(engine: Engine, settings: ServerSettings, *, manage_engine: bool = True) -> FastAPI:
    """Build the FastAPI app serving `engine`; its `ServerState` is ``app.state.server``.

    Args:
        engine: the engine; started in the app's lifespan and shut down after the
            in-flight requests drained (unless `manage_engine` is False: the caller owns it).
        settings: limits and the served model name.
    """
    state = ServerState(engine=engine, settings=settings, metrics=Metrics(engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            state.draining.set()
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="spinquant-vllm OpenAI-compatible server", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    add_routes(app, state)
    app.add_middleware(AdmissionGuard, state=state)
    return app


def set_draining(app: FastAPI) -> None:
    """Refuse new generation requests (503) while the in-flight ones finish."""
    app.state.server.draining.set()


class Server(uvicorn.Server):
    """uvicorn's server, marking the app as draining as soon as shutdown begins.

    uvicorn stops accepting connections and waits (up to timeout_graceful_shutdown)
    for in-flight responses; requests arriving on open keep-alive connections in
    the meantime get 503 + Retry-After instead of being started.

    Args:
        config: uvicorn's config; its ``app`` is one made by `create_app`.
        on_started: called with the server once its sockets accept connections.
    """

    def __init__(self, config: uvicorn.Config, on_started: Callable[[Server], None] | None = None) -> None:
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
            app.state.server.draining.set()
