"""Fused block Hadamard + per-token asymmetric quantization (one read of x, one write).

``hadamard_quant(x (M, K), had_size, bits, clip) -> (q, scale (M, 1) f32, zero (M, 1) f32)``
is equivalent to :func:`hadamard_quant_ref`: ``hadamard_transform_ref`` in
float32 over blocks of ``had_size`` elements of K (none when 0), then
``format.quantize_act`` (centred codes, ``x ~= scale * (q - zero)``), then
``format.pack_int4`` for 4 bits. ``q`` is (M, K/2) uint8 for bits=4 and
(M, K) int8 for bits=8.

How the kernel computes ``x @ (I_{K/n} (x) H_n) / sqrt(n)`` for ``n = m * 2^k``:
the row is held in registers as a tile ``X (C, P)`` of C = K/P chunks of P
(a power of two, at most 128, dividing 2^k).  ``H_n = H_{n/P} (x) H_P`` with
``H_{n/P} = H_m (x) H_{2^k/P}``, so the transform is two tensor-core products:
``Y = X @ H_P`` (inner, over each chunk) and ``Z = B^T @ Y`` with
``B = I_{K/n} (x) H_{n/P}`` (outer, across chunks; C padded to a power of two
with zero rows, which leave the min/max untouched because the quantization
range always includes 0).  Both matrices hold +-1 (exact in bf16); x in bf16 or
fp16 enters the first product exactly; fp32 operands are split into a bf16
high part and a bf16 remainder (two products, ~16 mantissa bits) so the codes
match the float32 reference except for rare rounding ties.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from . import format as fmt
from .hadamard import _sylvester, base_hadamard, decompose, hadamard_transform_ref

# Largest register tile (C_PAD * P elements) one program holds: 16384 fp32 per
# row is 64 registers per thread with 8 warps.
_MAX_TILE = 32768
_MAX_P = 128


# ----------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------
def hadamard_quant_ref(x: torch.Tensor, had_size: int = 0, bits: int = 4, clip: float = 1.0,
                       pack: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of :func:`hadamard_quant` (same signature and outputs)."""
    _check(x, had_size, bits, clip)
    xf = x.float()
    if had_size:
        xf = hadamard_transform_ref(xf, had_size)
    q, s, z = fmt.quantize_act(xf, bits, clip)
    if bits == 4 and pack:
        q = fmt.pack_int4(q)
    return q, s, z


def hadamard_only_ref(x: torch.Tensor, had_size: int) -> torch.Tensor:
    """Block Hadamard in float32, returned in x's dtype: ``(M, K) -> (M, K)``."""
    return hadamard_transform_ref(x.float(), had_size).to(x.dtype)


# ----------------------------------------------------------------------------
# checks and tiling
# ----------------------------------------------------------------------------
def _check(x: torch.Tensor, had_size: int, bits: int, clip: float) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = x.shape[1]
    if K % 2:
        raise ValueError(f"K must be even (two int4 codes per byte), got K={K}")
    if had_size < 0 or (had_size and K % had_size):
        raise ValueError(f"had_size must be 0 or divide K={K}, got {had_size}")
    if not 0.0 < float(clip) <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")


@functools.lru_cache(maxsize=256)
def _tiling(K: int, had_size: int) -> tuple[int, int, int]:
    """(P, C, C_PAD): chunk length, number of chunks K/P, chunks padded to a power of two."""
    if had_size:
        m, p2 = decompose(had_size)
        P = min(p2, _MAX_P)
    else:
        P = 2
        while P < _MAX_P and K % (2 * P) == 0:
            P *= 2
    C = K // P
    c_pad = triton.next_power_of_2(C)
    if had_size:
        c_pad = max(c_pad, 16)  # tl.dot needs every dimension >= 16
    return P, C, c_pad


@functools.lru_cache(maxsize=256)
def hadamard_quant_supported(K: int, had_size: int = 0, bits: int = 4) -> tuple[bool, str]:
    """Whether the Triton kernel handles this shape: ``(ok, reason)`` (cached: it runs per call)."""
    if bits not in (4, 8, 16):
        return False, f"hadamard_quant: bits must be 4 or 8 (16 = Hadamard only), got {bits}"
    if K % 2:
        return False, f"hadamard_quant: K must be even, got K={K}"
    if had_size:
        if K % had_size:
            return False, f"hadamard_quant: had_size {had_size} must divide K={K}"
        try:
            m, p2 = decompose(had_size)
        except ValueError as e:
            return False, f"hadamard_quant: {e}"
        if p2 < 16:
            return False, (f"hadamard_quant: the power-of-two factor of had_size={had_size} "
                           f"(= {m} x {p2}) must be >= 16 for the tensor-core transform, got {p2}")
    P, C, c_pad = _tiling(K, had_size)
    if c_pad * P > _MAX_TILE:
        return False, (f"hadamard_quant: a row of K={K} needs a {c_pad}x{P} register tile, "
                       f"above the {_MAX_TILE}-element limit")
    return True, ""


@functools.lru_cache(maxsize=64)
def _matrices_cpu(K: int, had_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_P (P, P), B^T (C_PAD, C_PAD)) as +-1/0 float64 on CPU."""
    P, C, c_pad = _tiling(K, had_size)
    m, p2 = decompose(had_size)
    inner = _sylvester(int(math.log2(P)))
    outer = torch.kron(base_hadamard(m), _sylvester(int(math.log2(p2 // P))))  # H_{n/P}
    B = torch.kron(torch.eye(K // had_size, dtype=torch.float64), outer)        # (C, C)
    bt = torch.zeros(c_pad, c_pad, dtype=torch.float64)
    bt[:C, :C] = B.T
    return inner, bt


_DEVICE_CACHE: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# How the GPU kernel forms v / scale for the codes (both meant to give the IEEE quotient, bit for bit):
# "fma" (default) one IEEE reciprocal per row, then per element q = v * inv corrected by one
# FMA residual step (Markstein: with inv correctly rounded and q within an ulp,
# q + (v - q * scale) * inv rounds to the IEEE quotient; v * inv alone can miss by a little more
# than an ulp in rare cases), three instructions instead of the division's subroutine;
# "div" an IEEE division per element (`div.rn`), kept as the fallback and as the comparator of
# the GPU test that holds "fma" to it (tests/kernels/test_hadamard_quant.py). H100, session 5,
# one run: the same codes at every tested shape (random and tie-heavy rows; the correction's
# exactness is Markstein's argument, not proven here for every scale), and down_proj's layer (14336 Hadamard) at
# M = 2048 in 326 us against 467 us with "div" (docs/KERNELS.md). The interpreter always divides.
QUOTIENT_ENV = "SPINQUANT_HQ_QUOTIENT"
QUOTIENT_MODES = ("div", "fma")


def quotient_mode() -> str:
    """The quotient of the GPU kernel (``$SPINQUANT_HQ_QUOTIENT``, read at each launch)."""
    mode = os.environ.get(QUOTIENT_ENV, "fma")
    if mode not in QUOTIENT_MODES:
        raise ValueError(f"{QUOTIENT_ENV} must be one of {list(QUOTIENT_MODES)}, got {mode!r}")
    return mode


def _matrices(K: int, had_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # float32 under the interpreter (it has no bfloat16 arithmetic), bf16 on the GPU
    dtype = torch.float32 if _interpreting() else torch.bfloat16
    key = (K, had_size, str(device), dtype)
    if key not in _DEVICE_CACHE:
        inner, bt = _matrices_cpu(K, had_size)
        _DEVICE_CACHE[key] = (inner.to(device=device, dtype=dtype).contiguous(),
                              bt.to(device=device, dtype=dtype).contiguous())
    return _DEVICE_CACHE[key]


# ----------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------
@triton.jit
def _rint(v):
    # round half to even, exactly like torch.round, for |v| < 2**22: adding
    # 1.5 * 2**23 leaves no fraction bits in float32
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _mul_rn(a, b, USE_ASM: tl.constexpr):
    """float32 a * b rounded on its own: an explicit ``mul.rn`` is never fused
    into an FMA with a following add (the W4A4 epilogue's bias, the rounding
    trick of :func:`_rint`), so every kernel rounds the same way."""
    if USE_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _quotient(v, scale):
    """v / scale for the codes: the IEEE (correctly rounded) quotient, as
    ``format.quantize_asym`` computes it, on the GPU and in the interpreter.

    Not ``v * (1 / scale)``: that differs from the IEEE quotient by up to an
    ulp, and worse, the compiler contracts the product with the ``+ 1.5 * 2**23``
    of :func:`_rint` into one FMA, which rounds the *unrounded* product
    ``v * inv`` to an integer. Where ``v / scale`` rounds to an exact ``k + 0.5``
    (common with bf16 inputs and 8-bit codes: the H100 run had 1.3% of codes
    at such ties for K = 14336) that product sits just above or below the tie,
    by the sign of inv's rounding error times v, so about half of the ties
    went the other way from torch.round's half-to-even. ``div.rn`` is an
    opaque correctly rounded result: no contraction, ties round half-even."""
    return tl.div_rn(v, scale)


@triton.jit
def _quotient_fma(v, scale, inv):
    """v / scale from inv = div_rn(1, scale): ``q = v * inv``, ``r = v - q * scale`` (exact in
    one FMA), ``q + r * inv``, all in one asm block so no step is fused or reordered."""
    return tl.inline_asm_elementwise(
        "{ .reg .f32 q, nq, r; mul.rn.f32 q, $1, $3; neg.f32 nq, q; "
        "fma.rn.f32 r, nq, $2, $1; fma.rn.f32 $0, r, $3, q; }",
        "=r,r,r,r", [v, scale, inv], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _hadamard_quant_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr, z_ptr, h_ptr, bt_ptr,
    # sizes
    M, inv_sqrt_n, clip,
    # strides
    stride_xm, stride_qm,
    # meta-parameters
    C: tl.constexpr, C_PAD: tl.constexpr, P: tl.constexpr,
    HAD: tl.constexpr, OUTER: tl.constexpr, X_KIND: tl.constexpr, BITS: tl.constexpr,
    DOT_F32: tl.constexpr, PACK: tl.constexpr, USE_ASM: tl.constexpr, QUOT_FMA: tl.constexpr,
):
    # X_KIND: 0 bf16, 1 fp16, 2 fp32.  BITS: 4 or 8 (quantize), 16 (Hadamard only).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_c = tl.arange(0, C_PAD)
    offs_p = tl.arange(0, P)
    idx = offs_c[:, None] * P + offs_p[None, :]
    cmask = offs_c[:, None] < C
    if HAD:
        H = tl.load(h_ptr + offs_p[:, None] * P + offs_p[None, :])
        if X_KIND == 1 and not DOT_F32:
            H = H.to(tl.float16)
        if OUTER:
            BT = tl.load(bt_ptr + offs_c[:, None] * C_PAD + offs_c[None, :])
    for row in range(pid, M, nprog):
        x = tl.load(x_ptr + row * stride_xm + idx, mask=cmask, other=0.0)
        # ---- block Hadamard ------------------------------------------------
        if HAD and DOT_F32:
            # the interpreter has no bfloat16 arithmetic: exact float32 products there
            y = tl.dot(x.to(tl.float32), H, input_precision="ieee")
            if OUTER:
                y = tl.dot(BT, y, input_precision="ieee")
            v = y * inv_sqrt_n
        elif HAD:
            if X_KIND == 2:
                x_hi = x.to(tl.bfloat16)
                x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
                y = tl.dot(x_hi, H) + tl.dot(x_lo, H)
            else:
                y = tl.dot(x, H)
            if OUTER:
                y_hi = y.to(tl.bfloat16)
                y_lo = (y - y_hi.to(tl.float32)).to(tl.bfloat16)
                y = tl.dot(BT, y_hi) + tl.dot(BT, y_lo)
            v = y * inv_sqrt_n
        else:
            v = x.to(tl.float32)
        if BITS == 16:
            tl.store(q_ptr + row * stride_qm + idx, v.to(q_ptr.dtype.element_ty), mask=cmask)
        else:
            # ---- per-token asymmetric parameters (format.asym_params) ----------
            QMIN: tl.constexpr = -(1 << (BITS - 1))
            QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
            LEVELS: tl.constexpr = (1 << BITS) - 1
            lo = tl.minimum(tl.min(tl.min(v, axis=1), axis=0), 0.0) * clip
            hi = tl.maximum(tl.max(tl.max(v, axis=1), axis=0), 0.0) * clip
            scale = tl.maximum(tl.div_rn(hi - lo, LEVELS * 1.0), 1e-8)
            zero = tl.minimum(tl.maximum(_rint(QMIN - tl.div_rn(lo, scale)), QMIN), QMAX)
            if QUOT_FMA and USE_ASM:
                # the IEEE quotient from one division per row (see QUOTIENT_MODES)
                inv = tl.div_rn(1.0, scale)
                t = _quotient_fma(v, tl.broadcast_to(scale, v.shape), tl.broadcast_to(inv, v.shape))
            else:
                # IEEE division per element, as format.quantize_asym (see _quotient)
                t = _quotient(v, tl.broadcast_to(scale, v.shape))
            q = tl.minimum(tl.maximum(_rint(t) + zero, QMIN), QMAX).to(tl.int32)
            tl.store(s_ptr + row, scale)
            tl.store(z_ptr + row, zero)
            # ---- codes ------------------------------------------------------
            if BITS == 4 and PACK:
                even, odd = tl.split(tl.reshape(q, (C_PAD, P // 2, 2)))
                packed = ((even & 15) | ((odd & 15) << 4)).to(tl.uint8)
                offs_j = tl.arange(0, P // 2)
                tl.store(q_ptr + row * stride_qm + offs_c[:, None] * (P // 2) + offs_j[None, :],
                         packed, mask=cmask)
            else:
                tl.store(q_ptr + row * stride_qm + idx, q.to(tl.int8), mask=cmask)


# Launch heuristics (benchmarks/kernels.py --hq-sweep measures them): programs
# per SM of the persistent row loop and warps per program (None: by the tile).
# Measured on the H100 at M = 4096: the 14336 Hadamard (one 224 KB-smem program
# per SM) is best with 1 program per SM and 8 warps; K = 4096 without a
# Hadamard with 8 programs per SM (4 warps).
TUNING = {"programs_per_sm": None, "num_warps": None}


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(x: torch.Tensor, had_size: int, bits: int, clip: float, out: torch.Tensor,
            s: torch.Tensor | None, z: torch.Tensor | None, pack: bool = True) -> None:
    M, K = x.shape
    ok, why = hadamard_quant_supported(K, had_size, bits)
    if not ok:
        raise ValueError(why)
    if M == 0:
        return
    P, C, c_pad = _tiling(K, had_size)
    outer = bool(had_size) and had_size > P  # H_{n/P} is the identity otherwise
    if had_size:
        H, BT = _matrices(K, had_size, x.device)
    else:
        H = BT = x  # unused
    if x.stride(1) != 1:
        x = x.contiguous()
    tile = c_pad * P
    num_warps = TUNING["num_warps"] or (8 if tile >= 8192 else 4)
    if x.device.type == "cuda":
        pps = TUNING["programs_per_sm"] or (1 if had_size and tile >= 8192 else 8)
        grid = (min(M, pps * _sm_count(x.device)),)
    else:
        grid = (M,)
    x_kind = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[x.dtype]
    _hadamard_quant_kernel[grid](
        x, out, s if s is not None else out, z if z is not None else out, H, BT,
        M, 1.0 / math.sqrt(had_size) if had_size else 1.0, float(clip),
        x.stride(0), out.stride(0),
        C=C, C_PAD=c_pad, P=P, HAD=bool(had_size), OUTER=outer, X_KIND=x_kind, BITS=bits,
        DOT_F32=_interpreting(), PACK=pack, USE_ASM=not _interpreting(),
        QUOT_FMA=quotient_mode() == "fma", num_warps=num_warps,
    )


def hadamard_quant(x: torch.Tensor, had_size: int = 0, bits: int = 4, clip: float = 1.0,
                   pack: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused block Hadamard + per-token asymmetric quantization; equivalent to :func:`hadamard_quant_ref`.

    x: (M, K) bf16, fp16 or fp32 (last dim contiguous); had_size: 0 (none) or a
    Hadamard order m * 2^k dividing K; bits: 4 or 8; clip in (0, 1].
    Returns ``q`` ((M, K/2) uint8 packed for bits=4, (M, K) int8 for bits=8, or
    (M, K) int8 codes in [-8, 7] for bits=4 with ``pack=False``),
    ``scale (M, 1) float32`` and ``zero (M, 1) float32`` (integer-valued).
    """
    _check(x, had_size, bits, clip)
    M, K = x.shape
    packed = bits == 4 and pack
    q = torch.empty((M, K // 2) if packed else (M, K),
                    dtype=fmt.PACKED_DTYPE if packed else fmt.CODE_DTYPE, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    z = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    _launch(x, had_size, bits, clip, q, s, z, pack=packed)
    return q, s, z


def hadamard_only(x: torch.Tensor, had_size: int) -> torch.Tensor:
    """Block Hadamard of ``x (M, K)`` in x's dtype (float32 inside); equivalent to :func:`hadamard_only_ref`."""
    _check(x, had_size, 4, 1.0)
    out = torch.empty_like(x)
    _launch(x, had_size, 16, 1.0, out, None, None)
    return out
