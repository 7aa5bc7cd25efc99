"""Regenerate benchmarks/results/summary.json and REPORT.md from the raw JSON files.

Nothing here measures: every number is read from a raw result file written by
a benchmark script (accuracy.py, kernels.py, serving_bench.py), which records
its command, device, versions and date. Keys that were not measured are left
out (../shared/RESULTS.md).

    python benchmarks/report.py            # reads and writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ACC_METHODS = ("none_rtn", "hadamard_rtn", "learned_rtn", "hadamard_gptq", "learned_gptq")
SPEEDUP_M = (1, 16, 2048, 8192)
SERVING_KEYS = {"bf16": "bf16", "bf16+fp8": "fp8", "bf16+fp8+fp8kv": "fp8_kv8", "bf16+int4kv": "bf16_int4kv",
                "spinquant_w4a4kv16": "spinquant_w4a4kv16", "spinquant_w4a4kv4": "spinquant_w4a4kv4"}


def serving_key(cfg: str) -> str | None:
    """The summary key of a serving_bench config: the longest known prefix of its ``+`` flags
    (``bf16+fp8`` -> ``fp8``) with the remaining flags appended (``spinquant_w4a4kv4+denseprefill``
    -> ``spinquant_w4a4kv4_denseprefill``); None for an unknown model folder and for eager runs
    (reported on their own)."""
    parts = cfg.split("+")
    if "eager" in parts:
        return None
    for i in range(len(parts), 0, -1):
        known = SERVING_KEYS.get("+".join(parts[:i]))
        if known:
            return "_".join([known] + parts[i:])
    return None


# The plugin's one KV4 attention path as (prefill, unpack), and the run flags that selected its
# parts in a build that had others. A raw file from such a build records that build's own KV4
# path as "kv4_default" ("prefill/unpack"); its W4A4KV4 runs are keyed by the path they took:
# ``spinquant_w4a4kv4`` for the plugin's path, ``spinquant_w4a4kv4_<prefill>_<unpack>`` for
# another. A file without "kv4_default" ran the plugin's path in every W4A4KV4 run.
KV4_PATH = ("flash_split", "magic")
KV4_PATH_FLAGS = {"flashsplit": ("prefill", "flash_split"), "kvmagic": ("unpack", "magic")}


def run_key(cfg: str, kv4_default: str | None = None) -> str | None:
    """The summary key of a run's config: :func:`serving_key`, except for W4A4KV4 runs of a
    file that records its build's KV4 path (``kv4_default``), keyed by the path they took.
    Raises ValueError for a flag of such a run that is neither a KV4 path flag of
    ``KV4_PATH_FLAGS`` nor ``eager``: its path cannot be told."""
    parts = cfg.split("+")
    if parts[0] != "spinquant_w4a4kv4" or kv4_default is None:
        return serving_key(cfg)
    if "eager" in parts:
        return None
    path = dict(zip(("prefill", "unpack"), kv4_default.split("/")))
    for f in parts[1:]:
        if f not in KV4_PATH_FLAGS:
            raise ValueError(f"run config {cfg!r}: flag {f!r} is not one of the KV4 path flags "
                             f"{sorted(KV4_PATH_FLAGS)} of a file with kv4_default {kv4_default!r}")
        k, v = KV4_PATH_FLAGS[f]
        path[k] = v
    if (path["prefill"], path["unpack"]) == KV4_PATH:
        return "spinquant_w4a4kv4"
    return f"spinquant_w4a4kv4_{path['prefill']}_{path['unpack']}"


def _load(path):
    with open(path) as f:
        return json.load(f)


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


# ----------------------------------------------------------------------------
# which files: raw results are named ``<date>[_<HHMM>]_<what>.<ext>`` (UTC; the time only where
# one date holds two runs of the same benchmark), so each kind is found by how its name ends
# ----------------------------------------------------------------------------
FILES = {"accuracy": "accuracy/*.json",                       # those holding "jobs" (accuracy.py)
         "rotation_ablation": "accuracy/*_rotation_ablation_cpu.json",
         "kurtosis": "accuracy/*_kurtosis.json",
         "kernels": "kernels/*_gemm.json",                    # whole runs; parts end _gemm_part_*
         "throughput": "serving/*_throughput.json",           # serving_bench.py
         "latency": "serving/*_latency.json",                 # serving_bench.py, lat1/lat16 runs only
         "served_accuracy": "serving/*/served_accuracy_*.json",
         "server_check": "serving/*_server_check.json",
         "server_overhead": "serving/*_server_overhead.json",
         "sweep": "serving/*_sweep.json",
         "noise_floor": "serving/*/noise_floor_*.json",
         "agreement_floor": "serving/*/agreement_floor_*.json"}


def find(results: str, kind: str, date_field: str | None = None) -> list[str]:
    """The files of one kind (a key of ``FILES``) under ``results``, oldest first: by the date
    each records under ``date_field`` (ISO strings sort in time order), else by name."""
    paths = sorted(glob.glob(os.path.join(results, FILES[kind])))
    if date_field:
        paths.sort(key=lambda p: _load(p).get(date_field) or "")
    return paths


# ----------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------
def accuracy_section(files):
    """accuracy.py raw files, oldest first (a later file's result for a job replaces an earlier
    one's) -> the summary's accuracy entry and the per-job table rows. Files without ``jobs``
    (kurtosis, rotation ablation) are skipped."""
    jobs, sources = {}, []
    header = None
    for path in files:
        d = _load(path)
        if "jobs" not in d:
            continue
        header = header or d
        sources.append({"file": os.path.relpath(path, RESULTS), "command": d.get("command"),
                        "device": d.get("device"), "date": d.get("date"), "versions": d.get("versions"),
                        **({"note": d["note"]} if d.get("note") else {})})
        jobs.update(d.get("jobs", {}))
    # jobs with absmax weight scales (``--no-weight-clip-search``) are an ablation, kept apart
    ablation = {k: v for k, v in jobs.items() if v.get("weight_quantizer") == "absmax"}
    jobs = {k: v for k, v in jobs.items() if k not in ablation}
    if not jobs:
        return None, []
    out = {"model": header.get("model"), "eval_text": header.get("eval_text"), "sources": sources}
    if "fp16/fp16/s0" in jobs:
        fp = jobs["fp16/fp16/s0"]
        out["fp16"] = {k: fp[k] for k in ("ppl", "zeroshot8_avg") if k in fp}
    table = []
    for bits in ("W4A4KV4", "W4A4KV16", "W4A16KV16"):
        sec = {}
        for m in ACC_METHODS:
            recs = sorted((j for j in jobs.values() if j.get("bits") == bits and j.get("method") == m),
                          key=lambda j: j["seed"])
            if not recs:
                continue
            if m == "none_rtn":
                sec[m] = {k: recs[0][k] for k in ("ppl", "zeroshot8_avg") if k in recs[0]}
            else:
                sec[m] = {"ppl": [r["ppl"] for r in recs], "seeds": [r["seed"] for r in recs]}
                zs = [r["zeroshot8_avg"] for r in recs if "zeroshot8_avg" in r]
                if zs:
                    sec[m]["zeroshot8_avg"] = zs
            for r in recs:
                table.append((bits, m, r["seed"], r["ppl"], r.get("zeroshot8_avg"),
                              r.get("learning", {}).get("seconds")))
        if sec:
            out[bits] = sec
    fp = out.get("fp16", {}).get("ppl")
    for bits in ("W4A4KV4", "W4A4KV16", "W4A16KV16"):
        w = out.get(bits, {})
        for wm in ("rtn", "gptq"):
            had, lrn = w.get(f"hadamard_{wm}"), w.get(f"learned_{wm}")
            if fp and had and lrn:
                out.setdefault(f"learned_vs_hadamard_gap_ratio_{bits}", {})[wm] = {
                    "ratio": round((statistics.mean(lrn["ppl"]) - fp) / (statistics.mean(had["ppl"]) - fp), 3),
                    "seeds_learned": len(lrn["ppl"]), "seeds_hadamard": len(had["ppl"])}
    if ablation:
        out["ablation_absmax_weight_scales"] = {k: v["ppl"] for k, v in ablation.items()}
    return out, table


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------
def kernels_section(path):
    d = _load(path)
    rows = d["rows"]
    best = lambda r: min(v for k, v in r.items() if k.startswith("w4a4_layer_") and k.endswith("_us"))
    vs_bf16, vs_fp8, shapes = {}, {}, {}
    for M in SPEEDUP_M:
        rs = [r for r in rows if r["M"] == M]
        if rs:
            vs_bf16[str(M)] = round(_geomean([r["bf16_us"] / best(r) for r in rs]), 3)
            vs_fp8[str(M)] = round(_geomean([r["fp8_gemm_us"] / best(r) for r in rs]), 3)
            shapes[str(M)] = [r["shape"] for r in rs]  # a run in parts may lack some shapes
    big = [r for r in rows if r["M"] >= 1024]
    hq_all = max(r["hq_us"] / r["copy_us"] for r in big)
    hq_plain = max(r["hq_us"] / r["copy_us"] for r in big if not r.get("had_size"))
    return {
        "device": d["device"], "source": os.path.relpath(path, RESULTS), "command": d.get("command"),
        "date": d.get("date_utc"), "versions": {"torch": d.get("torch"), "triton": d.get("triton")},
        "w4a4_layer_speedup_vs_bf16": vs_bf16,
        "w4a4_layer_speedup_vs_fp8": vs_fp8,
        "w4a4_layer_speedup_shapes": shapes,
        "w4a4_layer_speedup_note": "geomean over the Llama-3-8B shapes measured at each M (qkv/o/gate_up/down "
                                   "where the run has them); W4A4 layer = "
                                   "hadamard_quant + GEMM from bf16 x to bf16 y; fp8 = torch._scaled_mm alone "
                                   "(its activation quantization not counted)",
        "hadamard_quant_vs_copy": round(hq_all, 3),
        "hadamard_quant_vs_copy_without_hadamard": round(hq_plain, 3),
    }, rows


# ----------------------------------------------------------------------------
# serving
# ----------------------------------------------------------------------------
# the workloads the headline tables are about: tp (the 1024/256) and tpkv (4096/512)
HEADLINE_WORKLOADS = {(1024, 256): "output_tok_s", (4096, 512): "tpkv_output_tok_s"}


def run_workload(rec) -> tuple[int, int, int]:
    """(prompt tokens, output tokens, prompts) per request of a finished ``bench throughput`` run,
    from the token counts vLLM printed (serving_bench.py records them as ``prompt_tokens`` /
    ``output_tokens``). The workload is read from what vLLM did, not from the command: vLLM 0.26's
    random dataset ignores ``--input-len`` / ``--output-len``. Raises ValueError for a run
    without the counts."""
    n = int(rec["result"]["num_requests"])
    if "prompt_tokens" not in rec or "output_tokens" not in rec:
        raise ValueError(f"run {rec.get('cmd')!r}: no prompt_tokens / output_tokens recorded, so its "
                         "workload is unknown")
    return int(rec["prompt_tokens"]) // n, int(rec["output_tokens"]) // n, n


def _serving_file(runs, kv4_default: str | None = None):
    """Headline numbers of one serving_bench.py raw file's runs. Throughput is output tokens
    per second of the workload the run had: the 1024/256 and 4096/512 ones under their keys,
    any other under ``other_output_tok_s`` by workload."""
    out = {"output_tok_s": {}, "latency_bs1_s": {}, "latency_bs16_s": {}, "kv_capacity_tokens": {},
           "weight_memory_gib": {}, "tpkv_output_tok_s": {}, "other_output_tok_s": {}, "failed": []}
    for name, rec in runs.items():
        kind, cfg = name.split(":", 1)
        key = run_key(cfg, kv4_default)
        res = rec.get("result") or {}
        if rec.get("rc") != 0:
            out["failed"].append(name)
            continue
        if key is None:
            continue
        if kind in ("tp", "tpkv"):
            inp, outp, n = run_workload(rec)
            tok_s = round(n * outp / res["elapsed_time"], 1)
            table = HEADLINE_WORKLOADS.get((inp, outp))
            if table:
                out[table][key] = tok_s
            else:
                out["other_output_tok_s"].setdefault(f"{inp} in / {outp} out, {n} prompts", {})[key] = tok_s
            if "kv_cache_tokens" in rec:
                out["kv_capacity_tokens"].setdefault(key, int(rec["kv_cache_tokens"]))
            if "weight_memory_gib" in rec:
                out["weight_memory_gib"]["spinquant" if key.startswith("spinquant") else key] = \
                    rec["weight_memory_gib"]
        elif kind in ("lat1", "lat16"):
            out["latency_bs1_s" if kind == "lat1" else "latency_bs16_s"][key] = round(res["avg_latency"], 4)
    eager = [n for n in runs if n.startswith("lat1:") and n.endswith("+eager")]
    if eager:
        out["latency_bs1_eager_s"] = {n.split(":")[1]: round(runs[n]["result"]["avg_latency"], 4)
                                      for n in eager if runs[n].get("rc") == 0}
    return {k: v for k, v in out.items() if v not in ({}, [])}


def serving_section(files):
    """Per serving_bench.py raw file (one machine's runs each; throughput and latency files),
    plus the headline: the newest file's numbers, completed from the newest files that have what
    it lacks (batch-1 latency from the newest file that measured it)."""
    by_file = {}
    for path in files:
        d = _load(path)
        rec = _serving_file(d["runs"], d.get("kv4_default"))
        rec["invocations"] = d.get("invocations", [])
        if d.get("note"):
            rec["note"] = d["note"]
        by_file[os.path.relpath(path, RESULTS)] = rec
    if not by_file:
        return None
    def date(f):
        return max((i.get("date") or "" for i in by_file[f]["invocations"]), default="")

    # the headline: the newest file with the 1024/256 runs; the 4096/512 numbers from the
    # newest file holding both SpinQuant caches
    pool = list(by_file)
    with_tp = [f for f in pool if by_file[f].get("output_tok_s")] or pool
    newest = max(with_tp, key=date)
    head = by_file[newest]
    out = {"device": head["invocations"][0]["device"] if head["invocations"] else None,
           "workload": "vllm bench throughput, random, 1024 in / 256 out, 400 prompts (4096 in / 512 out, "
                       "1000 prompts where KV capacity binds); vllm bench latency, "
                       "512 in / 128 out, batch 1 and 16, where measured; Llama-3-8B shapes (dummy weights)",
           "headline_source": newest}
    out.update({k: v for k, v in head.items()
                if k not in ("invocations", "note", "tpkv_output_tok_s", "other_output_tok_s")})
    # issue 4's comparison set (W4A4KV16 against bf16 and FP8, vLLM's int4 cache) from the newest
    # file that measured it side by side, when the headline file lacks part of it
    full = [f for f in pool if {"bf16", "fp8", "spinquant_w4a4kv16"} <= set(by_file[f].get("output_tok_s", {}))]
    if full and not {"bf16", "fp8"} <= set(out.get("output_tok_s", {})):
        bf = max(full, key=date)
        out["baselines"] = {"source": bf, **{k: by_file[bf][k] for k in (
            "output_tok_s", "weight_memory_gib", "kv_capacity_tokens") if k in by_file[bf]}}
    # latency (vllm bench latency took its lengths as given): the newest file that measured it
    with_lat = [f for f in pool if by_file[f].get("latency_bs1_s")]
    if with_lat and "latency_bs1_s" not in out:
        lf = max(with_lat, key=date)
        out["latency_source"] = lf
        out.update({k: by_file[lf][k] for k in ("latency_bs1_s", "latency_bs16_s", "latency_bs1_eager_s")
                    if k in by_file[lf]})
    with_kv = [f for f in pool if {"spinquant_w4a4kv4", "spinquant_w4a4kv16"}
               <= set(by_file[f].get("tpkv_output_tok_s", {}))]
    if with_kv:
        kvf = max(with_kv, key=date)
        out["tpkv_output_tok_s"] = by_file[kvf]["tpkv_output_tok_s"]
        out["tpkv_source"] = kvf
        if by_file[kvf].get("note"):
            out["tpkv_note"] = by_file[kvf]["note"]
    out["by_file"] = by_file
    return out


# ----------------------------------------------------------------------------
# SmolLM2 through vLLM (served_accuracy.py) and the HTTP server (server_check.py, serving_sweep.py)
# ----------------------------------------------------------------------------
def served_section(files):
    out = {}
    for path in files:
        d = _load(path)
        q = d.get("quantization_config", {})
        rec = {"source": os.path.relpath(path, RESULTS), "command": d.get("command"), "device": d.get("device"),
               "date": d.get("date"), "versions": d.get("versions"), "windows": d.get("windows"),
               "prompts": d.get("prompts"), "new_tokens": d.get("new_tokens"),
               "checkpoint": f"{q.get('rotation')}_{q.get('weight_method')} W{q.get('weight_bits')}"
                             f"A{q.get('act_bits')}KV{q.get('kv_bits')}",
               "offline_ppl": d.get("offline", {}).get("ppl"),
               "noise_floor_bf16_vs_fp32": d.get("offline", {}).get("noise_floor_bf16_vs_fp32"), "vllm": {}}
        for v, r in d.get("vllm", {}).items():
            if "error" in r:
                rec["vllm"][v] = {"error": r["error"]}
                continue
            rec["vllm"][v] = {k: r[k] for k in r if k.startswith(("ppl", "greedy_", "start_s", "engine_args"))}
        # variants the command asked for but the file lacks (the run was killed before them)
        argv = (d.get("command") or "").split()
        asked = []
        if "--variants" in argv:
            for a in argv[argv.index("--variants") + 1:]:
                if a.startswith("--"):
                    break
                asked.append(a)
        rec["not_measured"] = [v for v in asked if v not in d.get("vllm", {})]
        tag = os.path.basename(path)[len("served_accuracy_"):-len(".json")]
        out[f"{os.path.basename(os.path.dirname(path))}/{tag}"] = rec
    return out


def server_section(check_files, overhead_files):
    out = {}
    for path in check_files:
        d = _load(path)
        out.setdefault("openai_client_checks", {})[os.path.basename(path)[:-len("_server_check.json")]] = {
            "source": os.path.relpath(path, RESULTS), "server_command": d.get("server_command"),
            "date": d.get("date"), "all_ok": d.get("all_ok"), "error": d.get("error"),
            "checks": {k: bool(c.get("ok")) for k, c in (d.get("checks") or {}).items()}}
    for path in overhead_files:
        d = _load(path)
        pts = d.get("points", {})
        by_cfg = {}
        for p in pts.values():
            by_cfg.setdefault(f"{p['prompt_tokens']}x{p['max_tokens']}/c{p['concurrency']}", {})[p["config"]] = p
        for point, cfgs in by_cfg.items():
            if "vllm_serve" in cfgs and "spinquant_serve" in cfgs:
                a, b = cfgs["vllm_serve"], cfgs["spinquant_serve"]
                out.setdefault("overhead_vs_vllm_serve", {})[
                    os.path.basename(path)[: -len(".json")] + "/" + point] = {
                    "vllm_serve_output_tok_s": round(a["output_tokens_per_s"], 1),
                    "spinquant_serve_output_tok_s": round(b["output_tokens_per_s"], 1),
                    "throughput_ratio": round(b["output_tokens_per_s"] / a["output_tokens_per_s"], 4),
                    "tpot_p50_s": {"vllm_serve": a["tpot_p50_s"], "spinquant_serve": b["tpot_p50_s"]},
                    "ttft_p50_s": {"vllm_serve": a["ttft_p50_s"], "spinquant_serve": b["ttft_p50_s"]},
                    "errors": {"vllm_serve": a["errors"], "spinquant_serve": b["errors"]},
                    "source": os.path.relpath(path, RESULTS), "commands": [i["command"] for i in d["invocations"]]}
    return out


# the issue-7 configurations, in the order the report lists them
SWEEP_CONFIGS = ("bf16", "fp8", "fp8_fp8kv", "bf16_int4kv", "spinquant_w4a4kv16", "spinquant_w4a4kv4")


# Each SpinQuant sweep configuration's baselines: vLLM's own methods at the same weight or KV width.
SWEEP_BASELINES = {"spinquant_w4a4kv16": ("bf16", "fp8", "fp8_fp8kv"),
                   "spinquant_w4a4kv4": ("bf16", "fp8", "fp8_fp8kv", "bf16_int4kv", "spinquant_w4a4kv16")}
_GEMM_VS_FP8 = ("batched decode and prefill run the GEMMs at large M, where FP8's cuBLAS GEMM is faster "
                "(docs/PLUGIN.md, Speed and memory)")
_KV4_COSTS = ("the sweep (2026-11-23) ran the KV4 path of its build, whose prefill over the 4-bit cache took "
              "2.2x bf16 flash's time and whose decode unpacking was the slower one; the plugin's KV4 "
              "path (FlashAttention prefill, `magic` unpack) was measured with `vllm bench throughput` "
              "(1.05x W4A4KV16 at 1024/256, 1.20x at 4096/512; docs/KV_CACHE.md)")
# where each sweep comparison's losses are explained (appended to its verdict line when it loses)
SWEEP_LOSS_WHY = {
    ("spinquant_w4a4kv16", "fp8"): f" Losses at high concurrency: {_GEMM_VS_FP8}.",
    ("spinquant_w4a4kv16", "fp8_fp8kv"): f" Losses: {_GEMM_VS_FP8}; the fp8 cache also halves decode reads.",
    ("spinquant_w4a4kv4", "fp8"): f" Why: {_GEMM_VS_FP8}, plus the KV4 costs of the last line.",
    ("spinquant_w4a4kv4", "fp8_fp8kv"): f" Why: {_GEMM_VS_FP8}, plus the KV4 costs of the last line.",
    ("spinquant_w4a4kv4", "bf16_int4kv"): " Losses: look first at decode attention over the two caches "
                                          "(docs/KV_CACHE.md, decode table).",
    ("spinquant_w4a4kv4", "spinquant_w4a4kv16"): f" Why: {_KV4_COSTS}.",
}


def sweep_section(path):
    """A serving_sweep.py raw file -> per shape and concurrency, each configuration's output tok/s,
    TTFT and TPOT (p50, p99), and the SpinQuant configurations' throughput ratios to bf16 and fp8
    at the same point. Configurations or points not measured are listed, not filled in."""
    d = _load(path)
    pts = d.get("points", {})
    out = {"source": os.path.relpath(path, RESULTS), "points": {}, "ratios": {},
           "invocations": [{k: i.get(k) for k in ("command", "date", "device", "versions")}
                           for i in d.get("invocations", [])], "failures": d.get("failures", {})}
    for p in pts.values():
        key = f"{p['prompt_tokens']}x{p['max_tokens']}/c{p['concurrency']}"
        out["points"].setdefault(key, {})[p["config"]] = {
            "output_tok_s": p["output_tokens_per_s"], "ttft_p50_s": p["ttft_p50_s"], "ttft_p99_s": p["ttft_p99_s"],
            "tpot_p50_s": p["tpot_p50_s"], "tpot_p99_s": p["tpot_p99_s"], "requests": p["requests"],
            "errors": p["errors"]}
    order = lambda k: (k.split("/")[0], int(k.split("/c")[1]))
    out["points"] = {k: out["points"][k] for k in sorted(out["points"], key=order)}
    for key, cfgs in out["points"].items():
        for c, bases in SWEEP_BASELINES.items():
            if c not in cfgs:
                continue
            r = {f"vs_{b}": round(cfgs[c]["output_tok_s"] / cfgs[b]["output_tok_s"], 4)
                 for b in bases if b in cfgs}
            if r:
                out["ratios"].setdefault(key, {})[c] = r
    seen = {c for cfgs in out["points"].values() for c in cfgs}
    out["configs_measured"] = [c for c in SWEEP_CONFIGS if c in seen] + sorted(seen - set(SWEEP_CONFIGS))
    out["configs_not_measured"] = [c for c in SWEEP_CONFIGS if c not in seen]
    return out


def wins_and_losses(summary):
    """The report's verdict lines, each computed from the summary (a comparison whose numbers are
    missing is left out), with where the ceiling arithmetic of each loss is written down."""
    L = []
    acc = summary.get("accuracy") or {}
    for wm, r in acc.get("learned_vs_hadamard_gap_ratio_W4A4KV4", {}).items():
        verdict = "wins clearly" if r["ratio"] <= 0.5 else "wins narrowly" if r["ratio"] < 1 else "does not win"
        L.append(f"- Accuracy, W4A4KV4 + {wm.upper()}: the learned rotation {verdict} over a random Hadamard "
                 f"(its perplexity gap to FP16 is {r['ratio']:.2f}x the Hadamard's; SmolLM2-135M).")
    k = summary.get("kernels")
    if k:
        def split(d):
            return ([m for m, v in d.items() if v >= 1.0], [m for m, v in d.items() if v < 1.0])
        for name, d in (("cuBLAS bf16", k["w4a4_layer_speedup_vs_bf16"]), ("the fp8 GEMM", k["w4a4_layer_speedup_vs_fp8"])):
            win, lose = split(d)
            L.append(f"- W4A4 layer vs {name} (`{k['source']}`): faster at M = {', '.join(win) or 'none'}"
                     + (f"; slower at M = {', '.join(lose)}" if lose else "") + " ("
                     + ", ".join(f"{m}: {v:.2f}x" for m, v in d.items()) + ")."
                     + (" Why: int8 and fp8 MMA share one peak on Hopper, so where compute binds an int4-on-int8 "
                        "kernel can at best tie fp8 (docs/KERNELS.md, Ceilings)." if lose and "fp8" in name else "")
                     + (" Why: at large M the GEMM is MMA-bound and int8 MMA gains at most ~1.4x over cuBLAS bf16 "
                        "(docs/KERNELS.md, Ceilings)." if lose and "bf16" in name else ""))
    sw = summary.get("serving_sweep")
    if sw:
        for cfg, bases in SWEEP_BASELINES.items():
            for base in bases:
                win, lose = [], []
                for key, by_cfg in sw["ratios"].items():
                    r = by_cfg.get(cfg, {}).get(f"vs_{base}")
                    if r is not None:
                        (win if r >= 1.0 else lose).append(f"{key} {r:.2f}x")
                if win or lose:
                    L.append(f"- Serving sweep, {cfg} vs {base} (output tok/s): ahead at {len(win)} of "
                             f"{len(win) + len(lose)} points" + (f" ({', '.join(win)})" if win and lose else "")
                             + (f"; behind at {', '.join(lose)}." if lose else ".")
                             + (SWEEP_LOSS_WHY.get((cfg, base), "") if lose else ""))
    srv = summary.get("serving") or {}
    tp, wm = srv.get("output_tok_s", {}), srv.get("weight_memory_gib", {})
    tp_src = srv.get("headline_source")
    if not tp.get("bf16") and srv.get("baselines"):
        tp, tp_src = srv["baselines"]["output_tok_s"], srv["baselines"]["source"]
    if tp.get("spinquant_w4a4kv16") and tp.get("fp8") and tp.get("bf16"):
        L.append(f"- `vllm bench throughput` 1024/256 (`{tp_src}`): W4A4KV16 "
                 f"{tp['spinquant_w4a4kv16'] / tp['bf16']:.2f}x bf16, {tp['spinquant_w4a4kv16'] / tp['fp8']:.2f}x FP8 "
                 "(issue target >= 1.25x FP8: " + ("met" if tp["spinquant_w4a4kv16"] >= 1.25 * tp["fp8"] else "missed")
                 + "; docs/PLUGIN.md has the arithmetic).")
    lat = srv.get("latency_bs1_s", {})
    if lat.get("spinquant_w4a4kv16") and lat.get("bf16"):
        r = lat["spinquant_w4a4kv16"] / lat["bf16"]
        L.append(f"- `vllm bench latency` batch 1, 512/128 (`{srv.get('latency_source') or srv.get('headline_source')}`): W4A4KV16 "
                 f"{lat['spinquant_w4a4kv16']:.3f} s, {r:.2f}x bf16's"
                 + (f", {lat['spinquant_w4a4kv16'] / lat['fp8']:.2f}x FP8's" if lat.get("fp8") else "")
                 + " (issue target <= 0.6x bf16: " + ("met" if r <= 0.6 else "missed") + ").")
    if not wm.get("bf16") and srv.get("baselines"):
        wm = srv["baselines"].get("weight_memory_gib", wm)
    if wm.get("spinquant") and wm.get("bf16"):
        L.append(f"- Weight memory: {wm['spinquant']:.2f} GiB vs {wm['bf16']:.2f} GiB bf16 ({wm['spinquant'] / wm['bf16']:.2f}x; "
                 "the 16-bit embedding and lm_head of a 128K vocabulary are 0.13x on their own, docs/PLUGIN.md).")
    head_tp, kvtp = srv.get("output_tok_s", {}), srv.get("tpkv_output_tok_s", {})
    pairs = [(w, d) for w, d in (("1024/256", head_tp), ("4096/512", kvtp))
             if d.get("spinquant_w4a4kv4") and d.get("spinquant_w4a4kv16")]
    if pairs:
        L.append("- W4A4KV4 (the plugin's KV4 path) vs W4A4KV16, output tok/s side by side: " + "; ".join(
            f"{w} {d['spinquant_w4a4kv4'] / d['spinquant_w4a4kv16']:.2f}x" for w, d in pairs)
            + " (issue 5 target: >= 1x at 1024/256, clearly higher at 4096/512).")
    kv = srv.get("kv_capacity_tokens", {})
    if kv.get("spinquant_w4a4kv4") and kv.get("spinquant_w4a4kv16"):
        L.append(f"- KV capacity: the 4-bit cache holds {kv['spinquant_w4a4kv4'] / kv['spinquant_w4a4kv16']:.2f}x the "
                 "tokens of the 16-bit one in the same memory.")
    return L


# ----------------------------------------------------------------------------
def write_report(summary, acc_table, kernel_rows, path, plots=()):
    L = ["# SpinQuant-vLLM results", "",
         "Generated by `python benchmarks/report.py` from the raw JSON files in this folder; do not edit by hand.",
         "Every number below is traceable to its raw file, which records the command, device, versions and date.", ""]
    L += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
    verdict = wins_and_losses(summary)
    if verdict:
        L += ["## Where SpinQuant wins and where it loses", ""] + verdict + [""]
    acc = summary.get("accuracy")
    if acc:
        L += ["## Accuracy: " + str(acc.get("model")), "",
              f"Perplexity on {acc.get('eval_text')}, 2048-token windows; zero-shot = mean accuracy over the eight "
              "tasks (ARC-e, ARC-c, BoolQ, HellaSwag, OBQA, PIQA, SIQA, WinoGrande), full validation sets.", "",
              "| bits | method | seed | ppl | zero-shot avg | rotation learning (s, H100) |", "|---|---|---:|---:|---:|---:|"]
        fp = acc.get("fp16", {})
        if fp:
            L.append(f"| FP16 | - | - | {fp['ppl']:.2f} | {fp.get('zeroshot8_avg', float('nan')):.4f} | - |")
        for bits, m, seed, ppl, zs, secs in acc_table:
            L.append(f"| {bits} | {m} | {seed} | {ppl:.2f} | {'' if zs is None else f'{zs:.4f}'} | "
                     f"{'' if secs is None else f'{secs:.0f}'} |")
        L.append("")
        for bits in ("W4A4KV4", "W4A4KV16", "W4A16KV16"):
            sec = acc.get(bits)
            if not sec:
                continue
            L += [f"{bits}, mean ± std over seeds:", "", "| method | seeds | ppl | zero-shot avg (seed 0) |",
                  "|---|---:|---:|---:|"]
            for m, rec in sec.items():
                vals = rec["ppl"] if isinstance(rec["ppl"], list) else [rec["ppl"]]
                sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
                zs = rec.get("zeroshot8_avg")
                zs = zs[0] if isinstance(zs, list) else zs
                L.append(f"| {m} | {len(vals)} | {statistics.mean(vals):.2f}{sd} | "
                         f"{'' if zs is None else f'{zs:.4f}'} |")
            L.append("")
        for bits in ("W4A4KV4", "W4A4KV16", "W4A16KV16"):
            for wm, r in acc.get(f"learned_vs_hadamard_gap_ratio_{bits}", {}).items():
                L.append(f"- {bits} {wm.upper()}: learned perplexity gap to FP16 / random-Hadamard gap = "
                         f"{r['ratio']:.2f} ({r['seeds_learned']} learned / {r['seeds_hadamard']} Hadamard seeds)"
                         + (" (issue target <= 0.40; the paper's LLaMA-2 7B: about 0.26 with RTN)."
                            if bits == "W4A4KV4" else "."))
        L.append("")
        if acc.get("ablation_absmax_weight_scales"):
            L += ["Ablation, absmax weight scales (no MSE clip search): " + ", ".join(
                f"{k}: {v:.2f}" for k, v in acc["ablation_absmax_weight_scales"].items()), ""]
    results = os.path.dirname(path)
    for apath in find(results, "rotation_ablation")[-1:]:
        ab = _load(apath)
        L += ["### Learned vs random-Hadamard rotation under two RTN weight quantizers (W4A4KV4)", "",
              f"`{os.path.relpath(apath, results)}`: first {ab['windows']} held-out windows of 2048 tokens, "
              f"device {ab['device']}; the learned rotation is the H100 one (learned with absmax weight fake "
              "quant).", "", "| rotation / weight scales | ppl |", "|---|---:|"]
        L += [f"| {k} | {v:.2f} |" for k, v in ab["ppl"].items()] + [""]
    for kpath in find(results, "kurtosis")[-1:]:
        kd = _load(kpath)["kurtosis"]
        types = list(next(iter(kd.values())))
        L += [f"### Activation kurtosis (max over layers; `{os.path.relpath(kpath, results)[:-len('.json')]}.png`)", "",
              "| rotation | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
        for name, per in kd.items():
            L.append(f"| {name} | " + " | ".join(f"{max(per[t]):.1f}" for t in types) + " |")
        L.append("")
    k = summary.get("kernels")
    if k:
        L += ["## Kernels (" + k["device"] + ")", "",
              f"Source `{k['source']}`. {k['w4a4_layer_speedup_note']}.", "",
              "| M | W4A4 layer vs bf16 | vs fp8 GEMM | shapes |", "|---:|---:|---:|---|"]
        for M in k["w4a4_layer_speedup_vs_bf16"]:
            L.append(f"| {M} | {k['w4a4_layer_speedup_vs_bf16'][M]:.2f}x | {k['w4a4_layer_speedup_vs_fp8'][M]:.2f}x | "
                     f"{', '.join(k.get('w4a4_layer_speedup_shapes', {}).get(M, []))} |")
        L += ["", f"hadamard_quant / copy of the same bytes (worst row, M >= 1024): {k['hadamard_quant_vs_copy']:.2f} "
              f"(without a Hadamard: {k['hadamard_quant_vs_copy_without_hadamard']:.2f}). Per-shape table and "
              f"ceiling arithmetic: `{k['source'][:-len('.json')]}.md`, `../../docs/KERNELS.md`.", ""]
    s = summary.get("serving")
    if s:
        L += ["## Serving (" + str(s.get("device")) + ")", "", s["workload"] + ".", ""]
        for src, f in s["by_file"].items():
            tp, l1, l16 = f.get("output_tok_s", {}), f.get("latency_bs1_s", {}), f.get("latency_bs16_s", {})
            L += [f"### `{src}`", ""]
            if tp or l1 or l16:   # a file may hold only 4096/512 runs
                L += ["| config | output tok/s (1024/256) | vs bf16 | vs fp8 | latency bs1 s | "
                      "latency bs16 s | weight memory GiB | KV capacity tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            ratio = lambda v, base: f"{v / base:.2f}x" if v is not None and base else ""
            for key in dict.fromkeys(list(tp) + list(l1) + list(l16)):
                wm = f.get("weight_memory_gib", {}).get("spinquant" if key.startswith("spinquant") else key, "")
                v = tp.get(key)
                L.append(f"| {key} | {'' if v is None else f'{v:.0f}'} | {ratio(v, tp.get('bf16'))} | "
                         f"{ratio(v, tp.get('fp8'))} | {l1.get(key, '')} | {l16.get(key, '')} | {wm} | "
                         f"{f.get('kv_capacity_tokens', {}).get(key, '')} |")
            if f.get("latency_bs1_eager_s"):
                L += ([""] if tp or l1 or l16 else []) + ["Batch-1 latency with `--enforce-eager`: " + ", ".join(
                    f"{k} {v:.3f} s" for k, v in f["latency_bs1_eager_s"].items())]
            if f.get("tpkv_output_tok_s"):
                L += ([""] if tp or l1 or l16 else []) + ["4096 in / 512 out (KV capacity binds): " + ", ".join(
                    f"{k} {v:.0f} output tok/s" for k, v in f["tpkv_output_tok_s"].items())]
            for wl, vals in f.get("other_output_tok_s", {}).items():
                L += ["", f"{wl}: " + ", ".join(f"{k} {v:.0f} output tok/s" for k, v in vals.items())]
            if f.get("failed"):
                L += ["", "Failed runs: " + ", ".join(f["failed"])]
            if f.get("note"):
                L += ["", "Note: " + f["note"]]
            L += ["", "Invocations:"] + [f"- `{i['command']}` ({i['date']}, {i['device']}, {i['versions']})"
                                         for i in f.get("invocations", [])] + [""]
    for tag, rec in summary.get("served_accuracy", {}).items():
        L += [f"## Served through vLLM: {rec['checkpoint']} ({tag})", "",
              f"`{rec['source']}` ({rec['device']}, {rec['date']}). Perplexity from vLLM's prompt logprobs over the "
              f"same {rec['windows']} held-out 2048-token windows as the offline evaluation; greedy continuations of "
              f"{rec['prompts']} held-out prompts ({rec['new_tokens']} tokens). Offline fake-quant perplexity of the "
              "same checkpoint: " + ", ".join(f"{k} {v:.3f}" for k, v in (rec["offline_ppl"] or {}).items()) + ".", "",
              "| vLLM variant | ppl | vs offline fp32 | vs offline bf16 | greedy position match | "
              "teacher-forced agreement | start s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for v, r in rec["vllm"].items():
            if "error" in r:
                L.append(f"| {v} | failed: {r['error']} | | | | | |")
                continue
            f = lambda k, fmt="{:+.2%}": fmt.format(r[k]) if r.get(k) is not None else ""
            L.append(f"| {v} | {r['ppl']:.3f} | {f('ppl_rel_diff_vs_offline_float32')} | "
                     f"{f('ppl_rel_diff_vs_offline_bfloat16')} | {f('greedy_position_match', '{:.3f}')} | "
                     f"{f('greedy_teacher_forced_vs_offline_ckpt_kv', '{:.3f}')} | {f('start_s', '{:.0f}')} |")
        for v in rec.get("not_measured", []):
            L.append(f"| {v} | not measured: requested, no result (the run ended first) | | | | | |")
        nf = rec.get("noise_floor_bf16_vs_fp32")
        if nf:
            L += ["", "Noise floor (the offline model in bf16 vs in fp32): " + "; ".join(
                f"{kv}: position match {x['greedy_position_match']:.3f}"
                + (f", teacher-forced {x['greedy_teacher_forced']:.3f}" if x.get("greedy_teacher_forced") else "")
                for kv, x in nf.items())]
        L.append("")
    for nf_path in find(results, "noise_floor"):
        d = _load(nf_path)
        nf = d.get("offline", {}).get("noise_floor_bf16_vs_fp32", {}).get("kvckpt")
        if nf:
            L += [f"Agreement noise floor (`{os.path.relpath(nf_path, os.path.dirname(path))}`, {d.get('device') or 'cpu'}, "
                  f"{d.get('prompts')} prompts x {d.get('new_tokens')} tokens): the offline fake-quant model in bf16 "
                  f"vs in fp32 agrees on {nf['greedy_position_match']:.3f} of greedy positions, teacher-forced "
                  f"{nf['greedy_teacher_forced']:.3f}.", ""]
    for af_path in find(results, "agreement_floor"):
        d = _load(af_path)
        L += [f"Agreement floor of {d['model']} (`{os.path.relpath(af_path, os.path.dirname(path))}`, {d['device']}, "
              f"{d['prompts']} prompts x {d['new_tokens']} tokens): bf16 vs fp32 greedy position match "
              f"{d['bf16_vs_fp32_position_match']:.3f}, teacher-forced {d['teacher_forced_fp32_on_bf16']:.3f}.", ""]
    sw = summary.get("serving_sweep")
    if sw:
        inv = sw["invocations"]
        L += ["## Serving sweep: `vllm serve` per configuration, streaming client (`serving_sweep.png`)", "",
              f"`{sw['source']}`, {len(inv)} invocations ({inv[0]['date']} to {inv[-1]['date']}, {inv[0]['device']}). "
              "Dummy Llama-3-8B-shaped weights, closed-loop streaming `/v1/completions` with `ignore_eos`, "
              "max(3, 2 x concurrency) requests per point. Cells: output tok/s, TPOT p50 ms, TTFT p50 s.", ""]
        cfgs = sw["configs_measured"]
        L += ["| point | " + " | ".join(cfgs) + " | W4A4KV16 vs bf16 / fp8 | W4A4KV4 vs bf16 / fp8 "
              "| W4A4KV4 vs bf16_int4kv |", "|---|" + "---:|" * (len(cfgs) + 3)]
        for key, pc in sw["points"].items():
            cell = lambda c: (f"{pc[c]['output_tok_s']:.0f} / {pc[c]['tpot_p50_s'] * 1e3:.2f} / "
                              f"{pc[c]['ttft_p50_s']:.2f}" if c in pc else "-")
            def rat(c, bases=("bf16", "fp8")):
                r = sw["ratios"].get(key, {}).get(c, {})
                r = {b: r[f"vs_{b}"] for b in bases if f"vs_{b}" in r}
                if len(r) == len(bases):
                    return " / ".join(f"{v:.2f}x" for v in r.values())
                return " ".join(f"vs_{b} {v:.2f}x" for b, v in r.items()) or "-"  # some missing: say which
            L.append(f"| {key} | " + " | ".join(cell(c) for c in cfgs)
                     + f" | {rat('spinquant_w4a4kv16')} | {rat('spinquant_w4a4kv4')} "
                     f"| {rat('spinquant_w4a4kv4', ('bf16_int4kv',))} |")
        if sw["configs_not_measured"]:
            L += ["", "Not yet measured: " + ", ".join(sw["configs_not_measured"]) + "."]
        if sw["failures"]:
            L += ["", "Failed: " + "; ".join(f"{k}: {v}" for k, v in sw["failures"].items())]
        L += ["", "Invocations:"] + [f"- `{i['command']}` ({i['date']})" for i in inv] + [""]
    srv = summary.get("server")
    if srv:
        L += ["## OpenAI-compatible server over vLLM", ""]
        for tag, c in srv.get("openai_client_checks", {}).items():
            ok = [k for k, v in c["checks"].items() if v]
            bad = [k for k, v in c["checks"].items() if not v]
            L.append(f"- `{c['source']}`: official `openai` client, {len(ok)}/{len(c['checks'])} checks passed"
                     + (f"; failed: {', '.join(bad)}" if bad else "") + (f"; error: {c['error']}" if c.get("error") else ""))
        for point, o in srv.get("overhead_vs_vllm_serve", {}).items():
            L.append(f"- {point}: `spinquant serve` {o['spinquant_serve_output_tok_s']:.0f} output tok/s vs `vllm serve` "
                     f"{o['vllm_serve_output_tok_s']:.0f} (ratio {o['throughput_ratio']:.3f}; target >= 0.95); "
                     f"TPOT p50 {o['tpot_p50_s']['spinquant_serve'] * 1e3:.1f} vs {o['tpot_p50_s']['vllm_serve'] * 1e3:.1f} ms; "
                     f"TTFT p50 {o['ttft_p50_s']['spinquant_serve']:.2f} vs {o['ttft_p50_s']['vllm_serve']:.2f} s")
        L.append("")
    provenance.write_text(path, "\n".join(L))


# ----------------------------------------------------------------------------
# plots (matplotlib's Agg canvas; no pyplot state)
# ----------------------------------------------------------------------------
def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _log2_axis(ax, xlabel, ylabel):
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _figure(ncols, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * ncols, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(title)
    return fig, axes


def plot_accuracy(acc, path):
    """Perplexity per method, one group per bit setting (log scale; seeds as dots, mean as bar)."""
    settings = [b for b in ("W4A4KV4", "W4A4KV16", "W4A16KV16") if b in acc]
    if not settings:
        return None
    fig, (ax,) = _figure(1, "SmolLM2-135M: perplexity on held-out Wikipedia")
    width = 0.8 / len(ACC_METHODS)
    for j, m in enumerate(ACC_METHODS):
        xs, means = [], []
        for i, b in enumerate(settings):
            rec = acc[b].get(m)
            if rec is None:
                continue
            vals = rec["ppl"] if isinstance(rec["ppl"], list) else [rec["ppl"]]
            x = i + (j - (len(ACC_METHODS) - 1) / 2) * width
            xs.append(x)
            means.append(statistics.mean(vals))
            ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
        if xs:
            ax.bar(xs, means, width=width, label=m)
    if "fp16" in acc:
        ax.axhline(acc["fp16"]["ppl"], color="k", linestyle="--", linewidth=1, label="FP16")
    ax.set_yscale("log")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("perplexity (log)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_kernels(rows, path):
    """W4A4 layer speedup over cuBLAS bf16 and fp8 GEMM vs M, one line per shape."""
    if not rows:
        return None
    best = lambda r: min(v for k, v in r.items() if k.startswith("w4a4_layer_") and k.endswith("_us"))
    fig, axes = _figure(2, "W4A4 layer (Hadamard+quantize + int4 GEMM) on the H100, Llama-3-8B shapes")
    for ax, base, label in ((axes[0], "bf16_us", "vs cuBLAS bf16"), (axes[1], "fp8_gemm_us", "vs fp8 _scaled_mm")):
        for shape in sorted({r["shape"] for r in rows}):
            rs = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["M"])
            ax.plot([r["M"] for r in rs], [r[base] / best(r) for r in rs], marker="o", label=shape)
        ax.axhline(1.0, color="k", linewidth=1)
        _log2_axis(ax, "M (tokens)", "speedup " + label)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(points, path):
    """Output tok/s, TTFT p50 and TPOT p50 vs concurrency: one row of panels per shape, one
    colour per configuration (the same in every panel)."""
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shape = lambda p: f"{p['prompt_tokens']}x{p['max_tokens']}"
    shapes = sorted({shape(p) for p in points.values()}, key=lambda s: [int(x) for x in s.split("x")])
    present = {p["config"] for p in points.values()}
    cfgs = [c for c in SWEEP_CONFIGS if c in present] + sorted(present - set(SWEEP_CONFIGS))
    # colours fixed by the configuration list, so a later run that adds one keeps the others' colours
    colour = {c: f"C{(list(SWEEP_CONFIGS) + sorted(present - set(SWEEP_CONFIGS))).index(c) % 10}" for c in cfgs}
    fig = Figure(figsize=(15.6, 3.4 * len(shapes)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shapes), 3, squeeze=False)
    fig.suptitle("Serving sweep on the H100 (vLLM, dummy Llama-3-8B weights; streaming /v1/completions, ignore_eos)")
    for row, sh in zip(axes, shapes):
        for cfg in cfgs:
            ps = sorted((p for p in points.values() if p["config"] == cfg and shape(p) == sh),
                        key=lambda p: p["concurrency"])
            if not ps:
                continue
            c = [p["concurrency"] for p in ps]
            for ax, k, scale in zip(row, ("output_tokens_per_s", "ttft_p50_s", "tpot_p50_s"), (1, 1, 1e3)):
                ax.plot(c, [p[k] * scale for p in ps], marker="o", color=colour[cfg], label=cfg)
        for ax, lab in zip(row, ("output tok/s", "TTFT p50 (s)", "TPOT p50 (ms)")):
            _log2_axis(ax, "concurrency", f"{sh}: {lab}")
        row[0].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args(argv)
    summary, acc_table, krows = {}, [], []
    acc, acc_table = accuracy_section(find(args.results, "accuracy", "date"))
    if acc:
        summary["accuracy"] = acc
    for kpath in find(args.results, "kernels", "date_utc")[-1:]:   # the newest whole run
        summary["kernels"], krows = kernels_section(kpath)
    serv = serving_section(find(args.results, "throughput") + find(args.results, "latency"))
    if serv:
        summary["serving"] = serv
    served = served_section(find(args.results, "served_accuracy", "date"))
    if served:
        summary["served_accuracy"] = served
        ppl, src = {}, None
        for rec in served.values():  # oldest first: a later run of a checkpoint wins
            ck = rec["checkpoint"].replace(" ", "_")
            for v, r in rec["vllm"].items():
                if "ppl" in r:
                    ppl[f"{ck}/{v}"] = round(r["ppl"], 4)
                    src = rec["source"]
                    if v == "spinquant":  # the checkpoint as it asks to be served (its own KV setting)
                        ppl[ck] = round(r["ppl"], 4)  # ../shared/RESULTS.md's key, e.g. learned_gptq_W4A4KV4
        if ppl and acc is not None:
            summary["accuracy"]["vllm_served_ppl"] = ppl
            summary["accuracy"]["vllm_served_ppl_source"] = src
    server = server_section(find(args.results, "server_check"), find(args.results, "server_overhead"))
    if server:
        summary["server"] = server
    sweep = {}
    for sweep_path in find(args.results, "sweep")[-1:]:   # the newest sweep
        sweep = _load(sweep_path)["points"]
        if sweep:
            summary["serving_sweep"] = sweep_section(sweep_path)
    provenance.write_json(os.path.join(args.results, "summary.json"), summary, indent=2)
    plots = [plot_accuracy(acc, os.path.join(args.results, "accuracy_ppl.png")) if acc else None,
             plot_kernels(krows, os.path.join(args.results, "kernels_speedup.png")),
             plot_sweep(sweep, os.path.join(args.results, "serving_sweep.png"))]
    write_report(summary, acc_table, krows, os.path.join(args.results, "REPORT.md"),
                 [os.path.basename(p) for p in plots if p])
    print(json.dumps({k: list(v) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
