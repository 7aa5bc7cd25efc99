"""W4A4 / W4A8 / W4A16 GEMMs on packed int4 weights, on Hopper's int8 tensor cores.

``w4a4_gemm(qx, sx, zx, w, out_dtype)`` computes, equivalently to :func:`w4a4_gemm_ref`,

    y = sx * sw * (qx @ qw.T - zx * rowsum(qw)) (+ bias)        (M, N)

with the codes read packed: activations ``qx (M, K/2) uint8`` (W4A4) or
``(M, K) int8`` (W4A8, or int4 codes one per byte), weights ``w.qweight (N, K/2)
uint8`` in the ``format.pack_int4`` layout.  No interleave is needed to unpack:
byte j of a row holds codes 2j (low nibble) and 2j+1 (high nibble) in both
operands, so ``sum_k a_k w_k = lo(A) . lo(W) + hi(A) . hi(W)``, two int8 dots
of K/2 per step with an int32 accumulator (exact).

The zero-point correction ``- zx * rowsum`` and both scales are applied in the
epilogue; the float32 result is bit-identical to ``format.w4a4_matmul_ref``
because the epilogue performs the same float32 operations in the same order on
the same exact integers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import format as fmt
from ._common import interpreting, mul_rn


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
                  bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
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
# with nibble n, ((n ^ 0x88) - 0x08) ^ 0x80 is n sign-extended to int8 (the 4-bit
# two's complement of the format: 0x8 is the sign bit of a nibble, 0x80 of a byte).
# The 0x80 bit keeps every byte >= 8 during the subtraction so no borrow crosses
# bytes. ~4 instructions per 4 codes where int8 element-wise shifts cost ~4 per
# code (the element-wise unpack made the main loop ALU-bound in the PTX).
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
    a_ptr, w_ptr, sx_ptr, zx_ptr, sw_ptr, rs_ptr, bias_ptr, c_ptr,
    # sizes
    M, N, KH, M_BUCKET,
    # strides
    stride_am, stride_wn, stride_cm,
    # meta-parameters
    A_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A_BITS: 4 (a packed like w), 8 (int8 codes), 16 (bf16/fp16 activations, weight-only).
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
    n_iter = tl.cdiv(KH, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :]
    if A_BITS == 4:
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    else:
        # unpacked activations: one contiguous (BLOCK_M, 2 * BLOCK_K) tile, split into even / odd k
        offs_k2 = tl.arange(0, 2 * BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k2[None, :]
    if A_BITS == 16:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # ---- main loop ------------------------------------------------------------
    for k in range(0, n_iter):
        if EVEN_K:
            wb = tl.load(w_ptrs)
        else:
            kmask = offs_k[None, :] < KH - k * BLOCK_K
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
            a_lo, a_hi = tl.split(tl.reshape(a2, (BLOCK_M, BLOCK_K, 2)))
        if A_BITS == 16:
            acc = tl.dot(a_lo, tl.trans(w_lo.to(a_lo.dtype)), acc)
            acc = tl.dot(a_hi, tl.trans(w_hi.to(a_hi.dtype)), acc)
        else:
            acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
        w_ptrs += BLOCK_K
        if A_BITS == 4:
            a_ptrs += BLOCK_K
        else:
            a_ptrs += 2 * BLOCK_K
    # ---- epilogue: zero point, scales, bias ----------------------------------
    sw = tl.load(sw_ptr + cols)
    if A_BITS == 16:
        y = mul_rn(acc, tl.broadcast_to(sw[None, :], (BLOCK_M, BLOCK_N)), USE_ASM)
    else:
        sx = tl.load(sx_ptr + rows)
        zx = tl.load(zx_ptr + rows)
        rs = tl.load(rs_ptr + cols).to(tl.float32)
        # same float32 operations, same order as format.w4a4_matmul_ref; zx * rs
        # is exact (integers < 2^24), so a fused multiply-subtract changes nothing
        scl = tl.broadcast_to(sx[:, None] * sw[None, :], (BLOCK_M, BLOCK_N))
        y = mul_rn(scl, acc.to(tl.float32) - zx[:, None] * rs[None, :], USE_ASM)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Tile candidates per M bucket. Small M (decode) is bound by weight bytes:
# narrow N tiles give every SM a share of the weight stream, deep K tiles
# keep enough bytes in flight. Large M is bound by the MMA rate: big tiles.
_CONFIGS = {
    16: [_cfg(16, 32, 256, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 64, 256, 4, 3),
         _cfg(16, 32, 128, 4, 5), _cfg(16, 128, 128, 4, 3), _cfg(16, 16, 256, 4, 4)],
    64: [_cfg(32, 64, 128, 4, 4), _cfg(64, 64, 128, 4, 4), _cfg(64, 32, 256, 4, 3),
         _cfg(32, 32, 256, 4, 4), _cfg(64, 128, 128, 4, 3)],
    256: [_cfg(64, 128, 128, 4, 4), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 128, 4, 4),
          _cfg(64, 256, 64, 8, 4), _cfg(64, 64, 128, 4, 4),
          # without these gate_up reached only ~630 TOPS at M = 256
          _cfg(128, 128, 128, 8, 3), _cfg(128, 256, 64, 8, 3)],
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


def _prune(configs, named_args, **kwargs):
    keep = _CONFIGS[_m_range(named_args["M_BUCKET"])]
    return [c for c in configs if any(c.kwargs == k.kwargs and c.num_warps == k.num_warps
                                      and c.num_stages == k.num_stages for k in keep)]


_tuned_kernel = triton.autotune(
    configs=_ALL_CONFIGS, key=["M_BUCKET", "N", "KH", "A_BITS"],
    prune_configs_by={"early_config_prune": _prune},
    # shorter timing runs than the default (25 / 100 ms): ~6 candidates per shape
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles),
    # keep each key's choice in Triton's on-disk cache: vLLM captures CUDA graphs at up to 51
    # batch sizes (10 M buckets x 4 layer shapes to tune), and a server restarted on the same
    # machine then skips the tuning
    cache_results=True,
)(_w4ax_gemm_kernel)

# Fixed small tiles for the CPU interpreter (and for tests that pick a tile).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _launch(a, qweight, sx, zx, scale, rowsum, bias, out, M, N, K, a_bits, config=None):
    if M == 0 or N == 0:
        return out
    KH = K // 2
    if a.stride(1) != 1:
        a = a.contiguous()
    args = (a, qweight, sx if sx is not None else scale, zx if zx is not None else scale,
            scale, rowsum, bias if bias is not None else scale, out,
            M, N, KH, _m_bucket(M), a.stride(0), qweight.stride(0), out.stride(0))
    meta = dict(A_BITS=a_bits, HAS_BIAS=bias is not None, USE_ASM=not interpreting())
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = dict(config)
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 2)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _w4ax_gemm_kernel[grid](*args, **meta, EVEN_K=KH % cfg["BLOCK_K"] == 0, **cfg,
                                num_warps=warps, num_stages=stages)
    else:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
        # every tuned BLOCK_K divides the K/2 of the real shapes; EVEN_K is decided per config
        even = all(KH % c.kwargs["BLOCK_K"] == 0 for c in _CONFIGS[_m_range(M)])
        _tuned_kernel[grid](*args, **meta, EVEN_K=even)
    return out


def tuned_configs() -> dict[str, str]:
    """The autotuner's choice per key (M bucket, N, K/2, act bits), as strings."""
    return {str(k): str(v) for k, v in _tuned_kernel.cache.items()}


def _check_act(sx, zx, M):
    for name, t in (("sx", sx), ("zx", zx)):
        if t.dtype != torch.float32 or t.numel() != M:
            raise ValueError(f"{name} must be (M={M}, 1) float32, got {tuple(t.shape)} {t.dtype}")


def w4a4_gemm(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, w, out_dtype=torch.bfloat16,
              bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """W4A4 (or W4A8) GEMM on packed codes; equivalent to :func:`w4a4_gemm_ref`.

    qx: (M, K/2) uint8 packed int4 codes (W4A4) or (M, K) int8 codes (W4A8, or
    int4 codes one per byte from ``hadamard_quant(..., pack=False)``: same kernel);
    sx, zx: (M, 1) float32 per-token scale and integer-valued zero point;
    w: ``linear.PackedW4`` or ``(qweight (N, K/2) uint8, scale (N,) f32, rowsum (N,) int32)``;
    out_dtype: bf16, fp16 or fp32; bias: (N,) or None; config: a fixed tile
    (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` packed bytes, ``GROUP_M``, optional
    ``num_warps`` / ``num_stages``; skips autotuning). Returns (M, N) in out_dtype.
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
                   bias, out, M, N, K, bits, config)


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
    if interpreting() and x.dtype == torch.bfloat16:
        # the interpreter has no bfloat16 arithmetic: exact float32 products there
        x = x.float()
    return _launch(x, qweight, None, None, scale, rowsum, bias, out, M, N, K, 16, config)
