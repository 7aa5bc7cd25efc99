"""W4A4 / W4A8 / W4A16 GEMMs on packed int4 weights (Hopper: int8 or fp8 tensor cores).

``w4a4_gemm(qx, sx, zx, w, out_dtype)`` computes, equivalently to :func:`w4a4_gemm_ref`,

    y = sx * sw * (qx @ qw.T - zx * rowsum(qw)) (+ bias)        (M, N)

with the codes read packed: activations ``qx (M, K/2) uint8`` (W4A4) or
``(M, K) int8`` (W4A8), weights ``w.qweight (N, K/2) uint8`` in the
``format.pack_int4`` layout.  No interleave is needed to unpack: byte j of a
row holds codes 2j (low nibble) and 2j+1 (high nibble) in both operands, so
``sum_k a_k w_k = lo(A) . lo(W) + hi(A) . hi(W)``, two dots of K/2 on
sign-extended nibbles (``(b << 4) >> 4`` and ``b >> 4`` on int8).

Two MMA flavours (``mma="int8"`` or ``"fp8"``): int8 operands with an int32
accumulator (exact), or the same integers in fp8 e4m3 (every code in [-8, 7]
is exact) with ``max_num_imprecise_acc`` = one MMA's K so that Hopper's
reduced-precision fp8 accumulation only ever sums <= 32 products (|sum| <=
2048, exact) before the partial result is added into a full fp32 accumulator
(exact for |integers| < 2^24; the worst case, all codes -8 at K = 14336, is
917,504).  The zero-point correction ``- zx * rowsum`` and both scales are
applied in the epilogue; the float32 result is bit-identical to
``format.w4a4_matmul_ref`` because the epilogue performs the same float32
operations in the same order on the same exact integers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from spinquant_kernels import format as fmt
from spinquant_kernels._common import mul_rn as _mul_rn, quotient_div as _quotient, rint as _rint

MMA_KINDS = ("int8", "fp8")
# Which MMA the public entry point uses; chosen from the H100 benchmark
# (docs/KERNELS.md). Both are exact.
DEFAULT_MMA = "int8"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _weight_tensors(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Accept a PackedW4 or a (qweight, scale, rowsum) tuple."""
    if isinstance(w, (tuple, list)):
        qweight, scale, rowsum = w
    else:
        qweight, scale, rowsum = w.qweight, w.scale, w.rowsum
    if qweight.dtype != fmt.PACKED_DTYPE or qweight.dim() != 2:
        raise ValueError(f"weight qweight must be (N, K/2) uint8, got {tuple(qweight.shape)} {qweight.dtype}")
    N, KH = qweight.shape
    if scale.dtype != torch.float32 or scale.numel() != N:
        raise ValueError(f"weight scale must be ({N},) float32, got {tuple(scale.shape)} {scale.dtype}")
    if rowsum.dtype != torch.int32 or rowsum.numel() != N:
        raise ValueError(f"weight rowsum must be ({N},) int32, got {tuple(rowsum.shape)} {rowsum.dtype}")
    if qweight.stride(1) != 1:
        qweight = qweight.contiguous()
    return qweight, scale.reshape(N).contiguous(), rowsum.reshape(N).contiguous(), N, 2 * KH


def _act_bits(qx: torch.Tensor, K: int) -> int:
    if qx.dim() != 2:
        raise ValueError(f"qx must be 2-D, got shape {tuple(qx.shape)}")
    if qx.dtype == fmt.PACKED_DTYPE and qx.shape[1] * 2 == K:
        return 4
    if qx.dtype == fmt.CODE_DTYPE and qx.shape[1] == K:
        return 8
    raise ValueError(f"qx must be (M, K/2={K // 2}) uint8 (W4A4) or (M, K={K}) int8 (W4A8), "
                     f"got {tuple(qx.shape)} {qx.dtype}")


# ----------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------
def w4a4_matmul_exact(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qw: torch.Tensor,
                      sw: torch.Tensor) -> torch.Tensor:
    """``format.w4a4_matmul_ref`` on any device, float32 (M, N), bit-identical to it.

    On CPU it is ``format.w4a4_matmul_ref``. CUDA has no int64 matmul: the
    integer product is taken in float64 there, exact because every partial sum
    of int8 codes stays far below 2^53; the float32 epilogue is the same.
    """
    if qx.device.type == "cpu":
        return fmt.w4a4_matmul_ref(qx, sx, zx, qw, sw)
    acc = qx.to(torch.float64) @ qw.to(torch.float64).T
    colsum = qw.to(torch.float64).sum(dim=1)
    return sx * sw.float()[None, :] * (acc.float() - zx * colsum.float()[None, :])


def w4a4_gemm_ref(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, w, out_dtype=torch.bfloat16,
                  bias: torch.Tensor | None = None, mma: str | None = None) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`w4a4_gemm`: unpack, ``format.w4a4_matmul_ref``, (+ bias), cast."""
    qweight, scale, rowsum, N, K = _weight_tensors(w)
    bits = _act_bits(qx, K)
    codes = fmt.unpack_int4(qx) if bits == 4 else qx
    y = w4a4_matmul_exact(codes, sx.reshape(-1, 1).float(), zx.reshape(-1, 1).float(),
                          fmt.unpack_int4(qweight), scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w4a16_gemm_ref(x: torch.Tensor, w, out_dtype=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only reference: ``x (M, K) @ dequantize(w).T`` in float32, cast to out_dtype (x's by default)."""
    qweight, scale, rowsum, N, K = _weight_tensors(w)
    y = x.float() @ fmt.dequantize_weight(fmt.unpack_int4(qweight), scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------
# Four packed bytes per 32-bit register (SIMD within a register): for each byte
# with nibble n, ((n ^ 0x88) - 0x08) ^ 0x80 is n sign-extended to int8; the
# 0x80 bit keeps every byte >= 8 during the subtraction so no borrow crosses
# bytes. ~4 instructions per 4 codes where int8 element-wise shifts cost ~4 per
# code (measured in the PTX: the element-wise unpack made the main loop ALU-bound).
_ASM_LO = tl.constexpr("{ .reg .b32 t; and.b32 t, $1, 0x0F0F0F0F; xor.b32 t, t, 0x88888888; "
                       "sub.u32 t, t, 0x08080808; xor.b32 $0, t, 0x80808080; }")
_ASM_HI = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; "
                       "xor.b32 t, t, 0x88888888; sub.u32 t, t, 0x08080808; xor.b32 $0, t, 0x80808080; }")


@triton.jit
def _lo_hi(b, USE_ASM: tl.constexpr):
    """Packed bytes -> (low nibbles, high nibbles), sign-extended int8."""
    if USE_ASM:
        lo = tl.inline_asm_elementwise(_ASM_LO, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_ASM_HI, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
        return lo, hi
    else:
        s = b.to(tl.int8, bitcast=True)
        return (s << 4) >> 4, s >> 4


@triton.jit
def _w4ax_gemm_kernel(
    # pointers
    a_ptr, w_ptr, sx_ptr, zx_ptr, sw_ptr, rs_ptr, bias_ptr, c_ptr, ws_ptr, cnt_ptr,
    # sizes
    M, N, KH, M_BUCKET, clip,
    # strides
    stride_am, stride_wn, stride_cm,
    # meta-parameters
    A_BITS: tl.constexpr, MMA_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # A_BITS: 4 (a packed like w), 8 (int8 codes), 16 (bf16/fp16 activations, weight-only),
    # 0 (bf16/fp16 activations quantized to int4 in this kernel: the decode path).
    # BLOCK_K counts packed weight bytes: each iteration consumes 2 * BLOCK_K codes of K.
    # ---- tile coordinates (grouped ordering for L2 reuse) -------------------
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past the end read a valid row (wrapped); their results are not stored
    rows = offs_m % M
    cols = offs_n % N
    # split-K (decode): program (pid, pid_k) covers K iterations [k_first, k_last)
    pid_k = tl.program_id(1)
    n_iter = tl.cdiv(KH, BLOCK_K)
    per_split = tl.cdiv(n_iter, SPLIT_K)
    k_first = pid_k * per_split
    k_last = min(k_first + per_split, n_iter)
    offs_k = tl.arange(0, BLOCK_K) + k_first * BLOCK_K
    w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :]
    if A_BITS == 4:
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    else:
        # unpacked activations: one contiguous (BLOCK_M, 2 * BLOCK_K) tile, split into even / odd k
        offs_k2 = tl.arange(0, 2 * BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k2[None, :] + 2 * k_first * BLOCK_K
    if A_BITS == 0:
        # ---- per-token int4 parameters over the whole row (hadamard_quant's
        # arithmetic, op for op, so the codes are bit-identical to it) ---------
        xrow = a_ptr + rows[:, None] * stride_am
        mn = tl.zeros((BLOCK_M,), dtype=tl.float32)  # starts at 0: the range includes 0
        mx = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kk in range(0, n_iter):
            xt = tl.load(xrow + kk * 2 * BLOCK_K + offs_k2[None, :],
                         mask=offs_k2[None, :] < 2 * (KH - kk * BLOCK_K), other=0.0).to(tl.float32)
            mn = tl.minimum(mn, tl.min(xt, axis=1))
            mx = tl.maximum(mx, tl.max(xt, axis=1))
        lo = mn * clip
        hi = mx * clip
        sx = tl.maximum(tl.div_rn(hi - lo, 15.0), 1e-8)
        zx = tl.minimum(tl.maximum(_rint(-8.0 - tl.div_rn(lo, sx)), -8.0), 7.0)
    else:
        sx = tl.load(sx_ptr + rows)
        zx = tl.load(zx_ptr + rows)
    if A_BITS == 16 or MMA_FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # ---- main loop ------------------------------------------------------------
    for k in range(k_first, k_last):
        if EVEN_K:
            wb = tl.load(w_ptrs)
        else:
            kmask = tl.arange(0, BLOCK_K)[None, :] < KH - k * BLOCK_K
            wb = tl.load(w_ptrs, mask=kmask, other=0)
        w_lo, w_hi = _lo_hi(wb, USE_ASM)
        if A_BITS == 4:
            if EVEN_K:
                ab = tl.load(a_ptrs)
            else:
                ab = tl.load(a_ptrs, mask=kmask, other=0)
            a_lo, a_hi = _lo_hi(ab, USE_ASM)
        else:
            if EVEN_K:
                a2 = tl.load(a_ptrs)
            else:
                a2 = tl.load(a_ptrs, mask=offs_k2[None, :] < 2 * (KH - k * BLOCK_K), other=0)
            if A_BITS == 0:
                shape: tl.constexpr = (BLOCK_M, 2 * BLOCK_K)
                v = _quotient(a2.to(tl.float32), tl.broadcast_to(sx[:, None], shape))
                a2 = tl.minimum(tl.maximum(_rint(v) + zx[:, None], -8.0), 7.0).to(tl.int8)
            a_lo, a_hi = tl.split(tl.reshape(a2, (BLOCK_M, BLOCK_K, 2)))
        if A_BITS == 16:
            acc = tl.dot(a_lo, tl.trans(w_lo.to(a_lo.dtype)), acc)
            acc = tl.dot(a_hi, tl.trans(w_hi.to(a_hi.dtype)), acc)
        elif MMA_FP8:
            f8 = tl.float8e4nv
            acc = tl.dot(a_lo.to(tl.float16).to(f8), tl.trans(w_lo.to(tl.float16).to(f8)), acc,
                         max_num_imprecise_acc=32)
            acc = tl.dot(a_hi.to(tl.float16).to(f8), tl.trans(w_hi.to(tl.float16).to(f8)), acc,
                         max_num_imprecise_acc=32)
        else:
            acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
        w_ptrs += BLOCK_K
        if A_BITS == 4:
            a_ptrs += BLOCK_K
        else:
            a_ptrs += 2 * BLOCK_K
    # ---- split-K: exact int32 reduction through per-split workspace slices ----
    if SPLIT_K > 1:
        tl.static_assert(A_BITS != 16, "split-K is for the integer paths only")
        acc = acc.to(tl.int32)  # fp8 MMA partial sums are exact integers too
        # every split stores its partial tile in its own slice (plain stores: no
        # tensor atomics, whose result depends on the layout the compiler picks);
        # the split that arrives last sums the slices in split order (integer adds:
        # bit-exact), applies the epilogue and resets the tile's counter
        tile: tl.constexpr = BLOCK_M * BLOCK_N
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        slot = ws_ptr + pid * (SPLIT_K * tile) + offs_t
        tl.store(slot + pid_k * tile, acc, cache_modifier=".cg")
        tl.debug_barrier()  # all threads' stores happen before the release below
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        last = arrived == SPLIT_K - 1
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(slot + s * tile, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid, 0)
    else:
        last = True
    # ---- epilogue: zero point, scales, bias ----------------------------------
    if last:
        _epilogue(acc, sx, zx, sw_ptr, rs_ptr, bias_ptr, c_ptr, rows, cols, offs_m, offs_n,
                  M, N, stride_cm, A_BITS, HAS_BIAS, USE_ASM, BLOCK_M, BLOCK_N)


@triton.jit
def _epilogue(acc, sx, zx, sw_ptr, rs_ptr, bias_ptr, c_ptr, rows, cols, offs_m, offs_n,
              M, N, stride_cm, A_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    sw = tl.load(sw_ptr + cols)
    if A_BITS == 16:
        y = _mul_rn(acc, tl.broadcast_to(sw[None, :], (BLOCK_M, BLOCK_N)), USE_ASM)
    else:
        rs = tl.load(rs_ptr + cols).to(tl.float32)
        # same float32 operations, same order as format.w4a4_matmul_ref; zx * rs
        # is exact (integers < 2^24), so a fused multiply-subtract changes nothing
        scl = tl.broadcast_to(sx[:, None] * sw[None, :], (BLOCK_M, BLOCK_N))
        y = _mul_rn(scl, acc.to(tl.float32) - zx[:, None] * rs[None, :], USE_ASM)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, group=8, split=1):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SPLIT_K": split},
                         num_warps=warps, num_stages=stages)


# Tile candidates per M bucket. Small M (decode) is bound by weight bytes:
# narrow N tiles give every SM a share of the weight stream, deep K tiles
# keep enough bytes in flight. Large M is bound by the MMA rate: big tiles.
_CONFIGS = {
    16: [_cfg(16, 32, 256, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 64, 256, 4, 3),
         _cfg(16, 32, 128, 4, 5), _cfg(16, 128, 128, 4, 3), _cfg(16, 16, 256, 4, 4),
         # split-K: the first run measured ~1 TB/s for the 8-34 MB weights with one
         # CTA per (16 x BLOCK_N) tile: too few bytes in flight per SM
         _cfg(16, 32, 256, 4, 3, split=2), _cfg(16, 32, 128, 4, 4, split=4),
         _cfg(16, 64, 256, 4, 3, split=2), _cfg(16, 64, 128, 4, 4, split=4),
         _cfg(16, 128, 128, 4, 4, split=2)],
    64: [_cfg(32, 64, 128, 4, 4), _cfg(64, 64, 128, 4, 4), _cfg(64, 32, 256, 4, 3),
         _cfg(32, 32, 256, 4, 4), _cfg(64, 128, 128, 4, 3),
         _cfg(64, 64, 128, 4, 4, split=2), _cfg(32, 64, 128, 4, 4, split=4)],
    256: [_cfg(64, 128, 128, 4, 4), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 128, 4, 4),
          _cfg(64, 256, 64, 8, 4), _cfg(64, 64, 128, 4, 4),
          # the run without these reached only ~630 TOPS on gate_up at M = 256
          _cfg(128, 128, 128, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 128, 4, 4, split=2)],
    1 << 30: [_cfg(128, 128, 128, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(128, 256, 128, 8, 3),
              _cfg(256, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(128, 128, 128, 4, 4),
              _cfg(128, 256, 64, 8, 4), _cfg(256, 128, 128, 8, 3)],
}
_ALL_CONFIGS = [c for cs in _CONFIGS.values() for c in cs]


def _m_range(M: int) -> int:
    """The key of :data:`_CONFIGS` whose tile list serves M."""
    for b in _CONFIGS:
        if M <= b:
            return b
    return 1 << 30


def _m_bucket(M: int) -> int:
    """Autotuning key: M rounded up to a power of two (capped at 8192)."""
    return min(triton.next_power_of_2(max(M, 1)), 8192)


# Split-K workspace: one int32 tile per (output tile, split) plus one arrival counter
# per output tile, zero between calls (the last split resets it), cached per device.
# One GEMM at a time per device uses it (one stream, as in vLLM's forward).
WORKSPACE_INTS = 1 << 22
WORKSPACE_TILES = 1 << 14
_WORKSPACES: dict = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(WORKSPACE_INTS, dtype=torch.int32, device=device),
                            torch.zeros(WORKSPACE_TILES, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _split_fits(M: int, N: int, kw: dict) -> bool:
    if kw.get("SPLIT_K", 1) == 1:
        return True
    tiles = triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"])
    return (tiles <= WORKSPACE_TILES
            and tiles * kw["SPLIT_K"] * kw["BLOCK_M"] * kw["BLOCK_N"] <= WORKSPACE_INTS)


# Split-K candidates stay out of autotuning unless SPINQUANT_TUNE_SPLIT_K=1. At M=16,
# K=14336, N=4096 the tile 16x64x128 with SPLIT_K=4 and int8 activations gave a bf16 + bias
# result different from the reference right after an exact fp32 call (H100 GPU tests,
# session 3; the tuned call at that shape failed the same way in session 2). The reduction
# then added each split's tile into a shared workspace with tensor atomics; it now stores
# per-split slices and sums them in order; that version passed every H100 GPU test in
# session 4, with and without split-K in tuning. Tuning leaves it out by default until the
# serving benchmarks have run with it; explicit configs (tests, benchmarks) reach it always.
TUNE_SPLIT_K = os.environ.get("SPINQUANT_TUNE_SPLIT_K", "0") == "1"


def _prune(configs, named_args, **kwargs):
    keep = [c for c in _CONFIGS[_m_range(named_args["M_BUCKET"])]
            if TUNE_SPLIT_K or c.kwargs["SPLIT_K"] == 1]
    M, N = named_args["M"], named_args["N"]
    float_acc = kwargs.get("A_BITS", named_args.get("A_BITS")) == 16
    return [c for c in configs if any(c.kwargs == k.kwargs and c.num_warps == k.num_warps
                                      and c.num_stages == k.num_stages for k in keep)
            and _split_fits(M, N, c.kwargs) and not (float_acc and c.kwargs["SPLIT_K"] > 1)]


_tuned_kernel = triton.autotune(
    configs=_ALL_CONFIGS, key=["M_BUCKET", "N", "KH", "A_BITS", "MMA_FP8"],
    prune_configs_by={"early_config_prune": _prune},
    # shorter timing runs than the default (25 / 100 ms): ~6 candidates per shape
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles),
    # keep each key's choice in Triton's on-disk cache: vLLM captures CUDA graphs at up to 51
    # batch sizes (10 M buckets x 4 layer shapes to tune), and a server restarted on the same
    # machine then skips the tuning. Engine start-up with CUDA graphs took 80-130 s on the H100
    # before this; how much of that was tuning is not measured yet.
    cache_results=True,
)(_w4ax_gemm_kernel)

# Fixed small tiles for the CPU interpreter (and for tests that pick a tile).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1}


def _launch(a, qweight, sx, zx, scale, rowsum, bias, out, M, N, K, a_bits, mma, config=None, clip=1.0):
    if mma not in MMA_KINDS:
        raise ValueError(f"mma must be one of {list(MMA_KINDS)}, got {mma!r}")
    if mma == "fp8" and a_bits in (0, 8):
        # e4m3 holds every integer in [-16, 16] exactly, not int8 codes
        raise ValueError("mma='fp8' needs packed int4 activations (codes in [-8, 7]); "
                         "int8 activations (W4A8) run on mma='int8'")
    if M == 0 or N == 0:
        return out
    KH = K // 2
    if a.stride(1) != 1:
        a = a.contiguous()
    ws, cnt = _workspace(a.device)
    args = (a, qweight, sx if sx is not None else scale, zx if zx is not None else scale,
            scale, rowsum, bias if bias is not None else scale, out, ws, cnt,
            M, N, KH, _m_bucket(M), float(clip), a.stride(0), qweight.stride(0), out.stride(0))
    meta = dict(A_BITS=a_bits, MMA_FP8=(mma == "fp8" and a_bits == 4), HAS_BIAS=bias is not None,
                USE_ASM=not _interpreting())
    if config is None and _interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = dict(config)
        cfg.setdefault("SPLIT_K", 1)
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 2)
        if not _split_fits(M, N, cfg):
            raise ValueError(f"split-K config {cfg} needs more than the workspace's "
                             f"{WORKSPACE_TILES} tiles / {WORKSPACE_INTS} int32")
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _w4ax_gemm_kernel[grid](*args, **meta, EVEN_K=KH % cfg["BLOCK_K"] == 0, **cfg,
                                num_warps=warps, num_stages=stages)
    else:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]), m["SPLIT_K"])
        # every tuned BLOCK_K divides the K/2 of the real shapes; EVEN_K is decided per config
        even = all(KH % c.kwargs["BLOCK_K"] == 0 for c in _CONFIGS[_m_range(M)])
        _tuned_kernel[grid](*args, **meta, EVEN_K=even)
    return out


def tuned_configs() -> dict[str, str]:
    """The autotuner's choice per key (M bucket, N, K/2, act bits, fp8), as strings."""
    return {str(k): str(v) for k, v in _tuned_kernel.cache.items()}


def _check_act(sx, zx, M):
    for name, t in (("sx", sx), ("zx", zx)):
        if t.dtype != torch.float32 or t.numel() != M:
            raise ValueError(f"{name} must be (M={M}, 1) float32, got {tuple(t.shape)} {t.dtype}")


def w4a4_gemm(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, w, out_dtype=torch.bfloat16,
              bias: torch.Tensor | None = None, mma: str | None = None, config: dict | None = None
              ) -> torch.Tensor:
    """W4A4 (or W4A8) GEMM on packed codes; equivalent to :func:`w4a4_gemm_ref`.

    qx: (M, K/2) uint8 packed int4 codes (W4A4) or (M, K) int8 codes (W4A8, or
    int4 codes one per byte from ``hadamard_quant(..., pack=False)``: same kernel);
    sx, zx: (M, 1) float32 per-token scale and integer-valued zero point;
    w: ``linear.PackedW4`` or ``(qweight (N, K/2) uint8, scale (N,) f32, rowsum (N,) int32)``;
    out_dtype: bf16, fp16 or fp32; bias: (N,) or None; mma: "int8" or "fp8"
    (default :data:`DEFAULT_MMA`); config: a fixed tile (skips autotuning).
    Returns (M, N) in out_dtype.
    """
    qweight, scale, rowsum, N, K = _weight_tensors(w)
    bits = _act_bits(qx, K)
    M = qx.shape[0]
    _check_act(sx, zx, M)
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    if qx.device != qweight.device:
        raise ValueError(f"qx is on {qx.device} but the weight is on {qweight.device}")
    out = torch.empty((M, N), dtype=out_dtype, device=qx.device)
    return _launch(qx, qweight, sx.reshape(M).contiguous(), zx.reshape(M).contiguous(), scale, rowsum,
                   bias, out, M, N, K, bits, mma or DEFAULT_MMA, config)


# Largest M for which w4ax_linear quantizes inside the GEMM (no hadamard_quant
# launch). Every program re-reads its rows' full K for the per-token range and
# computes codes in the main loop: on the H100 that made the decode layer
# slower (qkv M=1: 22.8 us vs 13.6 us for hadamard_quant + w4a4_gemm), so the
# linear does not use it; the kernel stays, tested, for a later tile design.
QUANT_GEMM_MAX_M = 0  # off: measured slower than the two launches (docs/KERNELS.md)


def w4a4_quant_gemm_ref(x: torch.Tensor, w, out_dtype=None, bias: torch.Tensor | None = None,
                        clip: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """Reference of :func:`w4a4_quant_gemm`: ``format.quantize_act`` (4 bits) then the exact W4A4 product."""
    q, s, z = fmt.quantize_act(x.float(), 4, clip)
    return w4a4_gemm_ref(q, s, z, w, out_dtype or x.dtype, bias)


def w4a4_quant_gemm(x: torch.Tensor, w, out_dtype=None, bias: torch.Tensor | None = None,
                    clip: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """Decode path: per-token int4 quantization of ``x`` inside the W4A4 GEMM.

    x: (M, K) bf16/fp16 (fp32 accepted), no Hadamard; w: PackedW4 or its
    tensors. Bit-identical to ``w4a4_gemm(*hadamard_quant(x, 0, 4, clip), w)``
    (same arithmetic for scale, zero and codes), one launch instead of two;
    equivalent to :func:`w4a4_quant_gemm_ref` up to the rare rounding ties of
    hadamard_quant. Returns (M, N) in out_dtype (x's by default).
    """
    qweight, scale, rowsum, N, K = _weight_tensors(w)
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be (M, K={K}), got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if not 0.0 < float(clip) <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    M = x.shape[0]
    out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if _interpreting() and x.dtype == torch.bfloat16:
        x = x.float()  # the interpreter has no bfloat16 arithmetic; same values
    return _launch(x, qweight, None, None, scale, rowsum, bias, out, M, N, K, 0, "int8", config, clip)


def w4a16_supported(K: int, N: int) -> tuple[bool, str]:
    """Whether :func:`w4a16_gemm` handles the shape: ``(ok, reason)``."""
    if K % 2:
        return False, f"w4a16_gemm: K must be even, got K={K}"
    return True, ""


def w4a16_gemm(x: torch.Tensor, w, out_dtype=None, bias: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """Weight-only W4A16 GEMM (int4 weights unpacked in registers); equivalent to :func:`w4a16_gemm_ref`.

    x: (M, K) bf16 or fp16; w: PackedW4 or its tensors; returns (M, N) in
    out_dtype (x's by default). Float accumulation: matches the reference to
    float32 rounding, not bit for bit.
    """
    qweight, scale, rowsum, N, K = _weight_tensors(w)
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be (M, K={K}), got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w4a16_gemm needs bf16 or fp16 activations, got {x.dtype}")
    M = x.shape[0]
    out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if _interpreting() and x.dtype == torch.bfloat16:
        # the interpreter has no bfloat16 arithmetic: exact float32 products there
        x = x.float()
    return _launch(x, qweight, None, None, scale, rowsum, bias, out, M, N, K, 16, "int8", config)
