"""Learned vs random-Hadamard rotation under two RTN weight quantizers (SmolLM2, W4A4KV4).

Whether a rotation learned with one weight fake quant (absmax) keeps its advantage
over its random-Hadamard start when deployed with another (the MSE-clipped RTN):
evaluates both rotations with both weight quantizers on the first ``--windows``
2048-token windows of the held-out text. Reproduce (CPU, minutes):

    python benchmarks/rotation_ablation.py --windows 4 \
        --rotations benchmarks/results/accuracy/2026-11-22_smollm2_rotations_w4a4kv4_learned_rtn.pt \
        --out /tmp/rotation_ablation.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time

import torch

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

from spinquant_kernels import format as fmt
from spinquant_offline import data, evaluate, fake_quant, pipeline, rotation
from spinquant_offline.model import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rotations", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    base, tok = load_model(None, device=args.device)
    ids = data.eval_ids(tok)
    rots = {"hadamard_s0": rotation.init_rotations(base, "hadamard", torch.Generator().manual_seed(0)),
            "learned": pipeline.load_rotations(args.rotations, base)}
    cfg = pipeline.resolve_config(base, fmt.SpinQuantConfig.from_preset("W4A4KV4", rotation="hadamard",
                                                                        weight_method="rtn"))
    out = {"command": " ".join([sys.executable, *sys.argv]), "device": args.device,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
           "windows": args.windows, "seqlen": 2048, "config": cfg.to_dict(), "ppl": {}}
    out["ppl"]["fp16"] = evaluate.perplexity(base, ids, seqlen=2048, max_windows=args.windows)
    print(f"[ablation] fp16: ppl {out['ppl']['fp16']:.2f}", flush=True)
    for rname, (R1, R2s) in rots.items():
        for wq in ("absmax", "mse"):
            t0 = time.time()
            m = copy.deepcopy(base)
            rotation.fuse_norms(m)
            rotation.absorb_rotations(m, R1, R2s, cfg.r4_size)
            fake_quant.install(m, cfg)
            for lin in fake_quant.quant_linears(m).values():
                lin.set_quantized_weight(*fmt.quantize_weight(lin.weight, cfg.weight_bits, mse=(wq == "mse")))
            ppl = evaluate.perplexity(m, ids, seqlen=2048, max_windows=args.windows)
            out["ppl"][f"{rname}/{wq}"] = ppl
            print(f"[ablation] {rname} weights={wq}: ppl {ppl:.2f} ({time.time() - t0:.0f} s)", flush=True)
            del m
    provenance.write_json(args.out, out)


if __name__ == "__main__":
    main()
