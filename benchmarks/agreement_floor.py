"""How far greedy agreement can go: the same model in bfloat16 against float32.

Greedy continuations of held-out prompts from one model run in float32 and in
bfloat16 (the dtype vLLM computes in), compared as ``served_accuracy.py``
compares vLLM with the offline model: position match, first divergence,
teacher-forced agreement. With ``--ckpt`` the model is a checkpoint's
fake-quant model (``served_accuracy.py --variants`` with no variant records the
same for a checkpoint); without it, the unquantized bundled SmolLM2, the floor
of the floor. Writes ``agreement_floor_TAG.json`` under ``--out``.

Reproduce (CPU or GPU, minutes; ``--ckpt`` as ``served_accuracy.py`` writes one):

    python benchmarks/agreement_floor.py --out /tmp/agreement --prompts 12 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import provenance  # benchmarks/ is on sys.path when this script runs
import served_accuracy as sa


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default=None, help="a SpinQuant checkpoint (default: the unquantized bundled SmolLM2)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if args.ckpt:
        from spinquant_offline.checkpoint import load_checkpoint

        m32, tok, _ = load_checkpoint(args.ckpt, dtype=torch.float32, device=args.device)
        m16, _, _ = load_checkpoint(args.ckpt, dtype=torch.bfloat16, device=args.device, load_tokenizer=False)
        model_name = f"checkpoint {os.path.abspath(args.ckpt)} (fake-quant)"
    else:
        from spinquant_offline.model import load_model

        m32, tok = load_model(None, dtype=torch.float32, device=args.device)
        m16, _ = load_model(None, dtype=torch.bfloat16, device=args.device)
        model_name = "SmolLM2-135M-Instruct, unquantized (Q4_1 GGUF weights, dequantized)"
    prompts = sa.greedy_prompts(tok, args.prompts, args.prompt_len)
    a = sa.greedy_generate(m32, prompts, args.new_tokens)
    b = sa.greedy_generate(m16, prompts, args.new_tokens)
    res = {
        **provenance.invocation(args.device), "model": model_name, "prompts": len(prompts),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "bf16_vs_fp32_position_match": sa.position_match(b, a),
        "bf16_vs_fp32_first_divergence_mean": sum(sa.first_divergence(b, a)) / len(a),
        "teacher_forced_fp32_on_bf16": sa.teacher_forced(m32, prompts, b),
    }
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or ("unquantized" if not args.ckpt else os.path.basename(os.path.normpath(args.ckpt)))
    path = os.path.join(args.out, f"agreement_floor_{tag}.json")
    provenance.write_json(path, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("command", "versions")}))


if __name__ == "__main__":
    main()
