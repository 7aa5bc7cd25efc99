"""Side-by-side vLLM benchmarks on one GPU: throughput, latency, weight memory, KV capacity.

Each run is ``vllm bench throughput`` or ``vllm bench latency`` on dummy weights of a model
folder made by ``benchmarks/models.py`` (config.json only), in its own process, one after the
other. Weight memory and KV-cache capacity are read from vLLM's start-up log; the prompt and
output tokens a throughput run really processed are read from its summary and checked against
the workload (a mismatch is recorded as a failed run, ``rc: "wrong_workload"``). Every run
captures the same CUDA-graph sizes (``--cudagraph-sizes``), so no configuration pays for a
longer capture list than another. Writes ``NAME.json`` (every run, with its command and the
invocation's device and versions) and ``NAME.log`` (each run's log tail) under ``--out``.

Run names: ``KIND:CONFIG[+FLAG...]``. KIND is one of ``tp`` (1024 in / 256 out, 400 prompts),
``tpkv`` (4096 in / 512 out, 1000 prompts: where KV capacity binds), ``lat1`` / ``lat16``
(512 in / 128 out, batch 1 / 16). CONFIG is a folder under ``--models`` (``bf16``,
``spinquant_w4a4kv16``, ``spinquant_w4a4kv4``: what ``models.py`` writes). FLAGs select
vLLM's own baselines on the bf16 folder: ``+fp8`` (``--quantization fp8``), ``+fp8kv``
(``--kv-cache-dtype fp8``), ``+int4kv`` (``--kv-cache-dtype int4_per_token_head`` on
TRITON_ATTN); ``+eager`` adds ``--enforce-eager``. ``--suite`` names the run lists of the results (:data:`SUITES`).

Reproduce on an H100 with vLLM 0.26 and this project installed (a run takes 1-7 minutes,
engine start included):

    python benchmarks/models.py --out /tmp/models --only llama3-8b
    python benchmarks/serving_bench.py --models /tmp/models/llama3-8b --suite throughput \
        --out benchmarks/results/serving --name "$(date -u +%F_%H%M)_llama3-8b_throughput"

(``--suite kvcapacity`` and ``--suite latency`` the same way; ``--runs`` takes any list.)
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

TOKENIZER = "tokenizer"
FLAGS = {
    "fp8": ["--quantization", "fp8"],
    "fp8kv": ["--kv-cache-dtype", "fp8"],
    "int4kv": ["--kv-cache-dtype", "int4_per_token_head", "--attention-backend", "TRITON_ATTN"],
    "eager": ["--enforce-eager"],
}
# (prompt tokens, output tokens, prompts) of the throughput runs. vLLM 0.26's `bench throughput`
# takes a random dataset's lengths from --random-input-len / --random-output-len only; its
# --input-len / --output-len do not reach the random dataset (whose defaults are 1024 / 128),
# hence the token-count check of workload_error.
THROUGHPUT = {
    "tp": (1024, 256, 400),
    # where KV capacity binds: a 16-bit cache holds ~120 of these 4.6k-token sequences on 8B
    # shapes next to W4A4 weights, the 4-bit one ~440
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
# The run lists of the committed serving results: SpinQuant beside vLLM's bf16, fp8-weight and
# int4-KV baselines on the same shapes.
SUITES = {
    "throughput": ["tp:spinquant_w4a4kv4", "tp:spinquant_w4a4kv16", "tp:bf16", "tp:bf16+fp8",
                   "tp:bf16+int4kv"],
    "kvcapacity": ["tpkv:spinquant_w4a4kv4", "tpkv:spinquant_w4a4kv16", "tpkv:bf16+int4kv"],
    "latency": [f"{k}:{c}" for k in ("lat1", "lat16")
                for c in ("spinquant_w4a4kv4", "spinquant_w4a4kv16", "bf16", "bf16+fp8")],
}
# The CUDA-graph batch sizes every run captures: vLLM's default list of 51 sizes makes an engine
# start with this plugin's kernels take 80-130 s; these keep it near a minute and cover the
# decode batches of every workload above.
CUDAGRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
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


def parse_run(name: str) -> tuple[str, str, list[str]]:
    """``KIND:CONFIG[+flag...]`` -> ``(kind, config, flags)``; unknown kinds and flags raise."""
    if ":" not in name:
        raise ValueError(f"run name must be KIND:CONFIG[+flag...], got {name!r}")
    kind, rest = name.split(":", 1)
    if kind not in KINDS:
        raise ValueError(f"run kind must be one of {sorted(KINDS)}, got {kind!r}")
    cfg, *flags = rest.split("+")
    for f in flags:
        if f not in FLAGS:
            raise ValueError(f"run flag must be one of {sorted(FLAGS)}, got {f!r} in {name!r}")
    return kind, cfg, flags


def log_excerpt(text: str, rc: int, tail: int = 60, cause: int = 80) -> str:
    """What the run log keeps of a run: its last ``tail`` lines, and for a failed
    run first the engine's own traceback (a dead EngineCore prints its root cause
    well before the client's EngineDeadError, which is all a plain tail shows)."""
    lines = [l for l in text.splitlines() if "Warning" not in l]
    keep = lines[-tail:]
    if rc != 0:
        start = next((i for i, l in enumerate(lines) if "Traceback" in l or "ERROR" in l), None)
        if start is not None and start < len(lines) - tail:
            keep = lines[start:start + cause] + ["[...]"] + keep
    return "\n".join(keep)


def check_models(models: str, configs: set[str]) -> None:
    """Raise when ``models`` lacks the tokenizer or a config folder the runs name."""
    missing = [os.path.join(models, c, "config.json") for c in sorted(configs)
               if not os.path.isfile(os.path.join(models, c, "config.json"))]
    if not os.path.isdir(os.path.join(models, TOKENIZER)):
        missing.append(os.path.join(models, TOKENIZER))
    if missing:
        raise SystemExit(f"--models {models} lacks {missing}; make the folders with "
                         f"`python benchmarks/models.py --out DIR --only SHAPE` and pass DIR/SHAPE")


def compilation_flags(sizes: str) -> list[str]:
    """``--compilation-config`` for a comma-separated list of CUDA-graph sizes ([] for 'vllm')."""
    if sizes == "vllm":
        return []
    try:
        values = [int(x) for x in sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--cudagraph-sizes must be 'vllm' or comma-separated ints, got {sizes!r}") from None
    return ["--compilation-config", json.dumps({"cudagraph_capture_sizes": values})]


def run_one(cmd_head: list[str], cmd_tail: list[str], timeout_s: float) -> tuple[dict, str]:
    """Run ``cmd_head --output-json TMP cmd_tail``; return its record (command, rc, wall time,
    what PATTERNS find in its output, vLLM's JSON result) and its output text."""
    out_json = os.path.join(tempfile.mkdtemp(), "bench.json")
    cmd = cmd_head + ["--output-json", out_json] + cmd_tail
    t = time.time()
    # cwd outside the repo: the folder triton_kernels/ must not shadow vLLM's module.
    try:
        proc = subprocess.run(cmd, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout_s)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        text = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    rec = {"cmd": shlex.join(cmd), "rc": rc, "wall_s": time.time() - t}
    for key, pat in PATTERNS.items():
        m = re.findall(pat, text)
        if m:
            v = float(m[-1].replace(",", ""))
            rec[key] = int(v) if key.endswith("_tokens") else v
    if rc == 0 and os.path.exists(out_json):
        with open(out_json) as f:
            rec["result"] = json.load(f)
    return rec, text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for NAME.json and NAME.log")
    ap.add_argument("--name", default="serving", help="file name stem of the raw file and the log")
    ap.add_argument("--models", required=True,
                    help="one shape's folder from benchmarks/models.py (bf16/, spinquant_*/, tokenizer/)")
    runs_ap = ap.add_mutually_exclusive_group(required=True)
    runs_ap.add_argument("--runs", nargs="+", help="run names KIND:CONFIG[+FLAG...]")
    runs_ap.add_argument("--suite", choices=sorted(SUITES), help="a run list of the results")
    ap.add_argument("--cudagraph-sizes", default=",".join(map(str, CUDAGRAPH_SIZES)),
                    help="CUDA-graph sizes every run captures (comma-separated), or 'vllm' for vLLM's list")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=900)
    ap.add_argument("--resume", default=None, help="raw file of an earlier invocation to extend")
    ap.add_argument("--skip-done", action="store_true", help="skip runs the --resume file holds with rc 0")
    ap.add_argument("--stop-on-fail", action="store_true", help="skip the remaining runs after a failed one")
    ap.add_argument("--extra", default="", help="flags added to every run (one shell-quoted string; pass it "
                    "as --extra=...)")
    ap.add_argument("--vllm", default=f"{sys.executable} -m vllm.entrypoints.cli.main",
                    help="the vLLM command line")
    args = ap.parse_args(argv)
    runs = [(r, *parse_run(r)) for r in (args.runs or SUITES[args.suite])]
    models = os.path.abspath(args.models)
    check_models(models, {cfg for _, _, cfg, _ in runs})
    graphs = compilation_flags(args.cudagraph_sizes)
    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, f"{args.name}.json")
    doc = provenance.resume_doc(args.resume, {"runs": {}})
    t0 = time.time()
    with open(os.path.join(args.out, f"{args.name}.log"), "a") as log:
        for name, kind, cfg, flags in runs:
            if args.skip_done and doc["runs"].get(name, {}).get("rc") == 0:
                print(f"[serving] {name}: done in an earlier invocation; skipped", flush=True)
                continue
            if args.deadline_s is not None and time.time() - t0 > args.deadline_s:
                print(f"[serving] deadline reached; skipping {name}", flush=True)
                continue
            cmd_head = (args.vllm.split() + ["bench"] + KINDS[kind]
                        + ["--model", os.path.join(models, cfg), "--tokenizer", os.path.join(models, TOKENIZER),
                           "--load-format", "dummy"])
            cmd_tail = [x for f in flags for x in FLAGS[f]] + graphs + shlex.split(args.extra)
            rec, text = run_one(cmd_head, cmd_tail, args.run_timeout_s)
            rec = {"kind": kind, "config": cfg, "flags": flags, **rec}
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
            log.write(f"===== {name} rc={rec['rc']}\n$ {rec['cmd']}\n")
            log.write(log_excerpt(text, rec["rc"]) + "\n")
            log.flush()
            provenance.write_json(raw_path, doc)
            if rec["rc"] != 0 and args.stop_on_fail:
                print(f"[serving] {name} failed; stopping (see {log.name})", flush=True)
                print("\n".join(text.splitlines()[-40:]), flush=True)
                break


if __name__ == "__main__":
    main()
