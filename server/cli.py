"""The ``spinquant`` console script.

    spinquant quantize ...     -> spinquant_offline.cli (rotation learning, GPTQ/RTN, checkpoint)
    spinquant eval CKPT ...    -> spinquant_offline.cli (perplexity, zero-shot)
    spinquant serve CKPT ...   -> the OpenAI-compatible server (this package)

``serve`` prints one line ``spinquant: listening on http://HOST:PORT ...`` once the
socket accepts requests (and writes the URL to ``--ready-file`` when given), so scripts
can start it in the background and wait for it. ``--port 0`` picks a free port.
Flags it does not know are handed to vLLM's engine argument parser (``--engine vllm``).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from spinquant_kernels.options import API_KEY_ENV, options

_OFFLINE_COMMANDS = ("quantize", "eval")


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spinquant serve",
        description="Serve a SpinQuant checkpoint (or a plain Hugging Face model directory / GGUF file) "
                    "behind an OpenAI-compatible HTTP API. Unknown flags go to vLLM's engine arguments "
                    "(e.g. --gpu-memory-utilization 0.9, --enforce-eager, --tensor-parallel-size 2).")
    p.add_argument("checkpoint", help="checkpoint directory written by `spinquant quantize`")
    p.add_argument("--engine", choices=("auto", "cpu", "vllm"), default="auto",
                   help="auto: vllm when a CUDA GPU and vLLM are available, else the CPU reference engine")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default 8000)")
    p.add_argument("--api-key", default=options().api_key,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: env {API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the checkpoint directory's name)")
    p.add_argument("--max-concurrency", type=int, default=256,
                   help="generation requests in flight at most; more get 429 + Retry-After (default 256)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body; larger get 413 (default 4 MiB)")
    p.add_argument("--max-choices", type=int, default=256, help="prompts x n per request at most (default 256)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + generated); default: the model's")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to drain in-flight requests on SIGTERM / Ctrl-C before aborting them")
    p.add_argument("--ready-file", default=None, help="write the server URL to this file once it accepts requests")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    cpu = p.add_argument_group("CPU engine")
    cpu.add_argument("--cpu-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    cpu.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="CPU engine compute dtype (default float32)")
    cpu.add_argument("--no-kv-cache", action="store_true",
                     help="CPU engine: recompute the whole sequence each step instead of using the KV cache")
    return p


def resolve_engine(choice: str) -> str:
    """auto -> "vllm" when CUDA is available and vLLM importable, else "cpu"."""
    if choice != "auto":
        return choice
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "cpu"


def build_engine(args: argparse.Namespace, extra: list[str]) -> Any:
    """The engine named by the parsed ``serve`` flags (a CPU engine loads its model here)."""
    kind = resolve_engine(args.engine)
    if kind == "vllm":
        from spinquant_server.vllm_engine import VLLMEngine, build_engine_args

        engine_args = build_engine_args(args.checkpoint, extra, served_model_name=args.served_model_name,
                                        max_model_len=args.max_model_len)
        return VLLMEngine(engine_args)
    if extra:
        raise SystemExit(f"spinquant serve: flags {extra} are vLLM engine arguments; "
                         "they need --engine vllm (the CPU engine takes none)")
    import torch

    from spinquant_server.cpu_engine import CPUEngine

    return CPUEngine.from_checkpoint(args.checkpoint, max_model_len=args.max_model_len,
                                     dtype=getattr(torch, args.dtype), use_kv_cache=not args.no_kv_cache,
                                     num_threads=args.cpu_threads)


def _write_ready_file(path: str, url: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(url + "\n")
    os.replace(tmp, path)


def serve(argv: Sequence[str]) -> int:
    args, extra = _serve_parser().parse_known_args(list(argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.exists(args.checkpoint):
        raise SystemExit(f"spinquant serve: checkpoint {args.checkpoint!r} does not exist")
    import uvicorn

    from spinquant_server.app import Server, create_app
    from spinquant_server.state import ServerSettings

    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    settings = ServerSettings(served_model_name=name, api_key=args.api_key or None,
                              max_concurrency=args.max_concurrency, max_request_bytes=args.max_request_bytes,
                              max_choices=args.max_choices)
    engine = build_engine(args, extra)
    app = create_app(engine, settings)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise SystemExit(f"spinquant serve: cannot bind {args.host}:{args.port}: {exc}") from exc
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    url = f"http://{host}:{port}"

    def on_started(_server: Any) -> None:
        print(f"spinquant: listening on {url} (model {name!r}, engine {engine.kind})", flush=True)
        if args.ready_file:
            _write_ready_file(args.ready_file, url)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout,
                            access_log=args.log_level == "debug")
    server = Server(config, on_started=on_started)
    server.run(sockets=[sock])
    if args.ready_file and os.path.exists(args.ready_file):
        os.remove(args.ready_file)
    if not server.started:
        print("spinquant: the server failed to start (see the log above)", file=sys.stderr, flush=True)
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _OFFLINE_COMMANDS:
        # Imported lazily: the offline pipeline is heavy and serving does not need it.
        from spinquant_offline.cli import main as offline_main

        return offline_main(argv) or 0
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    print("usage: spinquant {quantize,eval,serve} ...\n"
          "  quantize   learn rotations and quantize a model into a checkpoint\n"
          "  eval       perplexity / zero-shot of a checkpoint\n"
          "  serve      OpenAI-compatible server over a checkpoint\n"
          "run `spinquant COMMAND --help` for the flags of one command", file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
