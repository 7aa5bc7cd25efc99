"""Attention over the 4-bit paged KV cache (the ``spinquant_kernels.kv_cache`` layout).

Two Triton kernels, both causal with GQA, dequantizing in registers:

* :func:`kv4_decode_attention`: one query token per sequence (the last
  position), split over the context (flash-decoding) plus a small reduce.
* :func:`kv4_prefill_attention`: varlen queries that are the last ``q_len``
  positions of each sequence (a chunk with cached context); the new tokens'
  K/V must already be in the cache.

:func:`kv4_mixed_attention_flash` answers a batch with prefill rows (vLLM's
chunked prefill): sequences with no cached context through a varlen flash
kernel over their K/V read back from the cache (vLLM's FlashAttention in the
plugin), one-row sequences through the decode kernel, chunks with cached
context through the prefill kernel, each skipping the others' sequences on the
device. Pure decode batches go to :func:`kv4_decode_attention` alone.

Both kernels apply the query half of R3: the wrapper multiplies q by the +-1
matrix (one small GEMM, columns ordered even-then-odd) and the kernel folds
``1 / sqrt(n)`` into the softmax scale; the keys were rotated by the same
Hadamard when written, so ``q k^T`` is unchanged. The cache holds codes ``c``
with ``k = s * (c - z)``. The kernels feed ``c - qmin + 128`` to the tensor
cores as bf16 bit patterns (the code OR-ed into the mantissa of bf16 128.0:
exact, no int -> float conversion), remove ``z - qmin + 128`` with one
correction per score (K) and per output row (V), and apply ``s`` per key column
to the scores (K) or to the probabilities (V). Packed bytes hold even and odd
elements, so Q and the output are handled as even/odd halves (two products
each) instead of interleaving nibbles.

``_ref`` twins (same signatures) dequantize the cache with
``kv_cache.kv4_cache_gather_ref`` and run ``scaled_dot_product_attention`` in
float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import format as fmt
from ._common import DEFAULT_SMS, sm_count
from .hadamard import hadamard_transform_ref
from .kv_cache import (
    _CODE_BITS,
    _CODE_MASK,
    _SCALE_MASK,
    _SIGN_FLIP,
    _resolve_had_size,
    _words,
    check_kv4_cache,
    dot_dtype,
    had_norm,
    hadamard_full as _hadamard_full,
    hadamard_perm as _hadamard_perm,
    kv4_cache_dequant,
    kv4_cache_gather_ref,
)

_LOG2E = 1.4426950408889634
# Running max start: finite so that fully masked rows give exp2(-inf) = 0 and
# never exp2(-inf - -inf) = nan.
_NEG_BIG = tl.constexpr(-1.0e30)

# The code unpacking: bf16 128.0 has exponent 2**7 and 7 free mantissa bits, so its bit
# pattern OR-ed with u in [0, 127] is the bf16 value 128 + u, exactly. With u = c - qmin
# (the sign-flipped code, kv_cache._SIGN_FLIP) a code c becomes 128 - qmin + c
# (136 + c for 4 bits) in one integer op.
_MAGIC_BASE = 128
if (1 << fmt.KV_BITS) > _MAGIC_BASE:
    raise ValueError(f"the bf16 code unpacking needs 2**KV_BITS <= {_MAGIC_BASE} codes, "
                     f"got KV_BITS={fmt.KV_BITS}")
_MAGIC_BITS = tl.constexpr(
    int(torch.tensor(float(_MAGIC_BASE), dtype=torch.bfloat16).view(torch.int16))
    | -fmt.qmin(fmt.KV_BITS))
# what the products carry on top of c - z: the offset 128 - qmin applies to codes and zero alike
_MAGIC_OFFSET = tl.constexpr(_MAGIC_BASE)


# ----------------------------------------------------------------------------
# shared checks
# ----------------------------------------------------------------------------
def _check_common(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, num_kv_heads: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (num_tokens, num_heads, head_dim), got {tuple(q.shape)}")
    if q.stride(2) != 1:
        raise ValueError(f"q needs a contiguous head_dim, got strides {q.stride()}")
    T, Hq, D = q.shape
    if Hq % num_kv_heads:
        raise ValueError(f"num_heads={Hq} must be a multiple of num_kv_heads={num_kv_heads}")
    check_kv4_cache(kv_cache, num_kv_heads, D)
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be 2-D int32/int64, got {tuple(block_table.shape)} "
                         f"{block_table.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] > block_table.shape[0]:
        raise ValueError(f"seq_lens must be 1-D with <= block_table rows={block_table.shape[0]}, "
                         f"got {tuple(seq_lens.shape)}")


def _check_varlen(q, kv_cache, block_table, seq_lens, cu_seqlens_q, out):
    """Shared argument checks of the decode and prefill wrappers; allocates ``out``.

    Returns ``(out, num_kv_heads, T, Hq, D, S)``.
    """
    num_kv_heads = kv_cache.shape[1]
    _check_common(q, kv_cache, block_table, seq_lens, num_kv_heads)
    T, Hq, D = q.shape
    S = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != S + 1:
        raise ValueError(f"cu_seqlens_q must have num_seqs+1={S + 1} entries, "
                         f"got {cu_seqlens_q.shape[0]}")
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous head_dim, "
                         f"got {tuple(out.shape)} strides {out.stride()}")
    return out, num_kv_heads, T, Hq, D, S


def _rotated_query(q: torch.Tensor, had_size: int | None, hadamard: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.dtype]:
    """``q (T, Hq, D)`` -> ``q @ cat(H[:, 0::2], H[:, 1::2])`` (T, Hq, D) in the dot dtype.

    One small GEMM per call (cuBLAS; +-1 entries are exact, fp32 accumulation),
    so the kernels read even/odd halves of the rotated query instead of each
    program rotating it (which cost every program a D x D matrix load).
    """
    D = q.shape[2]
    dt = dot_dtype(q.dtype)
    hp = hadamard if hadamard is not None else _hadamard_perm(D, had_size, dt, q.device)
    if hp.dtype != dt or hp.shape != (D, D):
        raise ValueError(f"hadamard must be the ({D}, {D}) {dt} matrix of "
                         f"kv_cache.hadamard_perm, got {tuple(hp.shape)} {hp.dtype}")
    return torch.matmul(q.to(dt), hp), dt


# ----------------------------------------------------------------------------
# Triton building blocks
# ----------------------------------------------------------------------------
@triton.jit
def _load_query(qr_row_ptrs, row_ok, q_mul, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                DT: tl.constexpr):
    """Rotated query rows as even/odd halves ``(R, HALF_PAD)`` in DT, times ``q_mul``."""
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, HALF_PAD)
    m = row_ok[:, None] & (j < HALF)[None, :]
    qe = tl.load(qr_row_ptrs[:, None] + j[None, :], mask=m, other=0.0).to(tl.float32)
    qo = tl.load(qr_row_ptrs[:, None] + HALF + j[None, :], mask=m, other=0.0).to(tl.float32)
    return (qe * q_mul).to(DT), (qo * q_mul).to(DT)


@triton.jit
def _tile_rows(bt_row_ptr, kpos, kmask, head, block_size,
               stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
               MASKED: tl.constexpr):
    """Byte offset (codes) and word offset (scale words) of each token's head vector."""
    if MASKED:
        page = tl.load(bt_row_ptr + kpos // block_size, mask=kmask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row_ptr + kpos // block_size).to(tl.int64)
    off = (kpos % block_size).to(tl.int64)
    # rows are 8-byte aligned (check_kv4_cache): lets Triton vectorize the code loads
    return (tl.multiple_of(page * stride_cb + head * stride_ch + off * stride_cs, 8),
            page * stride_wb + head * stride_wh + off * stride_ws)


@triton.jit
def _load_codes(cache_ptr, word_ptr, rb, rw, kmask, PART: tl.constexpr,
                HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DT: tl.constexpr,
                MASKED: tl.constexpr):
    """Even/odd code halves ``(TILE_N, HALF_PAD)`` in DT, scales, and the offset to remove.

    The halves hold ``128 - qmin + c`` (bf16 bit patterns converted to DT, exact
    in every float dtype); the offset ``128 - qmin + z`` per key is removed by
    the caller with one correction per score / per output row.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, HALF_PAD)
    if HALF_PAD == HALF:
        if MASKED:
            p = tl.load(cache_ptr + rb[:, None] + PART * HALF + j[None, :], mask=kmask[:, None],
                        other=0).to(tl.int32)
        else:
            p = tl.load(cache_ptr + rb[:, None] + PART * HALF + j[None, :]).to(tl.int32)
    else:
        p = tl.load(cache_ptr + rb[:, None] + PART * HALF + j[None, :],
                    mask=kmask[:, None] & (j < HALF)[None, :], other=0).to(tl.int32)
    if MASKED:
        w = tl.load(word_ptr + rw + HEAD_DIM // 4 + PART, mask=kmask, other=0)
    else:
        w = tl.load(word_ptr + rw + HEAD_DIM // 4 + PART)
    scale = (w & _SCALE_MASK).to(tl.float32, bitcast=True)
    # nibble n (two's complement of c) ^ _MAGIC_BITS = bf16 bits of 128 + (c - qmin)
    ce = ((p & _CODE_MASK) ^ _MAGIC_BITS).to(tl.int16).to(tl.bfloat16, bitcast=True).to(DT)
    co = (((p >> _CODE_BITS) & _CODE_MASK) ^ _MAGIC_BITS).to(tl.int16).to(
        tl.bfloat16, bitcast=True).to(DT)
    zo = (((w & _CODE_MASK) ^ _SIGN_FLIP) + _MAGIC_OFFSET).to(tl.float32)
    return ce, co, scale, zo


@triton.jit
def _attend_tile(qe, qo, qsum, m_i, l_i, acc_e, acc_o, valid,
                 cache_ptr, word_ptr, bt_row_ptr, kpos, kmask, head, block_size,
                 stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
                 HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DT: tl.constexpr,
                 DOT_IEEE: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step (base 2) over a tile of keys; ``valid (R, TILE_N)``.

    ``qsum (R,)``: row sums of the rotated query in DT precision (removes the
    codes' offset from the scores).
    MASKED False: every key of the tile exists and every row may see it (``valid``
    and ``kmask`` are not read; the causal interior of a prefill block).
    """
    rb, rw = _tile_rows(bt_row_ptr, kpos, kmask, head, block_size,
                        stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
                        MASKED)
    ke, ko, ks, kz = _load_codes(cache_ptr, word_ptr, rb, rw, kmask, 0, HEAD_DIM, HALF_PAD, DT,
                                 MASKED)
    if DOT_IEEE:
        s = tl.dot(qe, tl.trans(ke), input_precision="ieee")
        s = tl.dot(qo, tl.trans(ko), s, input_precision="ieee")
    else:
        s = tl.dot(qe, tl.trans(ke))
        s = tl.dot(qo, tl.trans(ko), s)
    s = s - qsum[:, None] * kz[None, :]
    if MASKED:
        s = tl.where(valid, s * ks[None, :], float("-inf"))
    else:
        s = s * ks[None, :]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    ve, vo, vs, vz = _load_codes(cache_ptr, word_ptr, rb, rw, kmask, 1, HEAD_DIM, HALF_PAD,
                                 DT, MASKED)
    pv = (p * vs[None, :]).to(DT)
    if DOT_IEEE:
        acc_e = tl.dot(pv, ve, acc_e * alpha[:, None], input_precision="ieee")
        acc_o = tl.dot(pv, vo, acc_o * alpha[:, None], input_precision="ieee")
    else:
        acc_e = tl.dot(pv, ve, acc_e * alpha[:, None])
        acc_o = tl.dot(pv, vo, acc_o * alpha[:, None])
    # the same rounded weights the product used, so the correction cancels exactly
    corr = tl.sum(pv.to(tl.float32) * vz[None, :], axis=1)
    acc_e = acc_e - corr[:, None]
    acc_o = acc_o - corr[:, None]
    return m_new, l_i, acc_e, acc_o


# ----------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------
@triton.jit
def _kv4_decode_kernel(
    # pointers
    q_ptr, out_ptr, cache_ptr, word_ptr, bt_ptr, seq_lens_ptr, cu_q_ptr,
    part_acc_ptr, part_ml_ptr,
    # sizes
    block_size, q_mul,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
    # meta-parameters
    NUM_HEADS: tl.constexpr, QPK: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr,
    DT: tl.constexpr, DOT_IEEE: tl.constexpr, SINGLE_ONLY: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_row
    seq_len = tl.load(seq_lens_ptr + seq)
    if q_len == 0:  # padding entry of a CUDA-graph batch
        return
    if SINGLE_ONLY:  # a mixed batch: the other sequences go to the prefill / flash kernels
        if q_len != 1:
            return

    # ---- this split's share of the context ---------------------------------
    # at least MIN_SPLIT tokens per split: short contexts use fewer splits (the
    # rest exit here), decided on the device so CUDA graphs stay valid
    per_split = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_SPLIT)
    per_split = tl.cdiv(per_split, TILE_N) * TILE_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    r = tl.arange(0, ROWS)
    row_ok = r < QPK
    heads = kvh * QPK + r
    if NUM_SPLITS > 1:
        if start >= end:
            # empty split: l = 0 tells the reduce to ignore its (unwritten) acc
            pidx = (seq.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split
            tl.store(part_ml_ptr + pidx * 2, tl.full([ROWS], _NEG_BIG, tl.float32), mask=row_ok)
            tl.store(part_ml_ptr + pidx * 2 + 1, tl.zeros([ROWS], tl.float32), mask=row_ok)
            return

    # ---- the query heads of this kv head (rotated by the wrapper) -------------
    q_base = q_ptr + q_row.to(tl.int64) * stride_qt + heads * stride_qh
    qe, qo = _load_query(q_base, row_ok, q_mul, HEAD_DIM, HALF_PAD, DT)
    qsum = tl.sum(qe.to(tl.float32), axis=1) + tl.sum(qo.to(tl.float32), axis=1)

    m_i = tl.full([ROWS], _NEG_BIG, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc_e = tl.zeros([ROWS, HALF_PAD], tl.float32)
    acc_o = tl.zeros([ROWS, HALF_PAD], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    n = tl.arange(0, TILE_N)
    for t0 in range(start, end, TILE_N):
        kpos = t0 + n
        kmask = kpos < end
        m_i, l_i, acc_e, acc_o = _attend_tile(
            qe, qo, qsum, m_i, l_i, acc_e, acc_o, row_ok[:, None] & kmask[None, :],
            cache_ptr, word_ptr, bt_row, kpos, kmask, kvh, block_size,
            stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
            HEAD_DIM, HALF_PAD, DT, DOT_IEEE, True)

    # ---- write: final output (one split) or partials -------------------------
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, HALF_PAD)
    if NUM_SPLITS == 1:
        inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        o_base = out_ptr + q_row.to(tl.int64) * stride_ot + heads * stride_oh
        om = row_ok[:, None] & (j < HALF)[None, :]
        o_ty = out_ptr.dtype.element_ty
        tl.store(o_base[:, None] + 2 * j[None, :], (acc_e * inv[:, None]).to(o_ty), mask=om)
        tl.store(o_base[:, None] + 2 * j[None, :] + 1, (acc_o * inv[:, None]).to(o_ty), mask=om)
    else:
        # partials: acc (seqs, heads, splits, 2 * HALF_PAD) [even | odd],
        # ml (seqs, heads, splits, 2) [running max | running sum]
        pidx = (seq.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split
        pa = part_acc_ptr + pidx[:, None] * (2 * HALF_PAD) + j[None, :]
        tl.store(pa, acc_e, mask=row_ok[:, None])
        tl.store(pa + HALF_PAD, acc_o, mask=row_ok[:, None])
        tl.store(part_ml_ptr + pidx * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + pidx * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _kv4_decode_reduce_kernel(
    out_ptr, cu_q_ptr, part_acc_ptr, part_ml_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SINGLE_ONLY: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_row
    if q_len == 0:
        return
    if SINGLE_ONLY:
        if q_len != 1:
            return
    HALF: tl.constexpr = HEAD_DIM // 2
    sp = tl.arange(0, NUM_SPLITS)
    j = tl.arange(0, HALF_PAD)
    pidx = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + sp
    m = tl.load(part_ml_ptr + pidx * 2)
    l = tl.load(part_ml_ptr + pidx * 2 + 1)
    live = l > 0.0
    m_all = tl.max(tl.where(live, m, _NEG_BIG), axis=0)
    w = tl.where(live, tl.exp2(m - m_all), 0.0)
    denom = tl.sum(w * l, axis=0)
    inv = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
    pa = part_acc_ptr + pidx[:, None] * (2 * HALF_PAD) + j[None, :]
    oe = tl.sum(tl.load(pa, mask=live[:, None], other=0.0) * w[:, None], axis=0) * inv
    oo = tl.sum(tl.load(pa + HALF_PAD, mask=live[:, None], other=0.0) * w[:, None], axis=0) * inv
    o_base = out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh
    jm = j < HALF
    tl.store(o_base + 2 * j, oe.to(out_ptr.dtype.element_ty), mask=jm)
    tl.store(o_base + 2 * j + 1, oo.to(out_ptr.dtype.element_ty), mask=jm)


def default_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int = DEFAULT_SMS) -> int:
    """Context splits for decode: ~8 programs per SM, a power of two in [1, 32].

    Depends only on the batch shape (not on sequence lengths), so a CUDA graph
    captured for a batch size stays valid for every context length (short
    contexts leave the extra splits empty, see ``min_split``). Measured on the
    H100 (benchmarks/results/kv_attention/2026-11-22_1718_h100.json sweep): 32 splits at
    batch 1 and 8 at batch 32 with 8 kv heads were the fastest at 4k-16k.
    """
    progs = max(1, num_seqs * num_kv_heads)
    want = max(1, (8 * num_sms + progs - 1) // progs)
    return min(32, triton.next_power_of_2(want))


def kv4_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, sm_scale: float,
                         out: torch.Tensor | None = None, num_splits: int | None = None,
                         had_size: int | None = None,
                         hadamard: torch.Tensor | None = None,
                         tile_n: int = 128, min_split: int = 256, num_warps: int = 4,
                         single_rows_only: bool = False, q_rotated: bool = False) -> torch.Tensor:
    """Decode attention (one query per sequence) over the 4-bit paged cache.

    ``q (num_tokens, num_heads, head_dim)`` fp32/fp16/bf16, NOT rotated (R3 is
    applied here); ``kv_cache`` uint8 (``kv_cache.kv4_cache_shape``);
    ``block_table (num_seqs_max, max_blocks)`` int32; ``seq_lens (num_seqs,)``
    int32 context length including the query token; ``cu_seqlens_q
    (num_seqs + 1,)`` int32 query start rows (every sequence has 0 or 1 query
    rows; 0 = padding, skipped); ``had_size`` the R3 size the cache was
    written with (``None`` = head_dim, 0 = none); ``hadamard`` optional
    precomputed ``kv_cache.hadamard_perm`` in the dot dtype (for CUDA-graph capture).
    Returns ``out (num_tokens, num_heads, head_dim)`` in q's dtype (rows of
    padding entries are left untouched). ``num_splits`` (power of two, default
    :func:`default_num_splits`) splits the context, each split covering at
    least ``min_split`` tokens; ``tile_n`` keys per inner step and
    ``num_warps`` are tile overrides for benchmarks (the plugin passes none).
    ``single_rows_only``: the batch may hold sequences with several query rows
    (a mixed batch); they are skipped (rows untouched), the others answered
    (:func:`kv4_mixed_attention_flash`).
    ``q_rotated``: q is already ``q @ hadamard`` in the dot dtype (``hadamard`` unused).
    Equivalent to :func:`kv4_decode_attention_ref`.
    """
    out, num_kv_heads, T, Hq, D, S = _check_varlen(q, kv_cache, block_table, seq_lens, cu_seqlens_q, out)
    if S == 0:
        return out
    qr, dt = (q, q.dtype) if q_rotated else _rotated_query(q, had_size, hadamard)
    qpk = Hq // num_kv_heads
    splits = (default_num_splits(S, num_kv_heads, sm_count(q.device)) if num_splits is None
              else int(num_splits))
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of two >= 1, got {splits}")
    half_pad = triton.next_power_of_2(D // 2)
    if splits > 1:
        part_acc = torch.empty(S, Hq, splits, 2 * half_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(S, Hq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    words = _words(kv_cache)
    q_mul = sm_scale * _LOG2E / had_norm(D, had_size)
    tl_dt = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32}[dt]
    _kv4_decode_kernel[(S, num_kv_heads, splits)](
        qr, out, kv_cache, words, block_table, seq_lens, cu_seqlens_q,
        part_acc, part_ml,
        kv_cache.shape[2], q_mul,
        qr.stride(0), qr.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        words.stride(0), words.stride(1), words.stride(2),
        NUM_HEADS=Hq, QPK=qpk, ROWS=max(16, triton.next_power_of_2(qpk)),
        HEAD_DIM=D, HALF_PAD=half_pad,
        TILE_N=tile_n, NUM_SPLITS=splits, MIN_SPLIT=max(1, int(min_split)), DT=tl_dt,
        DOT_IEEE=dt == torch.float32, SINGLE_ONLY=bool(single_rows_only),
        num_warps=num_warps,
    )
    if splits > 1:
        _kv4_decode_reduce_kernel[(S, Hq)](
            out, cu_seqlens_q, part_acc, part_ml, out.stride(0), out.stride(1),
            NUM_HEADS=Hq, HEAD_DIM=D, HALF_PAD=half_pad, NUM_SPLITS=splits,
            SINGLE_ONLY=bool(single_rows_only), num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------
# prefill with cached context (varlen)
# ----------------------------------------------------------------------------
@triton.jit
def _kv4_prefill_kernel(
    # pointers
    q_ptr, out_ptr, cache_ptr, word_ptr, bt_ptr, seq_lens_ptr, cu_q_ptr,
    # sizes
    block_size, q_mul,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
    # meta-parameters
    QPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    TILE_N: tl.constexpr, DT: tl.constexpr, DOT_IEEE: tl.constexpr,
    SKIP_SINGLE: tl.constexpr, SKIP_FRESH: tl.constexpr,
):
    seq = tl.program_id(0)
    qid = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    n_qblk = tl.cdiv(q_len, BLOCK_Q)
    if qid >= n_qblk:
        return
    if SKIP_SINGLE:  # one query row: left to the decode kernel (kv4_mixed_attention_flash)
        if q_len == 1:
            return
    # programs start in grid order: give the first ones the last (longest, causal) blocks so
    # the short ones fill the tail of the launch
    qblk = n_qblk - 1 - qid
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len
    if SKIP_FRESH:  # no cached context: left to flash attention (kv4_mixed_attention_flash)
        if ctx_len == 0:
            return

    # ---- rows = (query token, head of this kv group) pairs ------------------
    r = tl.arange(0, BLOCK_M)
    tok = qblk * BLOCK_Q + r // QPK
    row_ok = (r < BLOCK_Q * QPK) & (tok < q_len)
    heads = kvh * QPK + r % QPK
    q_base = q_ptr + (q_start + tok).to(tl.int64) * stride_qt + heads * stride_qh
    qe, qo = _load_query(q_base, row_ok, q_mul, HEAD_DIM, HALF_PAD, DT)
    qsum = tl.sum(qe.to(tl.float32), axis=1) + tl.sum(qo.to(tl.float32), axis=1)
    q_pos = ctx_len + tok

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_e = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    acc_o = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    n = tl.arange(0, TILE_N)
    # causal: every row of this block sees keys [0, ctx_len + first_tok); the last row sees
    # keys up to ctx_len + last_tok. Whole tiles below the first bound need no mask.
    kv_end = tl.minimum(seq_len, ctx_len + (qblk + 1) * BLOCK_Q)
    full_end = ((ctx_len + qblk * BLOCK_Q) // TILE_N) * TILE_N
    for t0 in range(0, full_end, TILE_N):
        kpos = t0 + n
        m_i, l_i, acc_e, acc_o = _attend_tile(
            qe, qo, qsum, m_i, l_i, acc_e, acc_o, row_ok[:, None],
            cache_ptr, word_ptr, bt_row, kpos, kpos < kv_end, kvh, block_size,
            stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
            HEAD_DIM, HALF_PAD, DT, DOT_IEEE, False)
    for t0 in range(full_end, kv_end, TILE_N):
        kpos = t0 + n
        kmask = kpos < kv_end
        valid = row_ok[:, None] & kmask[None, :] & (kpos[None, :] <= q_pos[:, None])
        m_i, l_i, acc_e, acc_o = _attend_tile(
            qe, qo, qsum, m_i, l_i, acc_e, acc_o, valid,
            cache_ptr, word_ptr, bt_row, kpos, kmask, kvh, block_size,
            stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
            HEAD_DIM, HALF_PAD, DT, DOT_IEEE, True)

    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, HALF_PAD)
    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    o_base = out_ptr + (q_start + tok).to(tl.int64) * stride_ot + heads * stride_oh
    om = row_ok[:, None] & (j < HALF)[None, :]
    o_ty = out_ptr.dtype.element_ty
    tl.store(o_base[:, None] + 2 * j[None, :], (acc_e * inv[:, None]).to(o_ty), mask=om)
    tl.store(o_base[:, None] + 2 * j[None, :] + 1, (acc_o * inv[:, None]).to(o_ty), mask=om)


def kv4_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, sm_scale: float,
                          max_query_len: int, out: torch.Tensor | None = None,
                          had_size: int | None = None,
                          hadamard: torch.Tensor | None = None,
                          block_m: int = 128, tile_n: int = 32, num_warps: int = 4,
                          num_stages: int | None = None, skip_single_rows: bool = False,
                          skip_fresh: bool = False, q_rotated: bool = False) -> torch.Tensor:
    """Causal varlen attention for queries that end each sequence (context in the cache).

    ``q (num_tokens, num_heads, head_dim)`` NOT rotated; sequence ``i`` owns
    query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` which are its last
    ``q_len`` positions out of ``seq_lens[i]`` (their K/V already written to
    ``kv_cache``). ``max_query_len`` (host int) sizes the grid. Other
    arguments as :func:`kv4_decode_attention`. Tile overrides for benchmarks
    (the plugin passes none): ``block_m`` rows (query tokens x the heads of one
    KV group) per program, ``tile_n`` keys per step, ``num_warps``,
    ``num_stages`` (Triton's software-pipelining depth; None: Triton's
    default). Each sequence's longest causal blocks are launched first, so the
    short ones fill the tail of the grid. ``skip_single_rows`` leaves the rows
    of one-row sequences untouched and ``skip_fresh`` those of sequences with no
    cached context (:func:`kv4_mixed_attention_flash` gives them to the decode
    and flash kernels); ``q_rotated`` as :func:`kv4_decode_attention`.
    Equivalent to :func:`kv4_prefill_attention_ref`.
    """
    out, num_kv_heads, T, Hq, D, S = _check_varlen(q, kv_cache, block_table, seq_lens, cu_seqlens_q, out)
    if S == 0 or max_query_len <= 0:
        return out
    if num_stages is not None and int(num_stages) < 1:
        raise ValueError(f"num_stages must be >= 1 (or None for Triton's default), got {num_stages}")
    qr, dt = (q, q.dtype) if q_rotated else _rotated_query(q, had_size, hadamard)
    qpk = Hq // num_kv_heads
    block_m = max(block_m, triton.next_power_of_2(qpk), 16)
    block_q = block_m // qpk
    words = _words(kv_cache)
    q_mul = sm_scale * _LOG2E / had_norm(D, had_size)
    tl_dt = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32}[dt]
    grid = (S, triton.cdiv(int(max_query_len), block_q), num_kv_heads)
    _kv4_prefill_kernel[grid](
        qr, out, kv_cache, words, block_table, seq_lens, cu_seqlens_q,
        kv_cache.shape[2], q_mul,
        qr.stride(0), qr.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        words.stride(0), words.stride(1), words.stride(2),
        QPK=qpk, BLOCK_M=block_m, BLOCK_Q=block_q,
        HEAD_DIM=D, HALF_PAD=triton.next_power_of_2(D // 2),
        TILE_N=tile_n, DT=tl_dt, DOT_IEEE=dt == torch.float32,
        SKIP_SINGLE=bool(skip_single_rows), SKIP_FRESH=bool(skip_fresh), num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": int(num_stages)}),
    )
    return out


# ----------------------------------------------------------------------------
# batches with prefill rows
# ----------------------------------------------------------------------------
def varlen_causal_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of varlen sequences (rows ``cu_seqlens[i]:cu_seqlens[i+1]`` of q, k
    and v), GQA by head groups, in float32 per sequence: the plain-PyTorch stand-in for the
    flash kernel :func:`kv4_mixed_attention_flash` takes (same arguments; writes ``out``)."""
    cu = cu_seqlens.tolist()
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1], cu[1:]):
        if b == a:
            continue
        o = F.scaled_dot_product_attention(
            q[a:b].float().transpose(0, 1), k[a:b].float().transpose(0, 1).repeat_interleave(rep, 0),
            v[a:b].float().transpose(0, 1).repeat_interleave(rep, 0), is_causal=True, scale=scale)
        out[a:b] = o.transpose(0, 1).to(out.dtype)
    return out


def torch_varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """The same through ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; K/V repeated
    over the query heads of each group): the fallback where vLLM's FlashAttention is absent."""
    from torch.nn.attention.varlen import varlen_attn

    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = cu_seqlens.to(torch.int32)
    out.copy_(varlen_attn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), scale=scale,
                          window_size=(-1, 0)))
    return out


def kv4_mixed_attention_flash(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                              seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, sm_scale: float,
                              max_query_len: int, out: torch.Tensor | None = None,
                              had_size: int | None = None,
                              hadamard_perm: torch.Tensor | None = None,
                              hadamard_full: torch.Tensor | None = None,
                              varlen=None, prefill_kw: dict | None = None,
                              decode_kw: dict | None = None) -> torch.Tensor:
    """A batch with prefill rows (vLLM's chunked prefill), without a host sync.

    A sequence with no cached context (``seq_lens[i]`` equal to its query
    rows: a new prompt, or the first chunk of one) attends only to the K/V this
    step wrote. Those are read back from the 4-bit cache for every sequence's
    query rows at once (:func:`kv_cache.kv4_cache_dequant` with the query
    lengths as lengths: for a fresh sequence exactly its tokens, the same values
    the Triton kernels dequantize in registers) and ``varlen(q, k, v, cu, max_q,
    scale, out)`` runs causal varlen attention over them, GQA by head groups
    (the plugin passes vLLM's FlashAttention, FA3 on Hopper, or
    :func:`torch_varlen_causal`; :func:`varlen_causal_ref` on CPU). It writes
    every row; then the decode kernel (unsplit unless ``decode_kw`` says
    otherwise) answers the one-row sequences and the Triton prefill kernel the
    chunks with cached context, each skipping the others on the device.
    ``varlen=None`` (where no flash kernel runs: fp32 activations on the GPU)
    leaves the fresh sequences to the prefill kernel too.

    The decode part runs unsplit by default: next to a prefill there is
    parallelism to spare, and a split count that followed the batch size would
    make Triton compile one decode-kernel variant per count while serving
    (vLLM's warm-up captures pure decode batches only). ``hadamard_perm``:
    precomputed ``kv_cache.hadamard_perm`` in the dot dtype (for the Triton
    kernels); ``hadamard_full``: ``kv_cache.hadamard_full`` in q's dtype (the
    flash kernel's query rotation); ``prefill_kw`` / ``decode_kw``: tile
    overrides of the two kernels (benchmarks, tests). Other arguments as
    :func:`kv4_prefill_attention`. Equivalent to
    :func:`kv4_mixed_attention_flash_ref`.
    """
    out, _, T, Hq, D, S = _check_varlen(q, kv_cache, block_table, seq_lens, cu_seqlens_q, out)
    if S == 0 or max_query_len <= 0:
        return out
    if varlen is not None:
        cu = cu_seqlens_q[:S + 1]
        q_lens = cu[1:] - cu[:-1]
        k, v = kv4_cache_dequant(kv_cache, block_table, q_lens, cu, D, int(max_query_len), T,
                                 q.dtype, zero_fill=False)
        hf = hadamard_full if hadamard_full is not None else _hadamard_full(D, had_size, q.dtype,
                                                                            q.device)
        varlen(torch.matmul(q, hf.to(q.dtype)), k, v, cu.to(torch.int32), int(max_query_len),
               sm_scale / had_norm(D, had_size), out)
    qr, _ = _rotated_query(q, had_size, hadamard_perm)   # once for both kernels
    kv4_decode_attention(qr, kv_cache, block_table, seq_lens, cu_seqlens_q, sm_scale, out=out,
                         had_size=had_size, single_rows_only=True, q_rotated=True,
                         **{"num_splits": 1, **(decode_kw or {})})
    if max_query_len > 1:
        kv4_prefill_attention(qr, kv_cache, block_table, seq_lens, cu_seqlens_q, sm_scale,
                              max_query_len, out=out, had_size=had_size, q_rotated=True,
                              skip_fresh=varlen is not None, skip_single_rows=True,
                              **(prefill_kw or {}))
    return out


# ----------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------
def _attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, sm_scale: float,
                   had_size: int | None, out: torch.Tensor) -> torch.Tensor:
    T, Hq, D = q.shape
    had = _resolve_had_size(D, had_size)
    Hkv = kv_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    for i, L in enumerate(seq_lens.tolist()):
        a, b = cu[i], cu[i + 1]
        if b == a:
            continue
        k, v = kv4_cache_gather_ref(kv_cache, block_table[i], L, D)   # (L, Hkv, D)
        qr = q[a:b].float()                                            # (n, Hq, D)
        if had:
            qr = hadamard_transform_ref(qr, had)
        n = b - a
        qpos = torch.arange(L - n, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(
            qr.transpose(0, 1), k.transpose(0, 1).repeat_interleave(Hq // Hkv, 0),
            v.transpose(0, 1).repeat_interleave(Hq // Hkv, 0), attn_mask=mask, scale=sm_scale)
        out[a:b] = o.transpose(0, 1).to(out.dtype)
    return out


def kv4_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                             seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, sm_scale: float,
                             out: torch.Tensor | None = None, num_splits: int | None = None,
                             had_size: int | None = None,
                             hadamard: torch.Tensor | None = None,
                             tile_n: int = 128, min_split: int = 256, num_warps: int = 4,
                             single_rows_only: bool = False, q_rotated: bool = False
                             ) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`kv4_decode_attention` (fp32 sdpa on the dequantized cache;
    answers every sequence: ``single_rows_only`` and ``q_rotated`` are not modelled)."""
    _check_common(q, kv_cache, block_table, seq_lens, kv_cache.shape[1])
    out = torch.empty_like(q) if out is None else out
    return _attention_ref(q, kv_cache, block_table, seq_lens, cu_seqlens_q, sm_scale,
                          had_size, out)


def kv4_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                              seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, sm_scale: float,
                              max_query_len: int, out: torch.Tensor | None = None,
                              had_size: int | None = None,
                              hadamard: torch.Tensor | None = None,
                              block_m: int = 128, tile_n: int = 32, num_warps: int = 4,
                              num_stages: int | None = None, skip_single_rows: bool = False,
                              skip_fresh: bool = False, q_rotated: bool = False) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`kv4_prefill_attention` (answers every sequence: the skip
    flags and ``q_rotated`` are not modelled)."""
    _check_common(q, kv_cache, block_table, seq_lens, kv_cache.shape[1])
    out = torch.empty_like(q) if out is None else out
    return _attention_ref(q, kv_cache, block_table, seq_lens, cu_seqlens_q, sm_scale,
                          had_size, out)


def kv4_mixed_attention_flash_ref(q: torch.Tensor, kv_cache: torch.Tensor,
                                  block_table: torch.Tensor, seq_lens: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, sm_scale: float,
                                  max_query_len: int, out: torch.Tensor | None = None,
                                  had_size: int | None = None,
                                  hadamard_perm: torch.Tensor | None = None,
                                  hadamard_full: torch.Tensor | None = None,
                                  varlen=None, prefill_kw: dict | None = None,
                                  decode_kw: dict | None = None) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`kv4_mixed_attention_flash`."""
    _check_common(q, kv_cache, block_table, seq_lens, kv_cache.shape[1])
    out = torch.empty_like(q) if out is None else out
    return _attention_ref(q, kv_cache, block_table, seq_lens, cu_seqlens_q, sm_scale,
                          had_size, out)


__all__ = [
    "default_num_splits",
    "kv4_decode_attention",
    "kv4_decode_attention_ref",
    "kv4_mixed_attention_flash",
    "kv4_mixed_attention_flash_ref",
    "kv4_prefill_attention",
    "kv4_prefill_attention_ref",
    "torch_varlen_causal",
    "varlen_causal_ref",
]
