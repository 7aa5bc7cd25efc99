"""KV4 attention over the 4-bit cache, the path the vLLM plugin runs, against vLLM's baselines.

    python benchmarks/kv_attention.py [--out benchmarks/results] [--quick]
        [--sections decode bigdecode write prefill mixed] [--mixed-set one|serving] [--tag SUFFIX]

On an H100 with vLLM installed (repo root, ``pip install -e .`` done):
``python benchmarks/kv_attention.py`` times every section but ``bigdecode``;
``python benchmarks/kv_attention.py --quick --sections prefill mixed bigdecode`` times the
serving-shaped cases (Llama-3-8B heads) that docs/KV_CACHE.md quotes.

Every section times our kernels exactly as ``spinquant_vllm.attention.SpinQuantKV4Impl``
calls them (default tiles) next to vLLM 0.26's own kernels on the same random data:

* ``decode`` (batch 1 / 32, context 1k / 4k / 16k; Llama-3-8B heads 32 q / 8 kv x 128 and
  SmolLM2-135M heads 9 / 3 x 64) and ``bigdecode`` (256 and 440 sequences x 4608 tokens, where
  KV capacity binds): ``kv4_decode_attention`` against vLLM's FlashAttention over a bf16 paged
  cache of the same K/V and pages (what vLLM runs for a 16-bit cache), vLLM's
  ``int4_per_token_head`` (TRITON_ATTN's unified attention) and torch's sdpa on contiguous
  bf16 K/V; attention-output SQNR against fp32 attention on the unquantized K/V. For the
  Llama shape (not with ``--quick``) and in ``bigdecode`` a sweep of the decode kernel's tile
  overrides (splits x key tile x warps) shows how far the defaults are from the best.
* ``write``: the fused R3 + int4 + paged store against a bf16 ``index_put``.
* ``prefill``: a fresh 4096-token prompt through ``kv4_mixed_attention_flash`` (K/V read
  back from the 4-bit cache, then vLLM's FlashAttention) against that flash kernel alone on
  bf16 K/V and torch's sdpa causal.
* ``mixed``: one chunked-prefill step (decodes next to prefill chunks with and without cached
  context) through ``kv4_mixed_attention_flash``, the decode rows alone, and vLLM's
  FlashAttention over contiguous bf16 K/V of the same batch.

Times are GPU time per call from CUDA-graph replays with the L2 flushed before each call
(``_bench``); bytes moved and the bandwidth floor (3.0 TB/s, the measured H100 device copy
rate, DESIGN.md) beside them. Results: ``kv_attention_<gpu><tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton

import provenance  # benchmarks/provenance.py (this script's folder is on sys.path)

from spinquant_kernels import attention as at
from spinquant_kernels import kv_cache as kc

COPY_TBPS = 3.0  # measured device-to-device copy rate on this H100 (DESIGN.md)
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
BLOCK = 16


_FLUSH = {}


def _bench(fn, reps: int = 20) -> float:
    """Median GPU ms of ``fn`` with a cold L2, launch overhead excluded.

    Two CUDA graphs of ``reps`` iterations, one ``[flush L2, fn]`` and one
    ``[flush L2]``; the difference of their median replay times over ``reps``.
    (Eager timing would add the Python launch overhead of every call, which is
    larger than a decode kernel; vLLM replays decode steps as CUDA graphs.)
    Falls back to ``triton.testing.do_bench`` if ``fn`` cannot be captured.
    """
    fn()
    torch.cuda.synchronize()
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        _FLUSH[dev] = torch.empty(64 * 2 ** 20, dtype=torch.int32, device="cuda")  # 256 MB
    buf = _FLUSH[dev]
    try:
        graphs = []
        for with_fn in (True, False):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    buf.zero_()
                    if with_fn:
                        fn()
            graphs.append(g)
    except RuntimeError as e:
        print(f"graph capture failed ({e}); timing eagerly", file=sys.stderr)
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    times = ([], [])
    for _ in range(7):
        for i, g in enumerate(graphs):
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.record()
            g.replay()
            en.record()
            torch.cuda.synchronize()
            times[i].append(st.elapsed_time(en))
    med = [sorted(t)[len(t) // 2] for t in times]
    return max(0.0, (med[0] - med[1]) / reps)


def _sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return 10 * math.log10(float((ref ** 2).sum() / ((ref - x) ** 2).sum().clamp_min(1e-30)))


def _make(B, L, Hq, Hkv, D, gen, dev):
    """Random bf16 q/K/V (two outlier key channels, as real keys have), a shuffled paged layout."""
    nblk = -(-L // BLOCK)
    perm = torch.randperm(B * nblk, generator=gen, device=dev)
    block_table = perm.reshape(B, nblk).to(torch.int32)
    k = torch.randn(B, L, Hkv, D, generator=gen, device=dev, dtype=torch.bfloat16)
    k[..., 5] *= 8.0
    k[..., 17] *= -6.0
    v = torch.randn(B, L, Hkv, D, generator=gen, device=dev, dtype=torch.bfloat16)
    q = torch.randn(B, Hq, D, generator=gen, device=dev, dtype=torch.bfloat16)
    pos = torch.arange(L, device=dev)
    slots = (block_table.long()[:, pos // BLOCK] * BLOCK + pos % BLOCK).reshape(-1)
    return q, k, v, block_table, slots


def _exact_fp32(q, k, v):
    """fp32 attention of one decode token on the unquantized K/V: (B, Hq, D)."""
    B, Hq, D = q.shape
    Hkv = k.shape[2]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, D)
    return F.scaled_dot_product_attention(
        qf, k.float().transpose(1, 2), v.float().transpose(1, 2),
        scale=1 / math.sqrt(D)).reshape(B, Hq, D)


def _bf16_flash(q, kt, vt):
    """One decode token per sequence, GQA group folded into the query length."""
    B, Hq, D = q.shape
    Hkv = kt.shape[1]
    qf = q.reshape(B, Hkv, Hq // Hkv, D)
    return lambda: F.scaled_dot_product_attention(qf, kt, vt, scale=1 / math.sqrt(D))


# ----------------------------------------------------------------------------
# vLLM's int4_per_token_head (only when vLLM imports, i.e. on the lead's machine)
# ----------------------------------------------------------------------------
def _vllm_int4_runner(q, k, v, block_table, slots, L):
    """Build vLLM's int4 cache for the same K/V and return (run, out) or raise ImportError."""
    from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
        triton_reshape_and_cache_flash_per_token_head_quant,
    )
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    B, Hq, D = q.shape
    Hkv = k.shape[2]
    nb = block_table.numel()
    dev = q.device
    padded = D // 2 + 4
    # TRITON_ATTN's int4 layout: logical (blocks, kv_heads, block, 2*(D/2 + 4)) bytes,
    # NHD physically; K/V views and float32 scale views carved as _ensure_scale_caches does
    raw = torch.zeros(nb, BLOCK, Hkv, 2 * padded, dtype=torch.uint8, device=dev)
    kv = raw.permute(0, 2, 1, 3)
    key_cache, value_cache = kv.transpose(1, 2).split(padded, dim=-1)
    base = torch.tensor([], dtype=torch.float32, device=dev).set_(raw.untyped_storage())
    st = [s // 4 for s in kv.stride()]
    k_scale = torch.as_strided(base, (nb, BLOCK, Hkv), (st[0], st[2], st[1]), D // 8)
    v_scale = torch.as_strided(base, (nb, BLOCK, Hkv), (st[0], st[2], st[1]),
                               (padded + D // 2) // 4)
    triton_reshape_and_cache_flash_per_token_head_quant(
        k.reshape(-1, Hkv, D), v.reshape(-1, Hkv, D), key_cache, value_cache, k_scale, v_scale,
        slots, kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD)
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    thr = max(1, 128 // Hkv)  # TritonAttentionMetadataBuilder.seq_threshold_3D
    segs = 16
    so = torch.empty(thr, Hq, segs, triton.next_power_of_2(D), dtype=torch.float32, device=dev)
    sm = torch.empty(thr, Hq, segs, dtype=torch.float32, device=dev)
    se = torch.empty(thr, Hq, segs, dtype=torch.float32, device=dev)

    def run():
        unified_attention(
            q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=1,
            seqused_k=seq_lens, max_seqlen_k=L, softmax_scale=1 / math.sqrt(D), causal=True,
            alibi_slopes=None, use_alibi_sqrt=False, window_size=(-1, -1),
            block_table=block_table, softcap=0, q_descale=None, k_descale=None, v_descale=None,
            seq_threshold_3D=thr, num_par_softmax_segments=segs, softmax_segm_output=so,
            softmax_segm_max=sm, softmax_segm_expsum=se, sinks=None, output_scale=None,
            kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD, k_scale_cache=k_scale,
            v_scale_cache=v_scale)
        return out

    return run, out


# ----------------------------------------------------------------------------
# the runs
# ----------------------------------------------------------------------------
def _vllm_fa_paged(q, k, v, block_table, L):
    """vLLM's FlashAttention decode over a bf16 paged cache of the same K/V and pages (what
    vLLM's FLASH_ATTN backend runs for a 16-bit cache): (run, out); ImportError without vLLM."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    ver = get_flash_attn_version()
    if ver is None:
        raise ImportError("vLLM FlashAttention not usable here")
    B, _, Hkv, D = k.shape
    nb = int(block_table.max()) + 1
    kc_ = torch.zeros(nb, BLOCK, Hkv, D, dtype=k.dtype, device=k.device)
    vc_ = torch.zeros_like(kc_)
    pos = torch.arange(L, device=k.device)
    pages = block_table.long()[:, pos // BLOCK]
    kc_[pages, pos % BLOCK] = k
    vc_[pages, pos % BLOCK] = v
    cu = torch.arange(B + 1, dtype=torch.int32, device=k.device)
    sl = torch.full((B,), L, dtype=torch.int32, device=k.device)
    out = torch.empty_like(q)

    def run():
        flash_attn_varlen_func(q, kc_, vc_, 1, cu, L, seqused_k=sl, block_table=block_table,
                               softmax_scale=1 / math.sqrt(D), causal=True, out=out,
                               fa_version=ver)
    return run, out


# (batch, context) of the decode steps where KV capacity binds: a 4096-in / 512-out run holds
# ~440 sequences of ~4.6k tokens in the 4-bit cache (vLLM's max_num_seqs is 1024 on an H100)
BIG_DECODE = ((256, 4608), (440, 4608))
# tile overrides of kv4_decode_attention the sweep times (num_splits None: the default count)
DECODE_SWEEP = [dict(num_splits=sp, tile_n=tn, num_warps=w)
                for sp in (None, 1, 2, 4, 8, 32) for tn in (64, 128, 256) for w in (4, 8)]


def _sweep(run, grid) -> list:
    """Time ``run(**kw)`` for every ``kw`` of ``grid``; a setting that fails to compile (e.g. out
    of shared memory or registers) is recorded with its error, not fatal."""
    out = []
    for kw in grid:
        try:
            out.append(dict(kw, ms=_bench(run(**kw))))
        except (RuntimeError, ValueError) as e:
            out.append(dict(kw, ms=float("nan"), error=f"{type(e).__name__}: {str(e)[:200]}"))
    return out


def decode_case(name, B, L, gen, dev, sweep: bool) -> dict:
    """One decode step of ``B`` sequences at context ``L``; ``sweep``: also time DECODE_SWEEP."""
    Hq, Hkv, D = SHAPES[name]
    q, k, v, bt, slots = _make(B, L, Hq, Hkv, D, gen, dev)
    nb = bt.numel()
    cache = kc.allocate_kv4_cache(nb, BLOCK, Hkv, D, dev)
    kc.kv4_cache_write(k.reshape(-1, Hkv, D), v.reshape(-1, Hkv, D), cache, slots,
                       hadamard=kc.hadamard_halves(D, D, torch.bfloat16, dev))
    had = kc.hadamard_perm(D, D, torch.bfloat16, dev)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
    sm_scale = 1 / math.sqrt(D)
    out = torch.empty_like(q)
    # the fp32 reference of a capacity-bound step would need ~35 GB: skipped there
    exact = _exact_fp32(q, k, v) if B * L <= 32 * 16384 else None

    def ours(**kw):
        return lambda: at.kv4_decode_attention(q, cache, bt, seq_lens, cu, sm_scale, out=out,
                                               hadamard=had, **kw)

    res = {"model": name, "batch": B, "context": L, "num_heads": Hq, "num_kv_heads": Hkv,
           "head_dim": D, "default_num_splits": at.default_num_splits(B, Hkv)}
    res["ours_ms"] = _bench(ours())
    ours()()
    if exact is not None:
        res["ours_sqnr_db"] = _sqnr_db(exact, out.float())
    res["ours_bytes"] = B * L * Hkv * 2 * kc.kv4_head_bytes(D)
    kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    res["bf16_flash_ms"] = _bench(_bf16_flash(q, kt, vt))
    res["bf16_bytes"] = B * L * Hkv * 2 * D * 2
    del kt, vt
    for key in ("ours", "bf16"):
        t = res[f"{key}_ms" if key == "ours" else "bf16_flash_ms"] * 1e-3
        res[f"{key}_tbps"] = res[f"{key}_bytes"] / t / 1e12
        res[f"{key}_floor_ms"] = res[f"{key}_bytes"] / (COPY_TBPS * 1e12) * 1e3
    try:
        run, fout = _vllm_fa_paged(q, k, v, bt, L)
        res["vllm_fa_paged_bf16_ms"] = _bench(run)
        res["vllm_fa_paged_bf16_tbps"] = res["bf16_bytes"] / res["vllm_fa_paged_bf16_ms"] / 1e9
        del run, fout
    except ImportError as e:
        res["vllm_fa_paged_bf16"] = f"not importable: {e}"
    except (RuntimeError, TypeError, ValueError) as e:
        res["vllm_fa_paged_bf16"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    if sweep:
        grid = _sweep(ours, DECODE_SWEEP)
        ok = [x for x in grid if x["ms"] == x["ms"]]
        res["ours_sweep_best"] = min(ok, key=lambda r: r["ms"]) if ok else None
        res["ours_sweep"] = grid
    try:
        run, vout = _vllm_int4_runner(q, k, v, bt, slots, L)
        res["vllm_int4_ms"] = _bench(run)
        run()
        if exact is not None:
            res["vllm_int4_sqnr_db"] = _sqnr_db(exact, vout.float())
    except ImportError as e:
        res["vllm_int4"] = f"not importable: {e}"
    except (RuntimeError, TypeError, ValueError, AttributeError, AssertionError) as e:
        # keep the other numbers of the run; the message says what broke
        res["vllm_int4"] = f"failed: {type(e).__name__}: {e}"
    return res


def write_case(name, T, gen, dev) -> dict:
    Hq, Hkv, D = SHAPES[name]
    k = torch.randn(T, Hkv, D, generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, Hkv, D, generator=gen, device=dev, dtype=torch.bfloat16)
    nb = -(-T // BLOCK) + 1
    slots = torch.randperm(nb * BLOCK, generator=gen, device=dev)[:T]
    cache = kc.allocate_kv4_cache(nb, BLOCK, Hkv, D, dev)
    had = kc.hadamard_halves(D, D, torch.bfloat16, dev)
    bf = torch.zeros(nb * BLOCK, 2, Hkv, D, dtype=torch.bfloat16, device=dev)

    def bf16_write():
        bf[slots, 0] = k
        bf[slots, 1] = v

    return {"model": name, "tokens": T,
            "ours_write_ms": _bench(lambda: kc.kv4_cache_write(k, v, cache, slots, hadamard=had)),
            "bf16_index_put_ms": _bench(bf16_write)}


def _flash_varlen(dev):
    """(varlen, name) for kv4_mixed_attention_flash: the plugin's choice (vLLM's FlashAttention,
    FA3 on Hopper) when vLLM imports, else torch's varlen_attn; the plain-PyTorch stand-in on
    the CPU (the tests' toy runs)."""
    if torch.device(dev).type != "cuda":
        return at.varlen_causal_ref, "plain PyTorch (CPU)"
    try:
        from spinquant_vllm.attention import flash_varlen
        return flash_varlen()
    except ImportError:
        return at.torch_varlen_causal, "torch varlen_attn"


def _vllm_fa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, out):
    """vLLM's FlashAttention over contiguous varlen bf16 K/V (GQA read natively, causal aligned
    to the last key, as for a 16-bit cache): a callable; ImportError without vLLM's build."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    ver = get_flash_attn_version()
    if ver is None:
        raise ImportError("vLLM FlashAttention not usable here")
    return lambda: flash_attn_varlen_func(q, k, v, max_q, cu_q, max_k, cu_seqlens_k=cu_k,
                                          softmax_scale=scale, causal=True, out=out,
                                          fa_version=ver)


def prefill_case(name, L, gen, dev) -> dict:
    """A fresh ``L``-token prompt: the plugin's path against the flash kernel on bf16 K/V."""
    Hq, Hkv, D = SHAPES[name]
    q, k, v, bt, slots = _make(1, L, Hq, Hkv, D, gen, dev)
    cache = kc.allocate_kv4_cache(bt.numel(), BLOCK, Hkv, D, dev)
    kc.kv4_cache_write(k.reshape(-1, Hkv, D), v.reshape(-1, Hkv, D), cache, slots,
                       hadamard=kc.hadamard_halves(D, D, torch.bfloat16, dev))
    had = kc.hadamard_perm(D, D, torch.bfloat16, dev)
    hf = kc.hadamard_full(D, D, torch.bfloat16, dev)
    qs = torch.randn(L, Hq, D, generator=gen, device=dev, dtype=torch.bfloat16)
    sl = torch.tensor([L], dtype=torch.int32, device=dev)
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    out = torch.empty_like(qs)
    sc = 1 / math.sqrt(D)
    varlen, vname = _flash_varlen(dev)
    res = {"model": name, "prompt": L, "flash_varlen": vname}
    res["ours_ms"] = _bench(lambda: at.kv4_mixed_attention_flash(
        qs, cache, bt, sl, cu, sc, L, out=out, hadamard_perm=had, hadamard_full=hf,
        varlen=varlen))
    # what a 16-bit cache's prefill costs: the same flash kernel on bf16 K/V
    res["flash_bf16_ms"] = _bench(lambda: varlen(qs, k[0], v[0], cu, L, sc, out))
    qt = qs.transpose(0, 1)[None]
    kt = k[0].transpose(0, 1)[None].repeat_interleave(Hq // Hkv, 1)
    vt = v[0].transpose(0, 1)[None].repeat_interleave(Hq // Hkv, 1)
    res["bf16_sdpa_causal_ms"] = _bench(lambda: F.scaled_dot_product_attention(
        qt, kt, vt, is_causal=True, scale=sc))
    return res


MIXED_SETS = {
    "one": [{}],
    "serving": [{}, {"decodes": 480, "ctx": 4352, "chunks": ((8192, 0), (8192, 0))},
                {"decodes": 480, "ctx": 2048, "chunks": ((4096, 0),) * 4},
                {"decodes": 32, "ctx": 4352, "chunks": ((4096, 0),) * 4},
                {"decodes": 480, "ctx": 4352, "chunks": ((512, 3584),)}],
}


def mixed_case(name, gen, dev, decodes: int = 256, ctx: int = 4352,
               chunks=((4096, 0), (4096, 0), (4096, 0), (3000, 1096))) -> dict:
    """A chunked-prefill step as vLLM schedules it in the 4096-in / 512-out run: ``decodes``
    one-row sequences at ``ctx`` context next to prefill chunks ``(new tokens, cached
    context)`` (~16k tokens, vLLM's offline batch budget). Times the plugin's path
    (``kv4_mixed_attention_flash``), the decode rows alone, and vLLM's FlashAttention over
    contiguous bf16 K/V of the same batch (a 16-bit cache's step, without its paging)."""
    Hq, Hkv, D = SHAPES[name]
    q_lens = [1] * decodes + [n for n, _ in chunks]
    seq_lens = [ctx] * decodes + [n + c for n, c in chunks]
    S, T = len(q_lens), sum(q_lens)
    nblk = [-(-L // BLOCK) for L in seq_lens]
    perm = torch.randperm(sum(nblk), generator=gen, device=dev).to(torch.int32)
    bt = torch.zeros(S, max(nblk), dtype=torch.int32, device=dev)
    o = 0
    for i, n in enumerate(nblk):
        bt[i, :n] = perm[o:o + n]
        o += n
    cache = kc.allocate_kv4_cache(sum(nblk), BLOCK, Hkv, D, dev)
    hh = kc.hadamard_halves(D, D, torch.bfloat16, dev)
    kv_lens = torch.tensor(seq_lens, device=dev)
    for i, L in enumerate(seq_lens):   # K/V per sequence: the whole batch at once is ~5 GB
        k = torch.randn(L, Hkv, D, generator=gen, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(L, device=dev)
        slots = bt[i].long()[pos // BLOCK] * BLOCK + pos % BLOCK
        kc.kv4_cache_write(k, torch.randn_like(k), cache, slots, hadamard=hh)
    had = kc.hadamard_perm(D, D, torch.bfloat16, dev)
    hf = kc.hadamard_full(D, D, torch.bfloat16, dev)
    q = torch.randn(T, Hq, D, generator=gen, device=dev, dtype=torch.bfloat16)
    sl = kv_lens.to(torch.int32)
    cu = torch.zeros(S + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.tensor(q_lens, device=dev).cumsum(0)
    out = torch.empty_like(q)
    sc, mq = 1 / math.sqrt(D), max(q_lens)
    varlen, vname = _flash_varlen(dev)
    res = {"model": name, "decodes": decodes, "decode_context": ctx,
           "chunks": [list(c) for c in chunks], "tokens": T, "flash_varlen": vname}
    res["ours_ms"] = _bench(lambda: at.kv4_mixed_attention_flash(
        q, cache, bt, sl, cu, sc, mq, out=out, hadamard_perm=had, hadamard_full=hf,
        varlen=varlen))
    res["decode_rows_only_ms"] = _bench(lambda: at.kv4_decode_attention(
        q, cache, bt, sl, cu, sc, out=out, hadamard=had, single_rows_only=True, num_splits=1))
    tot = int(kv_lens.sum())
    try:
        kb = torch.randn(tot, Hkv, D, generator=gen, device=dev, dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        cuk = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        cuk[1:] = kv_lens.cumsum(0)
        res["vllm_fa_bf16_ms"] = _bench(_vllm_fa_varlen(q, kb, vb, cu, cuk, mq, max(seq_lens),
                                                        sc, out))
        del kb, vb
    except ImportError as e:
        res["vllm_fa_bf16"] = f"not importable: {e}"
    except (RuntimeError, TypeError, ValueError) as e:
        res["vllm_fa_bf16"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return res


def _ms(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def _markdown(r: dict) -> str:
    lines = [f"# KV4 attention over the 4-bit cache ({r['device']})", "",
             f"torch {r['torch']}, triton {r['triton']}, vLLM {r['vllm']}. "
             "GPU ms per call: median over CUDA-graph replays with a cold L2 (launch overhead "
             "excluded). Floor = bytes / 3.0 TB/s.", "",
             "## Decode", "",
             "| model | batch | context | ours ms | ours floor | ours TB/s | vLLM FA paged bf16 ms "
             "| vLLM int4 ms | sdpa bf16 ms | bf16 floor | SQNR ours dB | SQNR vLLM int4 dB | "
             "sweep best ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in r["decode"]:
        sq, vq = d.get("ours_sqnr_db"), d.get("vllm_int4_sqnr_db")
        best = (d.get("ours_sweep_best") or {}).get("ms")
        lines.append(
            f"| {d['model']} | {d['batch']} | {d['context']} | {d['ours_ms']:.4f} | "
            f"{d['ours_floor_ms']:.4f} | {d['ours_tbps']:.2f} | "
            f"{_ms(d.get('vllm_fa_paged_bf16_ms'))} | {_ms(d.get('vllm_int4_ms'))} | "
            f"{d['bf16_flash_ms']:.4f} | {d['bf16_floor_ms']:.4f} | "
            f"{'-' if sq is None else f'{sq:.1f}'} | {'-' if vq is None else f'{vq:.1f}'} | "
            f"{_ms(best)} |")
    for d in r["decode"]:
        if not d.get("ours_sweep"):
            continue
        lines += ["", f"### Decode tile sweep, {d['model']}, batch {d['batch']} x context "
                  f"{d['context']} (ms; default {d['ours_ms']:.3f})", "",
                  "| splits | tile_n | warps | ms |", "|---|---|---|---|"]
        lines += [f"| {x['num_splits'] or 'default'} | {x['tile_n']} | {x['num_warps']} | "
                  f"{_ms(x['ms'])} |" for x in sorted(d["ours_sweep"], key=lambda x: (
                      x["ms"] != x["ms"], x["ms"]))]
    lines += ["", "## Cache write (fused R3 + int4 + paged store) vs a bf16 index_put", "",
              "| model | tokens | ours ms | bf16 index_put ms |", "|---|---|---|---|"]
    for w in r["write"]:
        lines.append(f"| {w['model']} | {w['tokens']} | {w['ours_write_ms']:.4f} | "
                     f"{w['bf16_index_put_ms']:.4f} |")
    lines += ["", "## Prefill of a fresh prompt", "",
              "| model | prompt | flash kernel | ours ms (read back + flash) | "
              "flash on bf16 K/V ms | sdpa bf16 causal ms |", "|---|---|---|---|---|---|"]
    for p in r["prefill"]:
        lines.append(f"| {p['model']} | {p['prompt']} | {p['flash_varlen']} | "
                     f"{p['ours_ms']:.3f} | {p['flash_bf16_ms']:.3f} | "
                     f"{p['bf16_sdpa_causal_ms']:.3f} |")
    lines += ["", "## Mixed batch (decodes + prefill chunks, one chunked-prefill step)", "",
              "| model | decodes x context | chunks (new, cached) | ours ms | decode rows alone ms "
              "| vLLM FA bf16 ms |", "|---|---|---|---|---|---|"]
    for m in r["mixed"]:
        lines.append(
            f"| {m['model']} | {m['decodes']} x {m['decode_context']} | "
            f"{', '.join(f'({a}, {b})' for a, b in m['chunks'])} | {m['ours_ms']:.3f} | "
            f"{m['decode_rows_only_ms']:.3f} | {_ms(m.get('vllm_fa_bf16_ms'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B shape only, no sweep")
    ap.add_argument("--sections", nargs="+", default=["decode", "write", "prefill", "mixed"],
                    choices=["decode", "write", "prefill", "mixed", "bigdecode"],
                    help="which parts to time (default: all but bigdecode)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--mixed-set", default="one", choices=sorted(MIXED_SETS),
                    help="mixed-batch steps to time: 'one' (the default step) or 'serving' "
                    "(steps shaped like the 4096-in run's: more decodes, bigger chunks)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kv_attention benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    try:
        import vllm
        vllm_ver = vllm.__version__
    except ImportError:
        vllm_ver = "not installed"
    r = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
         "triton": triton.__version__, "vllm": vllm_ver, "python": platform.python_version(),
         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "sections": args.sections, "decode": [], "write": [], "prefill": [], "mixed": []}
    models = ["llama3-8b"] if args.quick else list(SHAPES)
    os.makedirs(args.out, exist_ok=True)
    tag = r["device"].replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"kv_attention_{tag}{args.tag}")

    def save():  # after every case, so a run cut short keeps what it measured
        provenance.write_json(path + ".json", r)
        provenance.write_text(path + ".md", _markdown(r))

    sec = set(args.sections)
    for name in models:
        if "prefill" in sec:
            r["prefill"].append(prefill_case(name, 4096, gen, dev))
            print(json.dumps(r["prefill"][-1]), flush=True)
            save()
        for spec in (MIXED_SETS[args.mixed_set] if "mixed" in sec and name == "llama3-8b" else ()):
            r["mixed"].append(mixed_case(name, gen, dev, **spec))
            print(json.dumps(r["mixed"][-1]), flush=True)
            save()
            torch.cuda.empty_cache()
        for B in ((1, 32) if "decode" in sec else ()):
            for L in (1024, 4096, 16384):
                d = decode_case(name, B, L, gen, dev,
                                sweep=not args.quick and name == "llama3-8b")
                print(json.dumps({k: v for k, v in d.items() if k != "ours_sweep"}), flush=True)
                r["decode"].append(d)
                save()
                torch.cuda.empty_cache()
        for B, L in (BIG_DECODE if "bigdecode" in sec and name == "llama3-8b" else ()):
            d = decode_case(name, B, L, gen, dev, sweep=True)
            print(json.dumps({k: v for k, v in d.items() if k != "ours_sweep"}), flush=True)
            r["decode"].append(d)
            save()
            torch.cuda.empty_cache()
        for T in ((32, 8192) if "write" in sec else ()):
            r["write"].append(write_case(name, T, gen, dev))
            print(json.dumps(r["write"][-1]), flush=True)
        save()
    print(_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
