"""Perplexity cost of a block-diagonal R4 (the block sizes tensor parallelism needs).

For each R4 block size, ``spinquant quantize`` writes a checkpoint of the bundled
SmolLM2-135M (intermediate 1536 = 12 x 128; TP 2 / 4 / 8 need blocks that divide
768 / 384 / 192) and ``spinquant eval`` scores its perplexity on the held-out text;
the unquantized model is scored the same way as the reference. Each job is the two
CLI commands, recorded verbatim with its wall time. Writes ``--out`` (JSON) and the
same name with ``.md`` (a table).

Reproduce (CPU, about half an hour on two cores):

    python benchmarks/r4_blocks.py --out benchmarks/results/accuracy/2026-12-05_smollm2_r4_blocks_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

INTERMEDIATE = 1536
BLOCKS = (1536, 768, 384, 192)


def tp_sizes(r4: int) -> list[int]:
    """The tensor-parallel degrees t whose shard (1536 / t columns) holds whole R4 blocks."""
    return [t for t in range(1, INTERMEDIATE // r4 + 1) if (INTERMEDIATE // r4) % t == 0]


def run(cmd: list[str]) -> float:
    """Run one CLI command (output passed through); its wall seconds."""
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return round(time.time() - t0, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON (the table goes beside it as .md)")
    ap.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS), help="R4 block sizes")
    ap.add_argument("--bits", default="W4A4KV4")
    ap.add_argument("--ppl-windows", type=int, default=16, help="2048-token perplexity windows per job")
    ap.add_argument("--learned-steps", type=int, default=0,
                    help="also learn rotations (RTN weights) for each block size with this many Cayley "
                         "SGD steps (0: Hadamard rotations only)")
    ap.add_argument("--learned-calib", type=int, default=8, help="calibration windows when learning")
    ap.add_argument("--learned-seqlen", type=int, default=512, help="calibration window length when learning")
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary folder, removed)")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="spinquant_r4_blocks_")
    doc = {**provenance.invocation("cpu"),
           "model": "SmolLM2-135M-Instruct, the bundled Q4_1 GGUF (its weights sit on a Q4_1 grid)",
           "intermediate_size": INTERMEDIATE,
           "eval": {"ppl_windows": args.ppl_windows, "seqlen": 2048,
                    "text": "held-out Wikipedia articles (spinquant_offline.data.eval_ids)"},
           "jobs": []}

    def save() -> None:
        provenance.write_json(args.out, doc)
        provenance.write_text(os.path.splitext(args.out)[0] + ".md", table(doc))

    ev = ["--ppl-windows", str(args.ppl_windows), "--zeroshot-limit", "0"]
    jobs = [("fp", None)] + [("hadamard", r4) for r4 in args.blocks]
    if args.learned_steps:
        jobs += [("learned", r4) for r4 in args.blocks]
    try:
        for rot, r4 in jobs:
            rec: dict = {"rotation": rot, "r4_size": r4, "commands": []}
            res = os.path.join(work, f"{rot}_{r4}.json")
            if rot == "fp":
                from spinquant_offline.model import default_model_path
                target = default_model_path()
            else:
                target = os.path.join(work, f"{rot}_{r4}")
                q = ["spinquant", "quantize", "--out", target, "--overwrite", "--bits", args.bits,
                     "--rotation", rot, "--weights", "rtn", "--r4-size", str(r4), "--no-progress"]
                if rot == "learned":
                    q += ["--steps", str(args.learned_steps), "--calib-samples", str(args.learned_calib),
                          "--seqlen", str(args.learned_seqlen)]
                rec["commands"].append(" ".join(q))
                rec["quantize_s"] = run(q)
                rec["tp_sizes"] = tp_sizes(r4)
            e = ["spinquant", "eval", target, *ev, "--json", res]
            rec["commands"].append(" ".join(e))
            rec["eval_s"] = run(e)
            with open(res, encoding="utf-8") as f:
                rec["perplexity"] = json.load(f)["perplexity"]["wiki"]
            doc["jobs"].append(rec)
            save()
            if rot != "fp":
                shutil.rmtree(target, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def table(doc: dict) -> str:
    """The jobs as a Markdown table, perplexity relative to the whole-intermediate R4 of each rotation."""
    jobs = doc["jobs"]
    full = {j["rotation"]: j["perplexity"] for j in jobs if j["r4_size"] == INTERMEDIATE}
    lines = [f"# R4 block size vs perplexity: {doc['model']}", "",
             f"{doc['eval']['ppl_windows']} windows of {doc['eval']['seqlen']} tokens, "
             f"{doc['eval']['text']}; device {doc['device']}; torch {doc['versions']['torch']}, "
             f"transformers {doc['versions']['transformers']}; {doc['date']}.", "",
             "| rotation | r4_size | valid TP degrees | perplexity | vs r4 1536 | quantize s | eval s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for j in jobs:
        ref = full.get(j["rotation"])
        rel = "" if ref is None or j["r4_size"] is None else f"{100 * (j['perplexity'] / ref - 1):+.2f}%"
        tps = ", ".join(map(str, j.get("tp_sizes", []))) or "-"
        lines.append(f"| {j['rotation']} | {j['r4_size'] or '-'} | {tps} | {j['perplexity']:.3f} | {rel} | "
                     f"{j.get('quantize_s', '-')} | {j['eval_s']} |")
    lines += ["", "Commands (in order):", ""]
    lines += [f"    {c}" for j in jobs for c in j["commands"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
