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

import torch
import triton
import triton.language as tl

from . import format as fmt
from ._common import interpreting, quotient_div, quotient_fma, rint, sm_count
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
    """Plain-PyTorch twin of :func:`hadamard_quant`: the same arguments (less the kernel's
    launch settings) and outputs."""
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


def _matrices(K: int, had_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # float32 under the interpreter (it has no bfloat16 arithmetic), bf16 on the GPU
    dtype = torch.float32 if interpreting() else torch.bfloat16
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
    QMIN: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
    DOT_F32: tl.constexpr, PACK: tl.constexpr, USE_ASM: tl.constexpr, QUOT_FMA: tl.constexpr,
):
    # X_KIND: 0 bf16, 1 fp16, 2 fp32.  BITS: 4 or 8 (quantize, codes in [QMIN, QMAX]),
    # 16 (Hadamard only).
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
            LEVELS: tl.constexpr = QMAX - QMIN
            lo = tl.minimum(tl.min(tl.min(v, axis=1), axis=0), 0.0) * clip
            hi = tl.maximum(tl.max(tl.max(v, axis=1), axis=0), 0.0) * clip
            scale = tl.maximum(tl.div_rn(hi - lo, LEVELS * 1.0), MIN_SCALE)
            zero = tl.minimum(tl.maximum(rint(QMIN - tl.div_rn(lo, scale)), QMIN), QMAX)
            if QUOT_FMA and USE_ASM:
                # the IEEE quotient from one division per row and a correction step per element
                inv = tl.div_rn(1.0, scale)
                t = quotient_fma(v, tl.broadcast_to(scale, v.shape), tl.broadcast_to(inv, v.shape))
            else:
                # IEEE division per element, as format.quantize_asym
                t = quotient_div(v, tl.broadcast_to(scale, v.shape))
            q = tl.minimum(tl.maximum(rint(t) + zero, QMIN), QMAX).to(tl.int32)
            tl.store(s_ptr + row, scale)
            tl.store(z_ptr + row, zero)
            # ---- codes ------------------------------------------------------
            if BITS == 4 and PACK:
                # two's complement nibbles, element 2j low (format.pack_int4)
                NIBBLE: tl.constexpr = (1 << BITS) - 1
                even, odd = tl.split(tl.reshape(q, (C_PAD, P // 2, 2)))
                packed = ((even & NIBBLE) | ((odd & NIBBLE) << BITS)).to(tl.uint8)
                offs_j = tl.arange(0, P // 2)
                tl.store(q_ptr + row * stride_qm + offs_c[:, None] * (P // 2) + offs_j[None, :],
                         packed, mask=cmask)
            else:
                tl.store(q_ptr + row * stride_qm + idx, q.to(tl.int8), mask=cmask)


def _launch(x: torch.Tensor, had_size: int, bits: int, clip: float, out: torch.Tensor,
            s: torch.Tensor | None, z: torch.Tensor | None, pack: bool = True,
            programs_per_sm: int | None = None, num_warps: int | None = None,
            quot_fma: bool = True) -> None:
    """Launch the kernel on ``x (M, K)`` into ``out`` (and ``s``, ``z`` (M, 1) f32 when quantizing).

    ``programs_per_sm`` / ``num_warps`` (None: by the tile) override the launch
    heuristics for benchmarking. ``quot_fma=False`` computes the codes' quotient
    by an IEEE division per element: the comparator of the GPU test that holds
    the production ``fma`` quotient to it.
    """
    M, K = x.shape
    ok, why = hadamard_quant_supported(K, had_size, bits)
    if not ok:
        raise ValueError(why)
    for name, v in (("programs_per_sm", programs_per_sm), ("num_warps", num_warps)):
        if v is not None and (type(v) is not int or v < 1):
            raise ValueError(f"hadamard_quant: {name} must be None or an int >= 1, got {v!r}")
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
    # Measured on the H100 at M = 4096 (benchmarks/kernels.py --hq-sweep): the 14336
    # Hadamard (one 224 KB-smem program per SM) is best with 1 program per SM and
    # 8 warps; K = 4096 without a Hadamard with 8 programs per SM and 4 warps.
    tile = c_pad * P
    num_warps = num_warps or (8 if tile >= 8192 else 4)
    if x.device.type == "cuda":
        pps = programs_per_sm or (1 if had_size and tile >= 8192 else 8)
        grid = (min(M, pps * sm_count(x.device)),)
    else:
        grid = (M,)
    x_kind = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[x.dtype]
    qmin, qmax = (fmt.qmin(bits), fmt.qmax(bits)) if bits < 16 else (0, 0)
    interp = interpreting()
    _hadamard_quant_kernel[grid](
        x, out, s if s is not None else out, z if z is not None else out, H, BT,
        M, 1.0 / math.sqrt(had_size) if had_size else 1.0, float(clip),
        x.stride(0), out.stride(0),
        C=C, C_PAD=c_pad, P=P, HAD=bool(had_size), OUTER=outer, X_KIND=x_kind, BITS=bits,
        QMIN=qmin, QMAX=qmax, MIN_SCALE=fmt.MIN_SCALE,
        DOT_F32=interp, PACK=pack, USE_ASM=not interp, QUOT_FMA=quot_fma, num_warps=num_warps,
    )


def hadamard_quant(x: torch.Tensor, had_size: int = 0, bits: int = 4, clip: float = 1.0,
                   pack: bool = True, *, programs_per_sm: int | None = None,
                   num_warps: int | None = None, _quot_fma: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused block Hadamard + per-token asymmetric quantization; equivalent to :func:`hadamard_quant_ref`.

    x: (M, K) bf16, fp16 or fp32 (last dim contiguous); had_size: 0 (none) or a
    Hadamard order m * 2^k dividing K; bits: 4 or 8; clip in (0, 1].
    Returns ``q`` ((M, K/2) uint8 packed for bits=4, (M, K) int8 for bits=8, or
    (M, K) int8 codes in [qmin(4), qmax(4)] for bits=4 with ``pack=False``),
    ``scale (M, 1) float32`` and ``zero (M, 1) float32`` (integer-valued).

    On the GPU the codes' quotient ``v / scale`` is one IEEE reciprocal per row
    and a Markstein correction step per element (``_common.quotient_fma``), the
    IEEE quotient bit for bit at every tested shape; the down_proj layer (14336
    Hadamard + quantize + GEMM) runs 1.4x faster than with a division per
    element (docs/KERNELS.md). The interpreter divides. Keyword-only launch settings: ``programs_per_sm`` and
    ``num_warps`` (None: by the tile) for benchmarks; ``_quot_fma=False`` (the
    division) for the test that compares the two quotients.
    """
    _check(x, had_size, bits, clip)
    M, K = x.shape
    packed = bits == 4 and pack
    q = torch.empty((M, K // 2) if packed else (M, K),
                    dtype=fmt.PACKED_DTYPE if packed else fmt.CODE_DTYPE, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    z = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    _launch(x, had_size, bits, clip, q, s, z, pack=packed, programs_per_sm=programs_per_sm,
            num_warps=num_warps, quot_fma=_quot_fma)
    return q, s, z


def hadamard_only(x: torch.Tensor, had_size: int) -> torch.Tensor:
    """Block Hadamard of ``x (M, K)`` in x's dtype (float32 inside); equivalent to :func:`hadamard_only_ref`."""
    _check(x, had_size, 4, 1.0)
    out = torch.empty_like(x)
    _launch(x, had_size, 16, 1.0, out, None, None)
    return out
