"""Served accuracy: a SpinQuant checkpoint through vLLM against its offline fake-quant model.

For one checkpoint written by ``spinquant quantize``:

* offline reference (this process): ``load_checkpoint`` rebuilds the
  fake-quant model; perplexity on the held-out Wikipedia windows (the same
  windows ``spinquant eval`` uses) in float32 and bfloat16, with the
  checkpoint's KV setting and with a 16-bit KV cache; greedy continuations
  of ``--prompts`` held-out prompts.
* each vLLM variant (its own subprocess, one after the other): perplexity
  from vLLM's prompt logprobs over the same windows, and greedy
  continuations of the same prompts. Variants:

  - ``spinquant``: the checkpoint as it asks to be served (its W4A4 linears;
    for a KV4 checkpoint our KV4 attention backend);
  - ``kv16``: ``--kv-cache-dtype bfloat16`` (16-bit cache, same weights);
  - ``int4kv``: vLLM's own ``--kv-cache-dtype int4_per_token_head`` on the
    TRITON_ATTN backend (same weights);
  - any of them with ``+compile`` runs vLLM's defaults (torch.compile and
    CUDA graphs) instead of ``--enforce-eager``.

Agreement of greedy continuations is reported two ways: ``position_match``
(token i of vLLM's continuation equals token i of the offline model's, over
all positions; one early difference makes every later one count as a miss)
and ``teacher_forced`` (the offline model, fed the prompt plus vLLM's own
continuation, predicts vLLM's next token by argmax; one number per position,
independent of earlier differences).

Reproduce on an H100 with vLLM 0.26 and this project installed: first the checkpoint (learned
rotations and GPTQ on the bundled SmolLM2, about 10 minutes), then the comparison:

    spinquant quantize --rotation learned --weights gptq --bits W4A4KV4 --device cuda \
        --out /tmp/ckpt/w4a4kv4
    python benchmarks/served_accuracy.py --ckpt /tmp/ckpt/w4a4kv4 --variants spinquant+compile kv16 int4kv \
        --out benchmarks/results/serving/"$(date -u +%F_%H%M)_smollm2" --tag smollm2_w4a4kv4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

VARIANTS = {
    "spinquant": {},
    "kv16": {"kv_cache_dtype": "bfloat16"},
    "int4kv": {"kv_cache_dtype": "int4_per_token_head", "attention_backend": "TRITON_ATTN"},
}
# the offline twin of each variant's KV cache: "ckpt" = the checkpoint's kv_bits
OFFLINE_KV = {"spinquant": "ckpt", "kv16": 16, "int4kv": None}


def parse_variant(name: str) -> tuple[str, bool]:
    base, _, flag = name.partition("+")
    if base not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)} (optionally +compile), got {name!r}")
    if flag not in ("", "compile"):
        raise ValueError(f"variant modifier must be 'compile', got {flag!r} in {name!r}")
    return base, flag == "compile"


# ----------------------------------------------------------------------------
# metrics (pure; unit-tested on CPU)
# ----------------------------------------------------------------------------
def ppl_from_token_logprobs(per_window: list[list[float]]) -> float:
    """Perplexity from the log-probabilities of every predicted token of every window.

    Each window contributes its tokens 1..T-1 (token 0 has no prediction), as
    ``spinquant_offline.evaluate.perplexity`` counts them.
    """
    n = sum(len(w) for w in per_window)
    if n == 0:
        raise ValueError("no token log-probabilities to average")
    nll = -math.fsum(x for w in per_window for x in w)
    return math.exp(nll / n)


def position_match(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two sets of continuations hold the same token."""
    if len(a) != len(b):
        raise ValueError(f"different numbers of continuations: {len(a)} vs {len(b)}")
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        same += sum(int(x[i] == y[i]) for i in range(n))
        total += max(len(x), len(y))
    return same / total if total else float("nan")


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """For each pair, the index of the first differing token (the length when none differs)."""
    out = []
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        out.append(next((i for i in range(n) if x[i] != y[i]), n))
    return out


# ----------------------------------------------------------------------------
# data: the held-out windows and prompts
# ----------------------------------------------------------------------------
def eval_windows(tokenizer, seqlen: int, max_windows: int | None) -> list[list[int]]:
    from spinquant_offline import data

    ids = data.eval_ids(tokenizer)
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[0, : n * seqlen].reshape(n, seqlen).tolist()


def greedy_prompts(tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    """The first ``prompt_len`` tokens of the first ``n`` held-out articles that are long enough."""
    from spinquant_offline import data

    out = []
    for doc in data.part_documents("wiki", "evaluation"):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_len + 16:
            out.append(ids[:prompt_len])
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} held-out articles have {prompt_len + 16} tokens; asked for {n}")


# ----------------------------------------------------------------------------
# offline reference
# ----------------------------------------------------------------------------
def offline_reference(ckpt: str, windows, prompts, new_tokens: int, device: str, dtypes) -> dict:
    import torch

    from spinquant_offline import evaluate, fake_quant
    from spinquant_offline.checkpoint import load_checkpoint

    res: dict = {"ppl": {}, "greedy": {}, "noise_floor": {}}
    ids = torch.tensor([sum(windows, [])])
    seqlen = len(windows[0])
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model, _, cfg = load_checkpoint(ckpt, dtype=dtype, device=device, load_tokenizer=False)
        kv_settings = [("ckpt", cfg)]
        if cfg.kv_bits < 16:
            kv_settings.append(("16", dataclasses.replace(cfg, kv_bits=16)))
        for kv_name, c in kv_settings:
            fake_quant.install(model, c)
            t0 = time.time()
            with torch.no_grad():
                ppl = evaluate.perplexity(model, ids, seqlen=seqlen, batch_size=4)
            res["ppl"][f"{dtype_name}/kv{kv_name}"] = ppl
            print(f"[served_accuracy] offline {dtype_name} kv{kv_name}: ppl {ppl:.4f} "
                  f"({time.time() - t0:.1f} s)", flush=True)
            if dtype_name in ("float32", "bfloat16"):
                res["greedy"].setdefault(dtype_name, {})[f"kv{kv_name}"] = greedy_generate(model, prompts,
                                                                                          new_tokens)
        fake_quant.install(model, cfg)
        if dtype_name == "bfloat16":
            res["bf16_model"] = model
        if dtype_name == "float32":
            res["model"] = model  # kept for teacher forcing (float32, checkpoint's KV)
            res["cfg"] = cfg
        elif dtype_name != "bfloat16":
            del model
    # The noise floor of the agreement metrics: the same fake-quant model in bfloat16 (the
    # dtype vLLM computes in) against float32. Differences here come from rounding alone.
    if "model" in res and "bf16_model" in res:
        for kv in res["greedy"]["bfloat16"]:
            a, b = res["greedy"]["bfloat16"][kv], res["greedy"]["float32"][kv]
            res["noise_floor"][kv] = {
                "greedy_position_match": position_match(a, b),
                "greedy_first_divergence_mean": sum(first_divergence(a, b)) / len(a),
                "greedy_teacher_forced": teacher_forced(res["model"], prompts, a) if kv == "kvckpt" else None,
            }
    res.pop("bf16_model", None)
    return res


def greedy_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Argmax continuations (no KV cache: the whole sequence each step; prompts of one length)."""
    import torch

    device = next(model.parameters()).device
    x = torch.tensor(prompts, device=device)
    outs = []
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            outs.append(nxt)
            x = torch.cat([x, nxt], dim=1)
    return torch.cat(outs, dim=1).tolist()


def teacher_forced(model, prompts: list[list[int]], conts: list[list[int]]) -> float:
    """Fraction of vLLM's continuation tokens that the offline model predicts by argmax."""
    import torch

    device = next(model.parameters()).device
    hit = total = 0
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            if not c:
                continue
            x = torch.tensor([p + c], device=device)
            pred = model(x, use_cache=False).logits[0, len(p) - 1: len(p) + len(c) - 1].argmax(-1)
            hit += int((pred == torch.tensor(c, device=device)).sum())
            total += len(c)
    return hit / total if total else float("nan")


# ----------------------------------------------------------------------------
# one vLLM variant (run in a subprocess)
# ----------------------------------------------------------------------------
def vllm_worker(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    base, compiled = parse_variant(args.worker)
    with open(args.work_in) as f:
        work = json.load(f)
    windows, prompts = work["windows"], work["prompts"]
    seqlen = len(windows[0])
    t0 = time.time()
    extra = dict(VARIANTS[base])
    if compiled and args.capture_sizes:
        extra["compilation_config"] = {"cudagraph_capture_sizes": args.capture_sizes}
    llm = LLM(model=args.ckpt, max_model_len=max(seqlen, len(prompts[0]) + args.new_tokens) + 8,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              enforce_eager=not compiled, seed=0, dtype="bfloat16", **extra)
    start_s = time.time() - t0
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    per_window = []
    for w, o in zip(windows, outs):
        lps = o.prompt_logprobs
        per_window.append([lps[i][w[i]].logprob for i in range(1, len(w))])
    ppl = ppl_from_token_logprobs(per_window)
    ppl_s = time.time() - t0
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    conts = [list(o.outputs[0].token_ids) for o in outs]
    res = {"variant": args.worker, "engine_args": {**extra, "enforce_eager": not compiled},
           "ppl": ppl, "ppl_s": ppl_s, "start_s": start_s, "greedy_s": time.time() - t0,
           "continuations": conts}
    with open(args.work_out, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint directory written by `spinquant quantize`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="*", default=["spinquant+compile", "kv16", "int4kv"],
                    help="vLLM variants (none: the offline reference and its noise floor only)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=None, help="first N held-out windows (default: all)")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--offline-dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per vLLM variant")
    ap.add_argument("--capture-sizes", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64],
                    help="CUDA-graph batch sizes of the +compile variants (vLLM's default list has 51, "
                         "which takes minutes to capture; none given: vLLM's default)")
    ap.add_argument("--tag", default=None, help="name of the result file: served_accuracy_TAG.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work-in", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return vllm_worker(args)
    for v in args.variants:
        parse_variant(v)
    if "float32" not in args.offline_dtypes:
        raise SystemExit(f"--offline-dtypes must include float32 (the greedy and teacher-forced reference), "
                         f"got {args.offline_dtypes}")

    from transformers import AutoTokenizer

    from spinquant_offline.checkpoint import read_config

    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or os.path.basename(os.path.normpath(args.ckpt))
    out_path = os.path.join(args.out, f"served_accuracy_{tag}.json")
    _, cfg = read_config(args.ckpt)
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    windows = eval_windows(tok, args.seqlen, args.windows)
    prompts = greedy_prompts(tok, args.prompts, args.prompt_len)
    result = {
        **provenance.invocation(args.device),
        "checkpoint": os.path.abspath(args.ckpt), "quantization_config": cfg.to_dict(),
        "eval_text": "held-out Wikipedia articles (every 4th article of exllamav2 wiki.utf8)",
        "windows": len(windows), "seqlen": args.seqlen, "prompts": len(prompts),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
    }

    def save():
        provenance.write_json(out_path, result)

    ref = offline_reference(args.ckpt, windows, prompts, args.new_tokens, args.device, args.offline_dtypes)
    model = ref.pop("model")
    ref.pop("cfg")
    result["offline"] = {"ppl": ref["ppl"], "noise_floor_bf16_vs_fp32": ref["noise_floor"]}
    save()

    work_in = os.path.join(args.out, ".work_in.json")
    with open(work_in, "w") as f:
        json.dump({"windows": windows, "prompts": prompts}, f)
    result["vllm"] = {}
    for v in args.variants:
        base, _ = parse_variant(v)
        work_out = os.path.join(args.out, f".work_{v}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--ckpt", args.ckpt, "--out", args.out,
               "--worker", v, "--work-in", work_in, "--work-out", work_out,
               "--new-tokens", str(args.new_tokens), "--capture-sizes", *map(str, args.capture_sizes),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        t0 = time.time()
        log_path = os.path.join(args.out, f"vllm_{v}.log")
        with open(log_path, "w") as log:
            # its own process group: a timeout must also stop vLLM's engine-core child,
            # which would otherwise keep its GPU memory and starve the next variant
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.timeout_s)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if rc != 0 or not os.path.exists(work_out):
            with open(log_path) as f:
                tail = f.read()[-3000:]
            result["vllm"][v] = {"error": f"exit {rc}", "log_tail": tail}
            print(f"[served_accuracy] {v}: FAILED ({rc}); log tail:\n{tail}", flush=True)
            save()
            continue
        with open(work_out) as f:
            r = json.load(f)
        os.remove(work_out)
        conts = r.pop("continuations")
        rec = dict(r, wall_s=time.time() - t0)
        kv = OFFLINE_KV[base]
        if kv is not None:
            key = "kvckpt" if kv == "ckpt" or cfg.kv_bits == 16 else f"kv{kv}"
            for dt in args.offline_dtypes:
                off = ref["ppl"].get(f"{dt}/{key}")
                if off:
                    rec[f"ppl_rel_diff_vs_offline_{dt}"] = r["ppl"] / off - 1.0
            off_conts = ref["greedy"]["float32"][key]
            rec["greedy_position_match"] = position_match(conts, off_conts)
            rec["greedy_first_divergence_mean"] = sum(first_divergence(conts, off_conts)) / len(conts)
        # the offline model keeps the checkpoint's KV setting for teacher forcing
        rec["greedy_teacher_forced_vs_offline_ckpt_kv"] = teacher_forced(model, prompts, conts)
        rec["continuations_head"] = conts[:3]
        result["vllm"][v] = rec
        print(f"[served_accuracy] {v}: ppl {r['ppl']:.4f} "
              + " ".join(f"{k}={v_:.4f}" for k, v_ in rec.items()
                         if k.startswith(("ppl_rel", "greedy_")) and isinstance(v_, float))
              + f" (start {r['start_s']:.0f} s)", flush=True)
        save()
    os.remove(work_in)
    save()
    print(f"[served_accuracy] wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
