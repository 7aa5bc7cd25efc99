"""The 4-bit paged KV cache: layout, the fused R3-Hadamard + quantize write, references.

Layout (one KV cache tensor per attention layer, the page layout of vLLM 0.26's
``int4_per_token_head`` so its memory accounting applies unchanged):

``kv_cache`` uint8, logical shape ``(num_blocks, num_kv_heads, block_size, 2 * P)``
with ``P = head_dim / 2 + 4``; any strides with a contiguous last dim that
are multiples of 8 bytes (vLLM allocates it physically NHD or HND). For one
(block, kv head, slot) the ``2P = head_dim + 8`` bytes are::

    [ K codes (head_dim/2) | V codes (head_dim/2) | K scale word (4) | V scale word (4) ]

(the same bytes per slot as vLLM's mode, ordered so both code runs start
8-byte aligned for vectorized loads; vLLM's own kernels never read this cache).

* codes: ``spinquant_kernels.format.pack_int4`` of the centred int4 codes
  (element 2j in the low nibble, 2j+1 in the high nibble).
* scale word: a little-endian float32 ``scale`` whose ``format.KV_BITS`` low
  mantissa bits hold the two's complement of the zero point ``zero`` in
  [qmin, qmax] of ``KV_BITS`` (``format.kv_pack_scale_zero``). The scale is
  *truncated* to those bits before quantizing (``format.kv_truncate_scale``), so
  ``x ~= scale * (q - zero)`` holds exactly with the stored numbers; the
  truncation changes the scale by less than 2**-19 relatively.

Per token and kv head, K (after RoPE) is rotated by the orthonormal R3 Hadamard
``H_n / sqrt(n)`` (n = r3_size, normally head_dim; block-diagonal when smaller) and V
is stored as is (SpinQuant's learned R2 already rotated it inside v_proj);
both are quantized asymmetrically min-max over head_dim (``format.quantize_kv``
with the truncated scale). That is 4.5 bits per element at head_dim 64 and
4.25 at head_dim 128 (4 bytes of scale+zero per head vector).

``kv4_cache_write`` is the one fused Triton kernel of the write path;
``kv4_cache_write_ref`` is its plain-PyTorch twin. ``kv4_cache_dequant`` (twin
``kv4_cache_dequant_ref``) reads whole sequences back into contiguous K/V (the
FlashAttention path of ``attention.kv4_mixed_attention_flash``);
``kv4_cache_gather_ref`` dequantizes the cache of one sequence (used by the
attention references).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import format as fmt
from ._common import rint_floor
from .hadamard import decompose, hadamard_matrix

# ----------------------------------------------------------------------------
# kernel constants of the codes and the scale word, from the format
# ----------------------------------------------------------------------------
# code range of KV_BITS (-8 and 7 for 4 bits)
_QMIN = tl.constexpr(fmt.qmin(fmt.KV_BITS))
_QMAX = tl.constexpr(fmt.qmax(fmt.KV_BITS))
# one code's bits: the nibble of a packed byte, and the zero point in the scale word
_CODE_MASK = tl.constexpr(fmt.KV_ZERO_MASK)
_CODE_BITS = tl.constexpr(fmt.KV_BITS)
# the scale bits of the word (the word with the zero point cleared)
_SCALE_MASK = tl.constexpr(~fmt.KV_ZERO_MASK)
# A code c stored as a KV_BITS-bit two's complement pattern n gives c - qmin = n ^ -qmin
# (flipping the sign bit maps [qmin, qmax] onto [0, 2**KV_BITS - 1] in order).
_SIGN_FLIP = tl.constexpr(-fmt.qmin(fmt.KV_BITS))


# ----------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------
def kv4_head_bytes(head_dim: int) -> int:
    """Bytes of one stored head vector (codes + scale word): ``head_dim/2 + 4``."""
    _check_head_dim(head_dim)
    return head_dim // 2 + fmt.KV_SCALE_BYTES


def codes_offset(part: int, head_dim: int) -> int:
    """Byte offset of the codes of K (``part`` 0) or V (1) within a slot's ``2P`` bytes."""
    return part * (head_dim // 2)


def word_index(part: int, head_dim: int) -> int:
    """int32 index of the scale word of K (``part`` 0) or V (1) within a slot."""
    return head_dim // 4 + part


def kv4_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
                    ) -> tuple[int, int, int, int]:
    """Logical cache shape ``(num_blocks, num_kv_heads, block_size, 2 * (head_dim/2 + 4))``."""
    return (num_blocks, num_kv_heads, block_size, 2 * kv4_head_bytes(head_dim))


def allocate_kv4_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       device: torch.device | str, layout: str = "NHD") -> torch.Tensor:
    """Zeroed uint8 cache in the logical shape of :func:`kv4_cache_shape`.

    ``layout`` "NHD" stores (block, slot, head) physically (vLLM's default on
    CUDA), "HND" stores (block, head, slot).
    """
    nb, nh, bs, c = kv4_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    if layout == "NHD":
        return torch.zeros(nb, bs, nh, c, dtype=torch.uint8, device=device).permute(0, 2, 1, 3)
    if layout == "HND":
        return torch.zeros(nb, nh, bs, c, dtype=torch.uint8, device=device)
    raise ValueError(f"layout must be 'NHD' or 'HND', got {layout!r}")


def _check_head_dim(head_dim: int) -> None:
    # head_dim/2 bytes of codes must keep the scale word 4-byte aligned.
    if not isinstance(head_dim, int) or head_dim < 16 or head_dim % 8:
        raise ValueError(f"head_dim must be an int >= 16 and a multiple of 8, got {head_dim!r}")


def check_kv4_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """Raise unless ``kv_cache`` has the dtype, shape and strides of the layout."""
    if kv_cache.dtype != torch.uint8:
        raise ValueError(f"kv_cache must be uint8, got {kv_cache.dtype}")
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be 4-D (blocks, kv_heads, block_size, 2P), "
                         f"got shape {tuple(kv_cache.shape)}")
    want = 2 * kv4_head_bytes(head_dim)
    if kv_cache.shape[1] != num_kv_heads or kv_cache.shape[3] != want:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match "
                         f"num_kv_heads={num_kv_heads}, last dim 2*(head_dim/2+4)={want}")
    # the kernels promise Triton 8-byte aligned rows (vectorized code loads)
    if kv_cache.stride(3) != 1 or any(s % 8 for s in kv_cache.stride()[:3]) \
            or kv_cache.data_ptr() % 8:
        raise ValueError(f"kv_cache needs a contiguous last dim, strides that are multiples of "
                         f"8 bytes and an 8-byte aligned start, got strides {kv_cache.stride()} "
                         f"data_ptr % 8 = {kv_cache.data_ptr() % 8}")


def _words(kv_cache: torch.Tensor) -> torch.Tensor:
    """The same storage viewed as int32 (strides in words), for the scale words."""
    return kv_cache.view(torch.int32)


# ----------------------------------------------------------------------------
# quantization (reference)
# ----------------------------------------------------------------------------
def quantize_kv4_ref(x: torch.Tensor, clip: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``format.quantize_kv`` with the stored (truncated) scale.

    ``x (..., head_dim)`` float -> ``(codes int8 (..., head_dim), scale (..., 1) f32,
    zero (..., 1) f32)`` with ``x ~= scale * (codes - zero)``.
    """
    bits = fmt.KV_BITS
    xf = x.float()
    lo = torch.clamp(xf.amin(dim=-1, keepdim=True), max=0.0) * clip
    hi = torch.clamp(xf.amax(dim=-1, keepdim=True), min=0.0) * clip
    # tensor / tensor: CUDA turns "/ python_scalar" into a reciprocal multiply,
    # which differs from the kernel's IEEE division in the last bit
    scale = torch.clamp((hi - lo) / torch.full_like(hi, (1 << bits) - 1), min=fmt.MIN_SCALE)
    scale = fmt.kv_truncate_scale(scale)
    zero = torch.clamp(torch.round(fmt.qmin(bits) - lo / scale), fmt.qmin(bits), fmt.qmax(bits))
    return fmt.quantize_asym(xf, scale, zero, bits), scale, zero


def r3_rotate_ref(x: torch.Tensor, had_size: int | None = None) -> torch.Tensor:
    """``x (..., head_dim) @ (I (x) H_had_size) / sqrt(had_size)`` in float32 (the stored K basis).

    Same matrix as ``hadamard_transform_ref`` (block-diagonal over head_dim);
    the sums are taken in float64 and the normalisation is an IEEE division,
    as in the kernel, so integer-valued inputs give bit-identical results on
    every device. ``had_size`` 0 returns ``x`` in float32.
    """
    D = x.shape[-1]
    had = _resolve_had_size(D, had_size)
    xf = x.float()
    if not had:
        return xf
    he, ho = hadamard_halves(D, had, torch.float64, x.device)
    y = torch.stack((x.double() @ he, x.double() @ ho), dim=-1).reshape(x.shape).float()
    return y / torch.full_like(y, math.sqrt(had))


# ----------------------------------------------------------------------------
# write path: reference
# ----------------------------------------------------------------------------
def _check_write(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, clip: float) -> None:
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be (num_tokens, num_kv_heads, head_dim), "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError(f"key/value need a contiguous head_dim, got strides "
                         f"{key.stride()} and {value.stride()}")
    _check_head_dim(key.shape[2])
    check_kv4_cache(kv_cache, key.shape[1], key.shape[2])
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] < key.shape[0]:
        raise ValueError(f"slot_mapping must be 1-D with >= num_tokens={key.shape[0]} entries, "
                         f"got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if not 0.0 < float(clip) <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip!r}")


def kv4_cache_write_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, clip: float = 1.0, had_size: int | None = None,
                        hadamard: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Plain-PyTorch twin of :func:`kv4_cache_write` (writes ``kv_cache`` in place)."""
    _check_write(key, value, kv_cache, slot_mapping, clip)
    T, H, D = key.shape
    had = _resolve_had_size(D, had_size)
    half = D // 2
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    k = key[keep].float()
    v = value[keep].float()
    slots = slots[keep]
    k = r3_rotate_ref(k, had)
    bs = kv_cache.shape[2]
    blk, off = slots // bs, slots % bs
    words = _words(kv_cache)
    for part, x in ((0, k), (1, v)):
        q, s, z = quantize_kv4_ref(x, clip)
        base = codes_offset(part, D)
        # kv_cache[blk, :, off] is (n, H, 2P) for advanced indexing of dims 0 and 2
        kv_cache[blk, :, off, base:base + half] = fmt.pack_int4(q)
        words[blk, :, off, word_index(part, D)] = fmt.kv_pack_scale_zero(s, z)[..., 0]


def kv4_cache_gather_ref(kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int,
                         head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the first ``seq_len`` tokens of one sequence.

    ``block_table_row (max_blocks,)`` int; returns ``k, v (seq_len, num_kv_heads, head_dim)``
    float32, K in the R3-rotated basis (as stored).
    """
    half = head_dim // 2
    bs = kv_cache.shape[2]
    pos = torch.arange(seq_len, device=kv_cache.device)
    blk = block_table_row.long()[pos // bs]
    off = pos % bs
    rows = kv_cache[blk, :, off]                 # (seq_len, H, 2P) uint8
    words = _words(kv_cache)[blk, :, off]        # (seq_len, H, 2P/4) int32
    out = []
    for part in (0, 1):
        base = codes_offset(part, head_dim)
        q = fmt.unpack_int4(rows[..., base:base + half].contiguous())
        s, z = fmt.kv_unpack_scale_zero(words[..., word_index(part, head_dim)])
        out.append(fmt.dequantize_asym(q, s[..., None], z[..., None]))
    return out[0], out[1]


# ----------------------------------------------------------------------------
# Hadamard operands for the kernels
# ----------------------------------------------------------------------------
def supported_had_size(head_dim: int, had_size: int) -> bool:
    """True when ``had_size`` is 0 (no rotation) or a Hadamard order dividing ``head_dim``."""
    if not isinstance(had_size, int) or had_size < 0:
        return False
    if had_size == 0:
        return True
    if head_dim % had_size:
        return False
    try:
        decompose(had_size)
    except ValueError:
        return False
    return True


def _resolve_had_size(head_dim: int, had_size: int | None) -> int:
    had = head_dim if had_size is None else had_size
    if not supported_had_size(head_dim, had):
        raise ValueError(f"had_size must be 0 or a Hadamard order dividing head_dim={head_dim}, "
                         f"got {had_size!r}")
    return had


@functools.lru_cache(maxsize=64)
def _r3_matrix(layout: str, head_dim: int, had_size: int, dtype: torch.dtype, device: str):
    """The unnormalised R3 matrix in one of three column layouts (see the public functions)."""
    if layout == "perm":
        return torch.cat(_r3_matrix("halves", head_dim, had_size, dtype, device), dim=1).contiguous()
    if layout == "full":
        he, ho = _r3_matrix("halves", head_dim, had_size, dtype, device)
        return torch.stack((he, ho), dim=-1).reshape(head_dim, head_dim).contiguous()
    if had_size:
        H = torch.kron(torch.eye(head_dim // had_size, dtype=torch.float64),
                       hadamard_matrix(had_size, dtype=torch.float64, normalized=False))
    else:
        H = torch.eye(head_dim, dtype=torch.float64)
    return (H[:, 0::2].contiguous().to(dtype=dtype, device=device),
            H[:, 1::2].contiguous().to(dtype=dtype, device=device))


def _r3(layout: str, head_dim: int, had_size: int | None, dtype: torch.dtype, device: torch.device | str):
    return _r3_matrix(layout, head_dim, _resolve_had_size(head_dim, had_size), dtype, str(torch.device(device)))


def hadamard_halves(head_dim: int, had_size: int | None, dtype: torch.dtype,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised R3 matrix split by output column parity: ``(H[:, 0::2], H[:, 1::2])``.

    ``H = I_{head_dim / had_size} (x) H_had_size`` (+-1 entries; the identity
    for ``had_size`` 0; ``None`` means ``head_dim``). Each half is
    ``(head_dim, head_dim/2)`` in ``dtype`` (exact in every float dtype). The
    kernels compute ``x @ H / sqrt(had_size)`` directly as the even and odd
    halves that ``pack_int4`` pairs. Cached per (sizes, dtype, device):
    create them before CUDA-graph capture.
    """
    return _r3("halves", head_dim, had_size, dtype, device)


def hadamard_perm(head_dim: int, had_size: int | None, dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    """``(head_dim, head_dim)``: the unnormalised R3 matrix with its even output columns
    first and odd ones second, ``cat(H[:, 0::2], H[:, 1::2])`` (what the attention
    kernels multiply queries by). Cached like :func:`hadamard_halves`."""
    return _r3("perm", head_dim, had_size, dtype, device)


def hadamard_full(head_dim: int, had_size: int | None, dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    """``(head_dim, head_dim)`` unnormalised R3 matrix ``I (x) H_had_size`` in natural
    column order: the query rotation for attention over :func:`kv4_cache_dequant` output
    (its K is in natural order, in the R3 basis). Cached like :func:`hadamard_halves`."""
    return _r3("full", head_dim, had_size, dtype, device)


def had_norm(head_dim: int, had_size: int | None) -> float:
    """The divisor ``sqrt(had_size)`` of the unnormalised matrix (1 without rotation)."""
    had = _resolve_had_size(head_dim, had_size)
    return math.sqrt(had) if had else 1.0


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the kernels' tensor-core products for activations of ``dtype``."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


# ----------------------------------------------------------------------------
# Triton helper of the write kernel
# ----------------------------------------------------------------------------
@triton.jit
def _quantize_store(xe, xo, row_ok, col_ok, code_ptrs, word_ptrs, clip, MIN_SCALE: tl.constexpr):
    """Quantize rows given as even/odd halves ``(R, HALF_PAD)`` f32; store codes + word."""
    big = float("inf")
    amin = tl.minimum(tl.min(tl.where(col_ok[None, :], xe, big), axis=1),
                      tl.min(tl.where(col_ok[None, :], xo, big), axis=1))
    amax = tl.maximum(tl.max(tl.where(col_ok[None, :], xe, -big), axis=1),
                      tl.max(tl.where(col_ok[None, :], xo, -big), axis=1))
    lo = tl.minimum(amin, 0.0) * clip
    hi = tl.maximum(amax, 0.0) * clip
    scale = tl.maximum(tl.math.div_rn(hi - lo, _QMAX - _QMIN + 0.0), MIN_SCALE)
    # truncate the low mantissa bits: they carry the zero point
    sbits = scale.to(tl.int32, bitcast=True) & _SCALE_MASK
    scale = sbits.to(tl.float32, bitcast=True)
    zero = tl.minimum(tl.maximum(rint_floor(_QMIN - tl.math.div_rn(lo, scale)), _QMIN), _QMAX)
    qe = rint_floor(tl.math.div_rn(xe, scale[:, None])) + zero[:, None]
    qo = rint_floor(tl.math.div_rn(xo, scale[:, None])) + zero[:, None]
    qe = tl.minimum(tl.maximum(qe, _QMIN), _QMAX).to(tl.int32)
    qo = tl.minimum(tl.maximum(qo, _QMIN), _QMAX).to(tl.int32)
    packed = ((qe & _CODE_MASK) | ((qo & _CODE_MASK) << _CODE_BITS)).to(tl.uint8)
    tl.store(code_ptrs, packed, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(word_ptrs, sbits | (zero.to(tl.int32) & _CODE_MASK), mask=row_ok)


# ----------------------------------------------------------------------------
# write path: kernel
# ----------------------------------------------------------------------------
@triton.jit
def _kv4_write_kernel(
    # pointers
    key_ptr, value_ptr, cache_ptr, word_ptr, slot_ptr, he_ptr, ho_ptr,
    # sizes
    num_tokens, block_size, clip, sqrt_n,
    # strides (key/value in elements, cache in bytes, words in int32 units)
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cs,
    stride_wb, stride_wh, stride_ws,
    # meta-parameters
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, DOT_IEEE: tl.constexpr,
    MIN_SCALE: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_t = tl.program_id(0)
    head = tl.program_id(1)

    # ---- where each token goes ---------------------------------------------
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < num_tokens
    slots = tl.load(slot_ptr + toks, mask=tok_ok, other=-1).to(tl.int64)
    row_ok = tok_ok & (slots >= 0)
    slots = tl.where(row_ok, slots, 0)
    blk = slots // block_size
    off = slots % block_size
    row_b = tl.multiple_of(blk * stride_cb + head * stride_ch + off * stride_cs, 8)
    row_w = blk * stride_wb + head * stride_wh + off * stride_ws
    j = tl.arange(0, HALF_PAD)
    col_ok = j < HALF
    toks64 = toks.to(tl.int64)

    # ---- K: R3 Hadamard (two +-1 products, even/odd output columns) ---------
    d = tl.arange(0, DIM_PAD)
    dm = d < HEAD_DIM
    k = tl.load(key_ptr + toks64[:, None] * stride_kt + head * stride_kh + d[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0)
    hmask = dm[:, None] & col_ok[None, :]
    he = tl.load(he_ptr + d[:, None] * HALF + j[None, :], mask=hmask, other=0.0)
    ho = tl.load(ho_ptr + d[:, None] * HALF + j[None, :], mask=hmask, other=0.0)
    if DOT_IEEE:
        ke = tl.dot(k, he, input_precision="ieee")
        ko = tl.dot(k, ho, input_precision="ieee")
    else:
        ke = tl.dot(k, he)
        ko = tl.dot(k, ho)
    ke = tl.math.div_rn(ke, sqrt_n)
    ko = tl.math.div_rn(ko, sqrt_n)
    _quantize_store(ke, ko, row_ok, col_ok, cache_ptr + row_b[:, None] + j[None, :],
                    word_ptr + row_w + HEAD_DIM // 4, clip, MIN_SCALE)

    # ---- V: stored as is (R2 already rotated it) -----------------------------
    vb = value_ptr + toks64[:, None] * stride_vt + head * stride_vh + 2 * j[None, :]
    m2 = row_ok[:, None] & col_ok[None, :]
    ve = tl.load(vb, mask=m2, other=0.0).to(tl.float32)
    vo = tl.load(vb + 1, mask=m2, other=0.0).to(tl.float32)
    _quantize_store(ve, vo, row_ok, col_ok, cache_ptr + row_b[:, None] + HALF + j[None, :],
                    word_ptr + row_w + HEAD_DIM // 4 + 1, clip, MIN_SCALE)


def kv4_cache_write(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, clip: float = 1.0, had_size: int | None = None,
                    hadamard: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Fused R3 Hadamard on K + per (token, kv head) asymmetric int4 of K and V + paged write.

    ``key, value (num_tokens, num_kv_heads, head_dim)`` fp32/fp16/bf16 (K after
    RoPE); ``kv_cache`` the uint8 cache of the module docstring (written in
    place); ``slot_mapping (>= num_tokens,)`` int32/int64 flat slot
    ``block * block_size + offset`` per token, negative = skip (padding).
    ``had_size``: R3 size (``None`` = head_dim, 0 = no rotation, else a
    Hadamard order dividing head_dim: block-diagonal). ``hadamard``: optional
    precomputed :func:`hadamard_halves` in the dot dtype of ``key`` (pass it
    under CUDA-graph capture).

    Equivalent to :func:`kv4_cache_write_ref`: codes and scale words equal the
    reference wherever the Hadamard sums are exact (e.g. bf16/fp16 keys whose
    float32 sums do not round); otherwise codes may differ by one at rounding
    ties of the float32 summation order.
    """
    _check_write(key, value, kv_cache, slot_mapping, clip)
    T, H, D = key.shape
    if T == 0:
        return
    had = _resolve_had_size(D, had_size)
    dt = dot_dtype(key.dtype)
    he, ho = hadamard if hadamard is not None else hadamard_halves(D, had, dt, key.device)
    if he.dtype != dt or he.shape != (D, D // 2):
        raise ValueError(f"hadamard halves must be ({D}, {D // 2}) {dt}, got "
                         f"{tuple(he.shape)} {he.dtype}")
    key_in = key if key.dtype == dt else key.to(dt)
    words = _words(kv_cache)
    BLOCK_T = 16
    grid = (triton.cdiv(T, BLOCK_T), H)
    _kv4_write_kernel[grid](
        key_in, value, kv_cache, words, slot_mapping, he, ho,
        T, kv_cache.shape[2], float(clip), had_norm(D, had),
        key_in.stride(0), key_in.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        words.stride(0), words.stride(1), words.stride(2),
        HEAD_DIM=D, DIM_PAD=triton.next_power_of_2(D),
        HALF_PAD=triton.next_power_of_2(D // 2),
        BLOCK_T=BLOCK_T, DOT_IEEE=dt == torch.float32,
        MIN_SCALE=fmt.MIN_SCALE,
        num_warps=4,
    )


# ----------------------------------------------------------------------------
# read whole sequences back (the FlashAttention path of fresh prompts)
# ----------------------------------------------------------------------------
def _check_dequant(kv_cache, block_table, seq_lens, cu_seqlens_k, head_dim):
    check_kv4_cache(kv_cache, kv_cache.shape[1], head_dim)
    S = seq_lens.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] < S:
        raise ValueError(f"block_table must be 2-D with >= num_seqs={S} rows, "
                         f"got {tuple(block_table.shape)}")
    if cu_seqlens_k.shape != (S + 1,):
        raise ValueError(f"cu_seqlens_k must be (num_seqs + 1,) = ({S + 1},), "
                         f"got {tuple(cu_seqlens_k.shape)}")


def kv4_cache_dequant_ref(kv_cache: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, cu_seqlens_k: torch.Tensor, head_dim: int,
                          max_seq_len: int, total_tokens: int, dtype: torch.dtype = torch.bfloat16,
                          zero_fill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of :func:`kv4_cache_dequant` (rows not covered are always zero)."""
    _check_dequant(kv_cache, block_table, seq_lens, cu_seqlens_k, head_dim)
    H = kv_cache.shape[1]
    k = torch.zeros(total_tokens, H, head_dim, dtype=dtype, device=kv_cache.device)
    v = torch.zeros_like(k)
    cu = cu_seqlens_k.tolist()
    for i, L in enumerate(seq_lens.tolist()):
        ks, vs = kv4_cache_gather_ref(kv_cache, block_table[i], L, head_dim)
        k[cu[i]:cu[i] + L] = ks.to(dtype)
        v[cu[i]:cu[i] + L] = vs.to(dtype)
    return k, v


@triton.jit
def _kv4_dequant_kernel(
    # pointers
    cache_ptr, word_ptr, bt_ptr, seq_lens_ptr, cu_k_ptr, k_out_ptr, v_out_ptr,
    # sizes
    block_size,
    # strides (cache in bytes, words in int32 units, outputs in elements)
    stride_bt, stride_cb, stride_ch, stride_cs, stride_wb, stride_wh, stride_ws,
    stride_ot, stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    seq = tl.program_id(0)
    tb = tl.program_id(1)
    head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    if tb * BLOCK_T >= seq_len:
        return
    base_tok = tl.load(cu_k_ptr + seq).to(tl.int64)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < seq_len
    page = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + t // block_size, mask=tmask,
                   other=0).to(tl.int64)
    off = (t % block_size).to(tl.int64)
    rb = tl.multiple_of(page * stride_cb + head * stride_ch + off * stride_cs, 8)
    rw = page * stride_wb + head * stride_wh + off * stride_ws
    j = tl.arange(0, HALF_PAD)
    m2 = tmask[:, None] & (j < HALF)[None, :]
    o_rows = (base_tok + t) * stride_ot + head * stride_oh
    for part in tl.static_range(2):
        p = tl.load(cache_ptr + rb[:, None] + part * HALF + j[None, :], mask=m2, other=0)
        p = p.to(tl.int32)
        w = tl.load(word_ptr + rw + HEAD_DIM // 4 + part, mask=tmask, other=0)
        scale = (w & _SCALE_MASK).to(tl.float32, bitcast=True)
        # codes and zero both shifted by -qmin (sign flip): their difference is unchanged
        zs = ((w & _CODE_MASK) ^ _SIGN_FLIP).to(tl.float32)
        xe = (((p & _CODE_MASK) ^ _SIGN_FLIP).to(tl.float32) - zs[:, None]) * scale[:, None]
        xo = ((((p >> _CODE_BITS) & _CODE_MASK) ^ _SIGN_FLIP).to(tl.float32)
              - zs[:, None]) * scale[:, None]
        optr = (k_out_ptr if part == 0 else v_out_ptr) + o_rows[:, None] + 2 * j[None, :]
        tl.store(optr, xe.to(k_out_ptr.dtype.element_ty), mask=m2)
        tl.store(optr + 1, xo.to(k_out_ptr.dtype.element_ty), mask=m2)


def kv4_cache_dequant(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, head_dim: int, max_seq_len: int,
                      total_tokens: int, dtype: torch.dtype = torch.bfloat16,
                      zero_fill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole sequences into contiguous varlen K and V.

    Sequence ``i`` (``seq_lens[i]`` tokens, pages ``block_table[i]``) lands in
    rows ``cu_seqlens_k[i]:cu_seqlens_k[i] + seq_lens[i]`` of ``k, v
    (total_tokens, num_kv_heads, head_dim)`` in ``dtype`` (K in the R3 basis, as
    stored); ``max_seq_len`` (host int) sizes the grid. Rows not covered stay
    zero (undefined with ``zero_fill=False``, for callers that cover every row
    or never read the others). Equivalent to :func:`kv4_cache_dequant_ref` (both compute
    ``scale * (q - zero)`` in float32, then round to ``dtype``).
    """
    _check_dequant(kv_cache, block_table, seq_lens, cu_seqlens_k, head_dim)
    H = kv_cache.shape[1]
    alloc = torch.zeros if zero_fill else torch.empty
    k = alloc(total_tokens, H, head_dim, dtype=dtype, device=kv_cache.device)
    v = alloc(total_tokens, H, head_dim, dtype=dtype, device=kv_cache.device)
    S = seq_lens.shape[0]
    if S == 0 or max_seq_len <= 0:
        return k, v
    words = _words(kv_cache)
    BLOCK_T = 32
    _kv4_dequant_kernel[(S, triton.cdiv(int(max_seq_len), BLOCK_T), H)](
        kv_cache, words, block_table, seq_lens, cu_seqlens_k, k, v,
        kv_cache.shape[2],
        block_table.stride(0), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        words.stride(0), words.stride(1), words.stride(2), k.stride(0), k.stride(1),
        HEAD_DIM=head_dim, HALF_PAD=triton.next_power_of_2(head_dim // 2), BLOCK_T=BLOCK_T,
        num_warps=4,
    )
    return k, v
