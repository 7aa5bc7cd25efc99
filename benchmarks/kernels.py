"""Kernel benchmark on the H100: hadamard_quant and the W4A4 layer against cuBLAS baselines.

All baselines run side by side in one invocation, timed with
``triton.testing.do_bench`` medians (L2 flushed before every repetition):

* hadamard_quant (fused block Hadamard + per-token int4 quantization) vs a
  device copy that moves the same bytes (read x, write codes + scale + zero);
* the W4A4 layer (hadamard_quant + w4a4_gemm on int8 MMA, activations packed two
  codes per byte or one code per byte) vs cuBLAS bf16
  ``x @ w.T``, ``torch._scaled_mm`` fp8 with row-wise scales (GEMM only, and
  with the per-token fp8 quantization of x in PyTorch), ``torch._int_mm`` int8;
* the W4A4 GEMM alone and the W4A16 GEMM at decode sizes, for reference.

Every W4A4 GEMM output is checked bit-exact (float32 rows) against the exact
reference on the first rows before it is timed; the result is in the JSON.

Usage (repo installed, GPU): ``python benchmarks/kernels.py --out DIR``;
``--from-json FILE --out DIR`` only rewrites the Markdown table from a JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

SHAPES = [  # name, K, N, had_size (Llama-3-8B)
    ("qkv", 4096, 6144, 0),
    ("o", 4096, 4096, 0),
    ("gate_up", 4096, 28672, 0),
    ("down", 14336, 4096, 14336),
]
SMOKE_SHAPES = [("smoke", 256, 64, 256), ("smoke0", 128, 48, 0)]  # CPU check of this script (--smoke)
MS = [1, 16, 64, 256, 1024, 2048, 4096, 8192]
CHECK_ROWS = 64
LAYER_TAGS = ("int8", "unpacked")  # packed int4 activations; int4 codes one per byte (both int8 MMA)
HEADLINE = "int8"  # the variant w4ax_linear runs: the ratios in "Targets" use it
# Published dense peaks of the H100 SXM (TFLOP/s or TOPS): the ceilings in the table.
PEAK = {"bf16": 989.0, "fp8": 1979.0, "int8": 1979.0}


L2_BYTES = 50 * 2 ** 20  # H100 L2


def _copies(nbytes: int) -> int:
    """Distinct buffers to cycle through so that a call never finds its operand in L2."""
    return max(1, min(16, math.ceil(2 * L2_BYTES / max(nbytes, 1))))


def _bench(fns, n_rep: int) -> float:
    """Median microseconds per call of ``fns`` (cycled), replayed from one CUDA graph.

    The graph removes the host launch overhead (as vLLM's CUDA graphs do);
    cycling through distinct operand copies keeps L2 cold for the weights.
    """
    if not torch.cuda.is_available():  # CPU smoke run (TRITON_INTERPRET=1): one timed call
        t = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - t) * 1e6
    calls = list(fns) * max(1, math.ceil(8 / len(fns)))
    for f in fns:  # compile / autotune outside the capture
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(n_rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def _cycle2(a, b):
    n = max(len(a), len(b))
    return [(a[i % len(a)], b[i % len(b)]) for i in range(n)]


def _fp8_rowwise(x):
    """Per-row fp8 e4m3 quantization in PyTorch: (M, K) -> (fp8 (M, K), scale (M, 1) f32)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    s = amax / 448.0
    return (x.float() / s).to(torch.float8_e4m3fn), s


def run(args, dump=None) -> dict:
    import triton
    from spinquant_kernels import format as fmt
    from spinquant_kernels import w4a4_gemm as gemm_mod
    from spinquant_kernels.hadamard_quant import hadamard_quant
    from spinquant_kernels.linear import PackedW4, prepare_w4
    from spinquant_kernels.w4a4_gemm import w4a4_gemm, w4a4_matmul_exact, w4a16_gemm

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "timing": ("median over replays of one CUDA graph of >= 8 calls (no host launch overhead), "
                   "operands cycled through copies that exceed 2x L2; microseconds per call"),
        "rows": [],
    }
    t_start = time.time()
    shapes = SMOKE_SHAPES if args.smoke else [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    ms = args.ms or MS
    R = args.rep
    for name, K, N, had in shapes:
        qw = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
        sw = torch.rand(N, generator=g) * 0.01 + 0.001
        pw0 = prepare_w4(fmt.pack_int4(qw).to(dev), sw.to(dev))
        qw_d = qw.to(dev)
        n4 = _copies(N * K // 2)
        pws = [pw0] + [PackedW4(pw0.qweight.clone(), pw0.scale, pw0.rowsum, N, K) for _ in range(n4 - 1)]
        wb = [(qw.float() * sw[:, None]).to(torch.bfloat16).to(dev) for _ in range(_copies(N * K * 2))]
        w8 = [qw_d.to(torch.float8_e4m3fn) for _ in range(_copies(N * K))]  # int4 codes are exact in e4m3
        wi8 = [qw_d.clone() for _ in range(_copies(N * K))]
        w_s = sw.to(dev).reshape(1, N)
        for M in ms:
            if time.time() - t_start > args.budget_s:
                print(f"budget of {args.budget_s}s spent: skipping {name} M={M}", flush=True)
                continue
            row = {"shape": name, "M": M, "K": K, "N": N, "had_size": had}
            x = torch.randn(M, K, generator=g).to(torch.bfloat16).to(dev)
            xs_ = [x] + [x.clone() for _ in range(_copies(M * K * 2) - 1)]
            # ---- hadamard_quant vs a copy of the same bytes -----------------
            nbytes = M * K * 2 + M * K // 2 + 8 * M
            srcs = [torch.empty(nbytes // 2 + 1, dtype=torch.uint8, device=dev) for _ in range(len(xs_))]
            dst = torch.empty_like(srcs[0])
            row["hq_bytes"] = nbytes
            row["copy_us"] = _bench([(lambda s_=s_: dst.copy_(s_)) for s_ in srcs], R)
            row["hq_us"] = _bench([(lambda x_=x_: hadamard_quant(x_, had, 4)) for x_ in xs_], R)
            q, s, z = hadamard_quant(x, had, 4)
            qu, _, _ = hadamard_quant(x, had, 4, pack=False)
            # ---- correctness of every GEMM variant on the first rows -----------
            r = min(M, CHECK_ROWS)
            ref = w4a4_matmul_exact(qu[:r], s[:r], z[:r], qw_d, pw0.scale)
            row["hq_pack_consistent"] = bool(torch.equal(fmt.pack_int4(qu), q))
            for tag, a in (("int8", q), ("unpacked", qu)):
                y = w4a4_gemm(a, s, z, pw0, torch.float32)
                row[f"exact_{tag}"] = bool(torch.equal(y[:r], ref))
            # ---- W4A4: GEMM alone and the full layer ---------------------------
            for tag, packed in (("int8", True), ("unpacked", False)):
                a = q if packed else qu
                row[f"w4a4_gemm_{tag}_us"] = _bench(
                    [(lambda w_=w_, a=a: w4a4_gemm(a, s, z, w_, torch.bfloat16)) for w_ in pws], R)
                row[f"w4a4_layer_{tag}_us"] = _bench(
                    [(lambda w_=w_, x_=x_, packed=packed: w4a4_gemm(*hadamard_quant(x_, had, 4, pack=packed), w_,
                                                                    torch.bfloat16))
                     for w_, x_ in _cycle2(pws, xs_)], R)
            if M <= 64:
                row["w4a16_gemm_us"] = _bench([(lambda w_=w_: w4a16_gemm(x, w_)) for w_ in pws], R)
            # ---- baselines -----------------------------------------------------
            row["bf16_us"] = _bench([(lambda w_=w_: x @ w_.T) for w_ in wb], R)
            xf8, xs = _fp8_rowwise(x)
            row["fp8_gemm_us"] = _bench([(lambda w_=w_: _scaled_mm(xf8, xs, w_, w_s)) for w_ in w8], R)
            row["fp8_layer_us"] = _bench([(lambda w_=w_: _fp8_layer(x, w_, w_s)) for w_ in w8], R)
            if M > 16 and dev.type == "cuda":  # torch._int_mm needs M > 16
                xi8 = torch.randint(-8, 8, (M, K), dtype=torch.int8, device=dev)
                row["int8_gemm_us"] = _bench([(lambda w_=w_: torch._int_mm(xi8, w_.T)) for w_ in wi8], R)
            flop = 2.0 * M * N * K
            for k in list(row):
                if k.endswith("_us") and k not in ("copy_us", "hq_us"):
                    row[k.replace("_us", "_tflops")] = flop / row[k] * 1e-6
            res["rows"].append(row)
            res["tuned_configs"] = gemm_mod.tuned_configs()
            if dump is not None:
                dump(res)  # partial results survive a time-out
            best = _best(row)
            print(f"{name:8s} M={M:5d}  hq {row['hq_us']:8.1f} (copy {row['copy_us']:7.1f})  layer "
                  + " ".join(f"{t} {row[f'w4a4_layer_{t}_us']:8.1f}" for t in LAYER_TAGS)
                  + f"  bf16 {row['bf16_us']:8.1f} fp8mm {row['fp8_gemm_us']:8.1f}  "
                  f"x{row['bf16_us'] / best:4.2f} vs bf16  exact "
                  + "/".join(str(row[f"exact_{t}"]) for t in LAYER_TAGS), flush=True)
        del pws, pw0, qw_d, wb, w8, wi8
        torch.cuda.empty_cache()
    if args.hq_sweep and dev.type == "cuda":
        res["hq_sweep"] = _hq_sweep(R)
    res["wall_s"] = time.time() - t_start
    return res


def _hq_sweep(R):
    """hadamard_quant launch heuristics at M = 4096 for the two kinds of K (us per call)."""
    from spinquant_kernels import hadamard_quant as hqm
    out = []
    for K, had in ((14336, 14336), (4096, 0)):
        x = torch.randn(4096, K, device="cuda").to(torch.bfloat16)
        xs_ = [x] + [x.clone() for _ in range(_copies(x.numel() * 2) - 1)]
        for warps in (4, 8, 16):
            for pps in (1, 2, 8):
                try:
                    t = _bench([(lambda x_=x_, w=warps, p=pps: hqm.hadamard_quant(
                        x_, had, 4, programs_per_sm=p, num_warps=w)) for x_ in xs_], R)
                except Exception as e:  # a launch that does not fit is a result too
                    t = f"{type(e).__name__}: {e}"[:200]
                out.append({"K": K, "had_size": had, "num_warps": warps, "programs_per_sm": pps, "us": t})
                print("hq sweep", out[-1], flush=True)
    return out


def _scaled_mm(xf8, xs, w_fp8, w_s):
    if xf8.device.type == "cpu":  # the CPU backend takes per-tensor scales only (smoke run)
        xs, w_s = xs.max(), w_s.max()
    return torch._scaled_mm(xf8, w_fp8.T, scale_a=xs, scale_b=w_s, out_dtype=torch.bfloat16)


def _fp8_layer(x, w_fp8, w_s):
    xf8, xs = _fp8_rowwise(x)
    return _scaled_mm(xf8, xs, w_fp8, w_s)


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------
def _gm(vals):
    vals = [v for v in vals if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def _best(r):
    """The W4A4 layer time the targets are judged on: the path w4ax_linear runs."""
    return r[f"w4a4_layer_{HEADLINE}_us"]


def headline(res: dict) -> dict:
    """Per-M geometric means of the int8 W4A4 layer's speedups (summary.json's kernel keys)."""
    rows = res["rows"]
    per_m = {}
    for m in sorted({r["M"] for r in rows}):
        rs = [r for r in rows if r["M"] == m]
        per_m[str(m)] = {
            "vs_bf16": _gm([r["bf16_us"] / _best(r) for r in rs]),
            "vs_fp8_gemm": _gm([r["fp8_gemm_us"] / _best(r) for r in rs]),
            "vs_fp8_layer": _gm([r["fp8_layer_us"] / _best(r) for r in rs]),
            "shapes": [r["shape"] for r in rs]}
    hq = {}
    for had in sorted({r["had_size"] for r in rows}):
        v = [r["hq_us"] / r["copy_us"] for r in rows if r["had_size"] == had and r["M"] >= 1024]
        if v:
            hq[str(had)] = max(v)
    return {"per_m": per_m, "hadamard_quant_vs_copy": hq} if rows else {}


def markdown(res: dict) -> str:
    rows = res["rows"]
    tags = [t for t in LAYER_TAGS if rows and f"w4a4_layer_{t}_us" in rows[0]]
    out = [f"# Kernel benchmark: {res['device']}", "",
           f"torch {res['torch']}, triton {res['triton']}, {res['date_utc']}; "
           f"command `{res['command']}`. Timing: {res['timing']}.", "",
           "Layer = everything from bf16 x to bf16 y. W4A4 layer = hadamard_quant + w4a4_gemm on int8 MMA: "
           "`int8` packed int4 activations (the path `w4ax_linear` runs; the ratios use it), `unpacked` int4 "
           "codes written one per byte by hadamard_quant (weights always packed int4). "
           "fp8 layer = per-token fp8 quantization in PyTorch + `torch._scaled_mm`; fp8 GEMM = `torch._scaled_mm` "
           "alone (x already fp8); bf16 = cuBLAS `x @ w.T` (no Hadamard, as in the bf16 model); "
           "int8 = `torch._int_mm` alone (M > 16 only). Times in microseconds.", "",
           "| shape | M | bf16 | fp8 GEMM | fp8 layer | int8 GEMM | "
           + " | ".join(f"W4A4 GEMM {t}" for t in tags) + " | "
           + " | ".join(f"W4A4 layer {t}" for t in tags)
           + " | vs bf16 | vs fp8 GEMM | vs fp8 layer | hq / copy | exact |",
           "|---|---:|" + "---:|" * (4 + 2 * len(tags) + 4) + "---|"]
    for r in rows:
        best = _best(r)
        i8 = f"{r['int8_gemm_us']:.1f}" if "int8_gemm_us" in r else "-"
        out.append(
            f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {r['fp8_gemm_us']:.1f} | {r['fp8_layer_us']:.1f} | {i8} | "
            + " | ".join(f"{r[f'w4a4_gemm_{t}_us']:.1f}" for t in tags) + " | "
            + " | ".join(f"{r[f'w4a4_layer_{t}_us']:.1f}" for t in tags)
            + f" | {r['bf16_us'] / best:.2f}x | {r['fp8_gemm_us'] / best:.2f}x | {r['fp8_layer_us'] / best:.2f}x"
            f" | {r['hq_us'] / r['copy_us']:.2f} | "
            f"{all(r[k] for k in r if k.startswith('exact_')) and r.get('hq_pack_consistent', True)} |")
    out += ["", "## Targets (issue 3)", ""]
    small = [r for r in rows if r["M"] <= 16]
    large = [r for r in rows if r["M"] >= 2048]
    if small:
        sp = [r["bf16_us"] / _best(r) for r in small]
        out.append(f"- W4A4 layer vs bf16 at M <= 16 (target >= 3.0x): min {min(sp):.2f}x, "
                   f"geomean {_gm(sp):.2f}x, max {max(sp):.2f}x over {len(sp)} cases.")
    if large:
        sp = [r["bf16_us"] / _best(r) for r in large]
        f8 = [r["fp8_gemm_us"] / _best(r) for r in large]
        f8l = [r["fp8_layer_us"] / _best(r) for r in large]
        out.append(f"- W4A4 layer vs bf16 at M >= 2048 (target >= 1.5x): min {min(sp):.2f}x, "
                   f"geomean {_gm(sp):.2f}x, max {max(sp):.2f}x.")
        out.append(f"- W4A4 layer vs fp8 GEMM alone at M >= 2048 (target >= 1.1x): min {min(f8):.2f}x, "
                   f"geomean {_gm(f8):.2f}x; vs the fp8 layer (with its activation quantization in PyTorch): "
                   f"min {min(f8l):.2f}x, geomean {_gm(f8l):.2f}x.")
    for had in sorted({r["had_size"] for r in rows}):
        hq = [r["hq_us"] / r["copy_us"] for r in rows if r["had_size"] == had and r["M"] >= 1024]
        if hq:
            out.append(f"- hadamard_quant / copy of the same bytes, M >= 1024, had_size {had} "
                       f"(target <= 1.5): max {max(hq):.2f}, min {min(hq):.2f}.")
    bw = max((r["hq_bytes"] / (r["copy_us"] * 1e-6) / 1e9 for r in rows), default=float("nan"))
    out += ["", "## Ceilings", "",
            f"Copy bandwidth (best of the run, bytes read + written): {bw:.0f} GB/s. Floors per row: weight "
            "bytes at that bandwidth (what bounds every GEMM at small M) and the MMA floor at the H100 SXM "
            f"dense peaks ({PEAK['bf16']:.0f} bf16, {PEAK['int8']:.0f} int8/fp8 TFLOP/s).", "",
            "| shape | M | W4 weight floor | bf16 weight floor | int8/fp8 MMA floor | bf16 MMA floor | "
            "W4A4 GEMM best TOPS | fp8 GEMM TFLOP/s | int8 GEMM TOPS | bf16 TFLOP/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w4 = r["N"] * r["K"] / 2 / (bw * 1e9) * 1e6
        wb = r["N"] * r["K"] * 2 / (bw * 1e9) * 1e6
        flop = 2.0 * r["M"] * r["N"] * r["K"]
        gb = max(r[f"w4a4_gemm_{t}_tflops"] for t in tags)
        i8 = f"{r['int8_gemm_tflops']:.0f}" if "int8_gemm_tflops" in r else "-"
        out.append(f"| {r['shape']} | {r['M']} | {w4:.1f} | {wb:.1f} | {flop / (PEAK['int8'] * 1e6):.1f} | "
                   f"{flop / (PEAK['bf16'] * 1e6):.1f} | {gb:.0f} | {r['fp8_gemm_tflops']:.0f} | {i8} | "
                   f"{r['bf16_tflops']:.0f} |")
    heads = headline(res)
    if heads:
        out += ["", "## Headline (geometric mean over the shapes measured at each M; `int8` layer)", "",
                "| M | vs bf16 | vs fp8 GEMM | vs fp8 layer | shapes |", "|---:|---:|---:|---:|---|"]
        for m, h in heads["per_m"].items():
            out.append(f"| {m} | {h['vs_bf16']:.2f}x | {h['vs_fp8_gemm']:.2f}x | {h['vs_fp8_layer']:.2f}x | "
                       f"{', '.join(h['shapes'])} |")
        if heads.get("hadamard_quant_vs_copy"):
            out += ["", "hadamard_quant time / copy time at M >= 1024 (max over rows), per had_size: "
                    + ", ".join(f"{k}: {v:.2f}" for k, v in heads["hadamard_quant_vs_copy"].items())]
    if res.get("hq_sweep"):
        out += ["", "## hadamard_quant launch sweep (M = 4096, us per call)", "",
                "| K | had_size | warps | programs per SM | us |", "|---:|---:|---:|---:|---:|"]
        for e in res["hq_sweep"]:
            us = f"{e['us']:.1f}" if isinstance(e["us"], (int, float)) else e["us"]
            out.append(f"| {e['K']} | {e['had_size']} | {e['num_warps']} | {e['programs_per_sm']} | {us} |")
    if res.get("tuned_configs"):
        out += ["", "## Autotuned tiles (key: M bucket, N, K/2, act bits)", ""]
        out += [f"- `{k}`: {v}" for k, v in sorted(res["tuned_configs"].items())]
    return "\n".join(out) + "\n"


def merge_runs(paths: list[str]) -> dict:
    """One result from runs made in parts. Every part must come from the same device and
    versions (a merged table compares rows side by side); the parts' commands, dates and
    wall times are kept in ``parts``."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    for key in ("device", "torch", "triton", "timing"):
        seen = {json.dumps(r.get(key), sort_keys=True) for r in runs}
        if len(seen) > 1:
            raise ValueError(f"cannot merge kernel runs with different {key!r}: {sorted(seen)}")
    rows: dict = {}
    for r in runs:
        for row in r["rows"]:
            rows[(row["shape"], row["M"])] = row
    order = {shape[0]: i for i, shape in enumerate(SHAPES)}
    res = dict(runs[-1])
    res["rows"] = sorted(rows.values(), key=lambda row: (order.get(row["shape"], len(order)), row["M"]))
    res["tuned_configs"] = {k: v for r in runs for k, v in (r.get("tuned_configs") or {}).items()}
    res["hq_sweep"] = next((r["hq_sweep"] for r in reversed(runs) if r.get("hq_sweep")), None)
    res["parts"] = [{"file": os.path.basename(p), "command": r.get("command"), "date_utc": r.get("date_utc"),
                     "wall_s": r.get("wall_s")} for p, r in zip(paths, runs)]
    res["command"] = " && ".join(str(r.get("command")) for r in runs)
    res["date_utc"] = runs[-1].get("date_utc")
    res["wall_s"] = sum(r.get("wall_s") or 0.0 for r in runs)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for kernels_<tag>.json and .md")
    p.add_argument("--tag", default="h100")
    p.add_argument("--rep", type=int, default=10, help="graph replays per measurement (median)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining cases after this")
    p.add_argument("--shapes", nargs="*", default=None)
    p.add_argument("--ms", nargs="*", type=int, default=None)
    p.add_argument("--from-json", default=None, help="only rewrite the Markdown from this JSON")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge runs made in parts (one device call each) into kernels_<tag>.json: "
                        "a (shape, M) row of a later file replaces the same row of an earlier one")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU (TRITON_INTERPRET=1)")
    p.add_argument("--hq-sweep", action="store_true", help="also sweep hadamard_quant launch settings")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
    elif args.merge:
        res = merge_runs(args.merge)
        provenance.write_json(os.path.join(args.out, f"kernels_{args.tag}.json"), res)
    else:
        if not torch.cuda.is_available() and not args.smoke:
            print("benchmarks/kernels.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
            return 2
        def dump(r):
            provenance.write_json(os.path.join(args.out, f"kernels_{args.tag}.json"), r)
        res = run(args, dump)
        dump(res)
    provenance.write_text(os.path.join(args.out, f"kernels_{args.tag}.md"), markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
