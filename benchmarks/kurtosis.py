"""Per-layer activation kurtosis of SmolLM2-135M before and after rotation.

Inputs of each linear type (qkv, o, gate/up, down after its online Hadamard) on
one 2048-token window of the held-out Wikipedia text, with quantization off:
no rotation, a random Hadamard (seed 0) and, with ``--rotations``, learned
rotations saved by the pipeline or ``benchmarks/accuracy.py``.
Writes ``kurtosis.json`` and ``kurtosis.png`` (no rotation vs the last
rotation given) under ``--out``.

Reproduce (CPU or GPU, a minute) with the learned rotations committed beside the results
(``accuracy.py`` writes them, seed 0):

    python benchmarks/kurtosis.py --out /tmp/kurtosis \
        --rotations benchmarks/results/accuracy/2026-11-22_smollm2_rotations_w4a4kv4_learned_rtn.pt
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

from spinquant_kernels import format as fmt
from spinquant_offline import data, evaluate, fake_quant, pipeline, rotation
from spinquant_offline.model import load_model


def rotated_view(base, R1, R2s, r4_size):
    """A 16-bit copy of ``base`` with the rotations absorbed and R4 online."""
    m = copy.deepcopy(base)
    rotation.fuse_norms(m)
    if R1 is not None:
        rotation.absorb_rotations(m, R1, R2s, r4_size)
    if R1 is None:
        return fake_quant.install(m, fmt.SpinQuantConfig(act_bits=16, kv_bits=16, rotation="none"))
    return fake_quant.install(m, fmt.SpinQuantConfig(act_bits=16, kv_bits=16, r4_size=r4_size))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rotations", nargs="*", default=[], help="rotation files (pipeline.save_rotations)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args(argv)
    base, tok = load_model(None, device=args.device)
    ids = data.eval_ids(tok)
    r4 = base.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    views = {"none": (None, None)}
    views["hadamard_s0"] = rotation.init_rotations(base, "hadamard", g)
    for path in args.rotations:
        views[os.path.splitext(os.path.basename(path))[0]] = pipeline.load_rotations(path, base)
    kurt = {}
    for name, (R1, R2s) in views.items():
        kurt[name] = evaluate.kurtosis(rotated_view(base, R1, R2s, r4), ids, seqlen=args.seqlen)
        print(f"[kurtosis] {name}: " + ", ".join(f"{k} max {max(v):.1f}" for k, v in kurt[name].items()),
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    last = list(views)[-1]
    evaluate.kurtosis_plot(kurt["none"], kurt[last], os.path.join(args.out, "kurtosis.png"),
                           labels=("no rotation", last),
                           title="SmolLM2-135M: per-layer kurtosis of linear inputs (held-out Wikipedia)")
    provenance.write_json(os.path.join(args.out, "kurtosis.json"),
                          {"command": " ".join([sys.executable, *sys.argv]), "device": args.device,
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           "torch": torch.__version__, "kurtosis": kurt})


if __name__ == "__main__":
    main()
