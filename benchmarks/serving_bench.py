"""Side-by-side vLLM benchmarks on one GPU: throughput, latency, weight memory, KV capacity.

Each run is ``vllm bench throughput`` or ``vllm bench latency`` on dummy weights
of a model directory (config.json only), in its own process, one after the
other in this invocation. Weight memory and KV-cache capacity are read from
vLLM's start-up log; the prompt and output tokens a throughput run really
processed are read from its summary and checked against the workload (a
mismatch is recorded as a failed run, ``rc: "wrong_workload"``). Writes ``serving_raw.json`` (all runs) and
``serving.log`` (each run's log tail) under ``--out``.

Run names: ``KIND:CONFIG`` with KIND in {tp (1024 in / 256 out, 400 prompts), tpkv (4096 in /
512 out, 1000 prompts), lat1, lat16 (512 in / 128 out, batch 1 / 16)} and CONFIG a folder
under ``--models`` (``bf16``, ``spinquant_w4a4kv16``, ...) optionally followed by
``+fp8`` (``--quantization fp8``), ``+fp8kv`` (``--kv-cache-dtype fp8``),
``+int4kv`` (``--kv-cache-dtype int4_per_token_head``), ``+eager``, or one of the
kernel switches set in the run's environment: ``+denseprefill`` (``SPINQUANT_KV4_PREFILL=dense``),
``+splitk`` (``SPINQUANT_TUNE_SPLIT_K=1``), ``+hqfma`` / ``+hqdiv`` (``SPINQUANT_HQ_QUOTIENT=fma`` / ``div``).

Example (H100, vLLM bundle in /tmp/site):
    python3 benchmarks/serving_bench.py --out $OUT --models .gpu-carry/llama8b \
        --runs tp:spinquant_w4a4kv16 tp:bf16 tp:bf16+fp8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

FLAGS = {
    "fp8": ["--quantization", "fp8"],
    "fp8kv": ["--kv-cache-dtype", "fp8"],
    "int4kv": ["--kv-cache-dtype", "int4_per_token_head", "--attention-backend", "TRITON_ATTN"],
    "eager": ["--enforce-eager"],
}
# flags that set an environment variable of the run instead of a command-line flag
ENV_FLAGS = {
    # SpinQuant KV4 prefill through dequantize + varlen flash (spinquant_vllm/attention.py)
    "denseprefill": {"SPINQUANT_KV4_PREFILL": "dense"},
    # a mixed batch's one-row sequences through the decode kernel, the rest through the prefill
    # kernel; "wholeprefill": the whole batch through the prefill kernel (the default until
    # session 8)
    "splitprefill": {"SPINQUANT_KV4_PREFILL": "split"},
    "wholeprefill": {"SPINQUANT_KV4_PREFILL": "triton_whole"},
    # fresh prompts through vLLM's FlashAttention over K/V read back from the 4-bit cache, the
    # rest through the prefill kernel ("flashsplit": decode rows through the decode kernel;
    # with the "magic" unpack, the default since session 8)
    "flashprefill": {"SPINQUANT_KV4_PREFILL": "flash"},
    "flashsplit": {"SPINQUANT_KV4_PREFILL": "flash_split"},
    # how the KV4 attention kernels unpack codes (spinquant_vllm/attention.py UNPACK_ENV)
    "kvsub": {"SPINQUANT_KV4_UNPACK": "sub"},
    "kvfold": {"SPINQUANT_KV4_UNPACK": "fold"},
    "kvmagic": {"SPINQUANT_KV4_UNPACK": "magic"},
    # GPU time of the KV4 attention calls per path, to /tmp/kv4timing/calls.<pid>.json
    "kvtiming": {"SPINQUANT_KV4_TIMING": "/tmp/kv4timing/calls"},
    # split-K tiles back in the W4A4 GEMM's autotuning (triton_kernels/w4a4_gemm.py)
    "splitk": {"SPINQUANT_TUNE_SPLIT_K": "1"},
    # hadamard_quant's quotient (triton_kernels/hadamard_quant.py): reciprocal + FMA (the
    # default since session 5) or an IEEE division per element (the fallback)
    "hqfma": {"SPINQUANT_HQ_QUOTIENT": "fma"},
    "hqdiv": {"SPINQUANT_HQ_QUOTIENT": "div"},
}
# pf<BLOCK_M>x<TILE_N>x<WARPS>[s<STAGES>]: the KV4 prefill kernel's tile settings
# (SPINQUANT_KV4_PREFILL_CFG, spinquant_vllm/attention.py), e.g. +pf256x64x8
PF_FLAG = re.compile(r"pf(\d+)x(\d+)x(\d+)(?:s(\d+))?$")


# dc<TILE_N>x<WARPS>[s<SPLITS>]: the KV4 decode kernel's settings (SPINQUANT_KV4_DECODE_CFG)
DC_FLAG = re.compile(r"dc(\d+)x(\d+)(?:s(\d+))?$")


def flag_env(flag: str) -> dict:
    """The environment a run flag sets ({} for command-line flags)."""
    m = PF_FLAG.match(flag)
    if m:
        return {"SPINQUANT_KV4_PREFILL_CFG": ",".join(x for x in m.groups() if x is not None)}
    m = DC_FLAG.match(flag)
    if m:
        return {"SPINQUANT_KV4_DECODE_CFG": ",".join(x for x in m.groups() if x is not None)}
    return ENV_FLAGS.get(flag, {})


# The SpinQuant KV4 path (prefill mode / code unpacking) this build runs when no flag picks
# another: spinquant_vllm.attention's PREFILL_DEFAULT / UNPACK_DEFAULT (a test keeps them equal).
# Recorded in the raw file, so benchmarks/report.py can key each W4A4KV4 run by the path it took.
KV4_DEFAULT = "flash_split/magic"
# (prompt tokens, output tokens, prompts) of the throughput runs. vLLM 0.26's `bench throughput`
# takes a random dataset's lengths from --random-input-len / --random-output-len, whose defaults
# (1024 / 128) win over --input-len / --output-len: sessions 1-7 passed only the latter and so
# measured 1024 in / 128 out under every name (docs/RESULTS.md, session 8).
THROUGHPUT = {
    "tp": (1024, 256, 400),
    # where KV capacity binds: a 16-bit cache holds ~120 of these 4.6k-token sequences on 8B
    # shapes next to W4A4 weights, the 4-bit one ~440 (the example workload)
    "tpkv": (4096, 512, 1000),
}
KINDS = {
    **{kind: ["throughput", "--dataset-name", "random", "--random-input-len", str(i),
              "--random-output-len", str(o), "--num-prompts", str(n)]
       for kind, (i, o, n) in THROUGHPUT.items()},
    "lat1": ["latency", "--input-len", "512", "--output-len", "128", "--batch-size", "1",
             "--num-iters-warmup", "2", "--num-iters", "5"],
    "lat16": ["latency", "--input-len", "512", "--output-len", "128", "--batch-size", "16",
              "--num-iters-warmup", "2", "--num-iters", "5"],
}
PATTERNS = {
    "weight_memory_gib": r"Model loading took ([\d.]+) GiB",
    "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
    # what `bench throughput` really ran (it counts the tokens of every request output)
    "prompt_tokens": r"Total num prompt tokens:\s+(\d+)",
    "output_tokens": r"Total num output tokens:\s+(\d+)",
}


def workload_error(kind: str, rec: dict) -> str | None:
    """Why a finished throughput run did not run the workload its kind names, or None."""
    if kind not in THROUGHPUT or rec.get("rc") != 0:
        return None
    i, o, n = THROUGHPUT[kind]
    got = (rec.get("prompt_tokens"), rec.get("output_tokens"))
    if got != (i * n, o * n):
        return (f"{kind} asks for {n} prompts x ({i} in, {o} out) = ({i * n}, {o * n}) tokens; "
                f"vLLM reported (prompt, output) tokens {got}")
    return None


def parse_run(name: str):
    if ":" not in name:
        raise ValueError(f"run name must be KIND:CONFIG[+flag...], got {name!r}")
    kind, rest = name.split(":", 1)
    if kind not in KINDS:
        raise ValueError(f"run kind must be one of {sorted(KINDS)}, got {kind!r}")
    cfg, *flags = rest.split("+")
    for f in flags:
        if f not in FLAGS and f not in ENV_FLAGS and not PF_FLAG.match(f) and not DC_FLAG.match(f):
            raise ValueError(f"run flag must be one of {sorted({**FLAGS, **ENV_FLAGS})}, "
                             f"pf<BLOCK_M>x<TILE_N>x<WARPS>[s<STAGES>] or "
                             f"dc<TILE_N>x<WARPS>[s<SPLITS>], got {f!r}")
    return kind, cfg, flags


def log_excerpt(text: str, rc: int, tail: int = 60, cause: int = 80) -> str:
    """What serving.log keeps of a run: its last ``tail`` lines, and for a failed
    run first the engine's own traceback (a dead EngineCore prints its root cause
    well before the client's EngineDeadError, which is all a plain tail shows)."""
    lines = [l for l in text.splitlines() if "Warning" not in l]
    keep = lines[-tail:]
    if rc != 0:
        start = next((i for i, l in enumerate(lines) if "Traceback" in l or "ERROR" in l), None)
        if start is not None and start < len(lines) - tail:
            keep = lines[start:start + cause] + ["[...]"] + keep
    return "\n".join(keep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", required=True, help="folder of model folders (config.json) and tokenizer/")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--deadline-s", type=float, default=540, help="start no run after this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=420)
    ap.add_argument("--resume", default=None, help="serving_raw.json of an earlier invocation to extend")
    ap.add_argument("--skip-done", action="store_true", help="skip runs the --resume file holds with rc 0")
    ap.add_argument("--stop-on-fail", action="store_true", help="skip the remaining runs after a failed one")
    ap.add_argument("--extra", default="", help="flags added to every run (one shell-quoted string; pass it as --extra=...), "
                    "e.g. a --compilation-config with a short cudagraph_capture_sizes list")
    ap.add_argument("--vllm", default=os.environ.get("VLLM_CMD", f"{sys.executable} -m vllm.entrypoints.cli.main"))
    args = ap.parse_args(argv)
    runs = [(r, *parse_run(r)) for r in args.runs]
    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, "serving_raw.json")
    doc = provenance.resume_doc(args.resume, {"runs": {}})
    if doc["runs"] and doc.get("kv4_default") != KV4_DEFAULT:
        raise SystemExit(f"--resume file was written by a build whose KV4 default was "
                         f"{doc.get('kv4_default', 'not recorded')!r}, this one runs "
                         f"{KV4_DEFAULT!r}: start a new file")
    doc["kv4_default"] = KV4_DEFAULT
    models = os.path.abspath(args.models)
    tokenizer = os.path.join(models, "tokenizer")
    t0 = time.time()
    log = open(os.path.join(args.out, "serving.log"), "a")
    for name, kind, cfg, flags in runs:
        if args.skip_done and doc["runs"].get(name, {}).get("rc") == 0:
            print(f"[serving] {name}: done in an earlier invocation; skipped", flush=True)
            continue
        if time.time() - t0 > args.deadline_s:
            print(f"[serving] deadline reached; skipping {name}", flush=True)
            continue
        out_json = os.path.join(tempfile.mkdtemp(), "bench.json")
        cmd = (args.vllm.split() + ["bench"] + KINDS[kind]
               + ["--model", os.path.join(models, cfg), "--tokenizer", tokenizer,
                  "--load-format", "dummy", "--output-json", out_json]
               + [x for f in flags for x in FLAGS.get(f, [])] + shlex.split(args.extra))
        env_set = {k: v for f in flags for k, v in flag_env(f).items()}
        t = time.time()
        # cwd outside the repo: the folder triton_kernels/ must not shadow vLLM's module.
        try:
            proc = subprocess.run(cmd, cwd=tempfile.gettempdir(), capture_output=True, text=True,
                                  timeout=args.run_timeout_s, env={**os.environ, **env_set})
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            text = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        rec = {"kind": kind, "config": cfg, "flags": flags, "env": env_set,
               "cmd": " ".join([f"{k}={v}" for k, v in env_set.items()] + cmd), "rc": rc,
               "wall_s": time.time() - t}
        for key, pat in PATTERNS.items():
            m = re.findall(pat, text)
            if m:
                v = float(m[-1].replace(",", ""))
                rec[key] = int(v) if key.endswith("_tokens") else v
        if rc == 0 and os.path.exists(out_json):
            with open(out_json) as f:
                rec["result"] = json.load(f)
        why = workload_error(kind, rec)
        if why:
            rec["rc"], rec["workload_error"] = "wrong_workload", why
            print(f"[serving] {name}: {why}", flush=True)
        doc["runs"][name] = rec
        summary = {k: rec.get(k) for k in ("rc", "wall_s", "weight_memory_gib", "kv_cache_tokens")}
        res = rec.get("result", {})
        for k in ("tokens_per_second", "requests_per_second", "avg_latency"):
            if k in res:
                summary[k] = res[k]
        print(f"[serving] {name}: {json.dumps(summary)}", flush=True)
        log.write(f"===== {name} rc={rc}\n$ {' '.join(cmd)}\n")
        log.write(log_excerpt(text, rc) + "\n")
        log.flush()
        provenance.write_json(raw_path, doc)
        if rc != 0 and args.stop_on_fail:
            print(f"[serving] {name} failed; stopping (see serving.log)", flush=True)
            print("\n".join(text.splitlines()[-40:]), flush=True)
            break


if __name__ == "__main__":
    main()
