"""The OpenAI-compatible server over a real engine, driven by the official ``openai`` client.

Starts ``spinquant serve CKPT`` (extra flags go to vLLM's engine), waits until it
accepts requests, then checks with the unmodified ``openai`` package:
models, completions (plain, streaming, n=2 with a seed, logprobs, echo),
chat completions (plain and streaming), two refused requests (an unknown
model: 404; max_tokens beyond the context: 400) and the server's own
endpoints (/health, /metrics, /v1/spinquant/config). Every response is
recorded in ``server_check_TAG.json`` under ``--out`` with a pass/fail per
check; the server is stopped with SIGTERM (graceful drain) at the end.

Reproduce on an H100 with vLLM 0.26 and this project installed, on the Llama-3-8B-shaped
W4A4KV16 folder with dummy weights (``benchmarks/models.py`` writes it):

    python benchmarks/models.py --out /tmp/models --only llama3-8b
    python benchmarks/server_check.py --ckpt /tmp/models/llama3-8b/spinquant_w4a4kv16 \
        --out benchmarks/results/serving --tag "$(date -u +%F)_llama3-8b_w4a4kv16" -- --engine vllm \
        --tokenizer /tmp/models/llama3-8b/tokenizer --load-format dummy --enforce-eager

or on a real checkpoint (``served_accuracy.py`` says how to write one):
``--ckpt /tmp/ckpt/w4a4kv4 --tag smollm2_w4a4kv4 -- --engine vllm --gpu-memory-utilization 0.4``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:  # type: ignore[attr-defined]
        return e.code, e.read().decode()


def run_checks(base_url: str) -> dict:
    """Each check: {"ok": bool, ...what it saw}. Never raises for a failed check."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    checks: dict = {}

    def check(name, fn):
        t0 = time.time()
        try:
            rec = fn()
        except Exception as e:  # noqa: BLE001 - a failed check is a result
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        rec["seconds"] = round(time.time() - t0, 3)
        checks[name] = rec
        print(f"[server_check] {name}: {'ok' if rec.get('ok') else 'FAILED'} "
              f"{ {k: v for k, v in rec.items() if k not in ('trace',)} }", flush=True)

    model = client.models.list().data[0].id
    prompt = "The capital of France is"

    def completion():
        r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        text = r.choices[0].text
        return {"ok": bool(text) and (r.usage.completion_tokens == 16 or r.choices[0].finish_reason == "stop"),
                "text": text, "finish_reason": r.choices[0].finish_reason, "usage": r.usage.model_dump()}

    def streaming():
        parts, finish, usage = [], None, None
        for ch in client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
            if ch.choices:
                parts.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage.model_dump()
        plain = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        text = "".join(parts)
        return {"ok": text == plain.choices[0].text and usage is not None, "chunks": len(parts),
                "text": text, "finish_reason": finish, "usage": usage}

    def n2_seed():
        kw = dict(model=model, prompt=prompt, max_tokens=12, temperature=0.8, n=2, seed=7)
        a = client.completions.create(**kw)
        b = client.completions.create(**kw)
        ta, tb = [c.text for c in a.choices], [c.text for c in b.choices]
        return {"ok": len(ta) == 2 and ta == tb, "texts": ta, "repeat": tb}

    def logprobs_echo():
        r = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                      echo=True)
        lp = r.choices[0].logprobs
        return {"ok": r.choices[0].text.startswith(prompt) and lp is not None and len(lp.tokens) > 4,
                "text": r.choices[0].text, "tokens": lp.tokens if lp else None,
                "token_logprobs": lp.token_logprobs if lp else None}

    def chat():
        # logprobs record the generated tokens: with dummy weights the content can come back
        # empty after 24 tokens, and only the tokens can say whether the model generated
        # special tokens (dropped from text) or the server lost the text
        r = client.chat.completions.create(model=model, max_tokens=24, temperature=0, logprobs=True,
                                           messages=[{"role": "user", "content": "Name one planet."}])
        msg = r.choices[0].message
        lp = r.choices[0].logprobs
        return {"ok": msg.role == "assistant" and bool(msg.content), "content": msg.content,
                "finish_reason": r.choices[0].finish_reason,
                "usage": r.usage.model_dump() if r.usage else None,
                "tokens": [c.token for c in lp.content] if lp is not None and lp.content else None}

    def chat_stream():
        parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model=model, max_tokens=24, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Name one planet."}]) if ch.choices]
        return {"ok": bool("".join(parts)), "content": "".join(parts), "chunks": len(parts)}

    def unknown_model():
        try:
            client.completions.create(model="no-such-model", prompt=prompt, max_tokens=4)
        except openai.NotFoundError as e:
            return {"ok": e.status_code == 404, "status": e.status_code, "body": e.body}
        return {"ok": False, "error": "no error raised"}

    def too_long():
        try:
            client.completions.create(model=model, prompt=prompt, max_tokens=10_000_000)
        except openai.BadRequestError as e:
            return {"ok": e.status_code == 400, "status": e.status_code, "body": e.body}
        return {"ok": False, "error": "no error raised"}

    def endpoints():
        h, _ = _get(base_url + "/health")
        m, metrics = _get(base_url + "/metrics")
        c, cfg = _get(base_url + "/v1/spinquant/config")
        return {"ok": h == 200 and m == 200 and c == 200 and "spinquant" in cfg,
                "health": h, "metrics_lines": len(metrics.splitlines()), "config": json.loads(cfg) if c == 200 else cfg}

    for name, fn in [("completion", completion), ("streaming", streaming), ("n2_seed", n2_seed),
                     ("logprobs_echo", logprobs_echo), ("chat", chat), ("chat_stream", chat_stream),
                     ("unknown_model_404", unknown_model), ("max_tokens_400", too_long),
                     ("endpoints", endpoints)]:
        check(name, fn)
    return {"model": model, "checks": checks, "all_ok": all(c.get("ok") for c in checks.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--spinquant", default="spinquant", help="the console script (or a command prefix)")
    ap.add_argument("extra", nargs="*", help="after --: flags for `spinquant serve` / vLLM's engine")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or os.path.basename(os.path.normpath(args.ckpt))
    out_path = os.path.join(args.out, f"server_check_{tag}.json")
    ready = os.path.join(tempfile.mkdtemp(), "ready")
    cmd = args.spinquant.split() + ["serve", os.path.abspath(args.ckpt), "--port", "0", "--ready-file", ready,
                                    *args.extra]
    log_path = os.path.join(args.out, f"server_{tag}.log")
    result = {**provenance.invocation(), "server_command": " ".join(cmd)}
    t0 = time.time()
    with open(log_path, "w") as log:
        # cwd outside the repo: its folder triton_kernels/ must not shadow vLLM's module
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        try:
            while not (os.path.exists(ready) and os.path.getsize(ready)):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {proc.returncode} during start-up")
                if time.time() - t0 > args.start_timeout_s:
                    raise TimeoutError(f"server not ready after {args.start_timeout_s:.0f} s")
                time.sleep(1)
            with open(ready) as f:
                url = f.read().strip().rstrip("/")
            result["start_s"] = time.time() - t0
            result.update(run_checks(url))
        except Exception as e:  # noqa: BLE001 - recorded, then the log tail is shown
            result["error"] = f"{type(e).__name__}: {e}"
            result["all_ok"] = False
        finally:
            t1 = time.time()
            proc.send_signal(signal.SIGTERM)
            try:
                result["exit_code"] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                result["exit_code"] = "killed after 60 s"
            result["shutdown_s"] = time.time() - t1
    with open(log_path) as f:
        result["server_log_tail"] = f.read()[-4000:]
    provenance.write_json(out_path, result, default=str)
    print(f"[server_check] all_ok={result['all_ok']} -> {out_path}", flush=True)
    if not result["all_ok"] and "error" in result:
        print(result["server_log_tail"][-3000:], flush=True)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
