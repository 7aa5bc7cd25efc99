"""Serving sweep: start each configuration's server, drive /v1/completions, record the curves.

For every configuration (a server command line), this script starts the server,
waits for ``/health``, then for each shape (prompt/output tokens) and
concurrency runs the closed-loop streaming client of ``load_client.py``
(``ignore_eos``, so every request produces its full output), records output
tok/s, TTFT and TPOT p50/p99, and stops the server before the next
configuration. Results go to ``serving_sweep_raw.json`` under ``--out``
(appended to with ``--resume``); ``benchmarks/report.py`` turns them into the
table and plots.

Configurations are given as ``NAME=COMMAND`` where COMMAND is a server command
line with ``{port}`` (and optionally ``{models}``) in it, e.g. on an H100 with vLLM 0.26 and this
project installed:

    python benchmarks/models.py --out /tmp/models --only llama3-8b
    python3 benchmarks/serving_sweep.py --out $OUT --models /tmp/models/llama3-8b \
      --config "bf16=vllm serve {models}/bf16 --tokenizer {models}/tokenizer --load-format dummy --port {port}" \
      --config "spinquant_w4a4kv16=vllm serve {models}/spinquant_w4a4kv16 --tokenizer {models}/tokenizer \
                --load-format dummy --port {port}"

Each (shape, concurrency) point sends ``max(--min-requests, 2 * concurrency)``
requests; ``--deadline-s`` bounds the whole invocation so it fits one device
call (run the suite in parts and merge with ``--resume``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)
from load_client import run as bench_run  # benchmarks/load_client.py, likewise

DEFAULT_SHAPES = ("1024x256", "4096x512", "128x1024")
DEFAULT_CONCURRENCY = (1, 8, 32, 128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"server not healthy after {timeout_s:.0f} s")


def _served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def _parse_shape(s: str) -> tuple[int, int]:
    try:
        p, o = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be PROMPTxOUTPUT tokens, e.g. 1024x256, got {s!r}") from None
    if p < 1 or o < 1:
        raise argparse.ArgumentTypeError(f"shape tokens must be >= 1, got {s!r}")
    return p, o


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", action="append", required=True, metavar="NAME=COMMAND")
    ap.add_argument("--models", default=".", help="substituted for {models} in the commands")
    ap.add_argument("--shapes", nargs="+", type=_parse_shape, default=[_parse_shape(s) for s in DEFAULT_SHAPES])
    ap.add_argument("--concurrency", nargs="+", type=int, default=list(DEFAULT_CONCURRENCY))
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--deadline-s", type=float, default=540, help="start no new point after this many seconds")
    ap.add_argument("--start-margin-s", type=float, default=0,
                    help="start no new configuration (server) after deadline minus this many seconds")
    ap.add_argument("--resume", default=None, help="raw JSON of an earlier invocation to extend")
    args = ap.parse_args(argv)
    configs = []
    for c in args.config:
        if "=" not in c:
            raise SystemExit(f"--config must be NAME=COMMAND, got {c!r}")
        name, cmd = c.split("=", 1)
        if "{port}" not in cmd:
            raise SystemExit(f"--config {name}: the command must contain {{port}}, got {cmd!r}")
        configs.append((name.strip(), cmd.strip()))
    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, "serving_sweep_raw.json")
    doc = provenance.resume_doc(args.resume, {"points": {}})
    t_start = time.time()
    models = os.path.abspath(args.models)
    log = open(os.path.join(args.out, "serving_sweep.log"), "a")
    for name, cmd in configs:
        todo = [(p, o, c) for (p, o) in args.shapes for c in args.concurrency
                if f"{name}/{p}x{o}/c{c}" not in doc["points"]]
        if not todo:
            continue
        if time.time() - t_start > args.deadline_s - args.start_margin_s:
            print(f"[sweep] too little time left to start {name} ({len(todo)} points left)", flush=True)
            continue
        port = _free_port()
        # plain replacement, not str.format: commands may hold JSON (--compilation-config {...})
        argv_ = shlex.split(cmd.replace("{port}", str(port)).replace("{models}", models))
        log.write(f"===== {name}: {' '.join(argv_)}\n")
        log.flush()
        # cwd outside the repo: the folder triton_kernels/ must not shadow vLLM's module.
        proc = subprocess.Popen(argv_, cwd=tempfile.gettempdir(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            t0 = time.time()
            _wait_healthy(url, proc, args.start_timeout_s)
            startup = time.time() - t0
            model = _served_model(url)
            for p, o, c in todo:
                if time.time() - t_start > args.deadline_s:
                    print(f"[sweep] deadline reached; {name} stops before {p}x{o}/c{c}", flush=True)
                    break
                n = max(args.min_requests, 2 * c)
                res = asyncio.run(bench_run(url, model, c, n, p, o, args.vocab, 0, None))
                res.update(config=name, server_cmd=" ".join(argv_), startup_s=round(startup, 1))
                doc["points"][f"{name}/{p}x{o}/c{c}"] = res
                print(f"[sweep] {name} {p}x{o} c={c}: {res['output_tokens_per_s']} out tok/s, "
                      f"TTFT p50 {res['ttft_p50_s']}, TPOT p50 {res['tpot_p50_s']}, errors {res['errors']}",
                      flush=True)
                provenance.write_json(raw_path, doc)
        except (RuntimeError, TimeoutError) as exc:
            print(f"[sweep] {name} failed: {exc} (see serving_sweep.log)", flush=True)
            doc.setdefault("failures", {})[name] = str(exc)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    provenance.write_json(raw_path, doc)


if __name__ == "__main__":
    main()
