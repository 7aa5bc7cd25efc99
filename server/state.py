"""What one server holds: its settings, its Prometheus series and its shared counters.

`ServerState` is created by `spinquant_server.app.create_app` and shared by the
admission guard (`spinquant_server.admission`), the OpenAI handlers
(`spinquant_server.handlers`) and the lifecycle (`spinquant_server.app`). Everything in
it is touched from the server's event loop only, except `draining`, a
`threading.Event` that other threads may set (uvicorn's signal handler) and wait on (tests).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spinquant_server.engine import Engine

# Status recorded for a request whose client went away before the answer (nginx's convention).
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
    """The engine, settings and live counters of one app.

    Attributes:
        draining: set once shutdown begins; from then on generation requests and /health
            get 503. A `threading.Event` so a thread can wait for shutdown to have begun.
        in_flight: generation requests admitted and not yet answered.
        created: Unix time of the app's creation (the model card's ``created``).
    """
    engine: Engine
    settings: ServerSettings
    metrics: Metrics
    draining: threading.Event = field(default_factory=threading.Event)
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
