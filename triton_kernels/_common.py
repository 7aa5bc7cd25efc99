"""Helpers every kernel module shares: where kernels run, SM counts, exact rounding.

Private to the kernels package. Host helpers: :func:`interpreting`,
:func:`sm_count`. Triton device functions: :func:`rint` (fast round half to
even), :func:`rint_floor` (the same result built from ``floor``, safe on any
input), :func:`mul_rn` (a product rounded on its own), :func:`quotient_div`
and :func:`quotient_fma` (the IEEE quotient ``v / scale``, bit for bit).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# SM count assumed where there is no GPU (CPU interpreter runs, grid sizing in tests):
# the H100 SXM's.
DEFAULT_SMS = 132


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Read at each call: tests switch it with monkeypatch; it is one dict lookup.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=16)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of ``device`` (:data:`DEFAULT_SMS` off the GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def rint(v):
    """Round half to even, exactly like ``torch.round``, for |v| < 2**22.

    Adding 1.5 * 2**23 leaves no fraction bits in float32. The input must not be
    an unrounded product the compiler can contract into an FMA with the add
    (use :func:`mul_rn` or a quotient helper to produce it).
    """
    return (v + 12582912.0) - 12582912.0


@triton.jit
def rint_floor(x):
    """Round half to even (``torch.round``) from ``floor``: exact for |x| < 2**22 on any input."""
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def mul_rn(a, b, USE_ASM: tl.constexpr):
    """float32 ``a * b`` rounded on its own.

    An explicit ``mul.rn`` is never fused into an FMA with a following add (the
    W4A4 epilogue's bias, the rounding trick of :func:`rint`), so every kernel
    rounds the same way. The interpreter (``USE_ASM`` off) multiplies in numpy,
    which never fuses.
    """
    if USE_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def quotient_div(v, scale):
    """``v / scale`` as an IEEE (correctly rounded) division, as ``format.quantize_asym`` computes it.

    Not ``v * (1 / scale)``: that differs from the IEEE quotient by up to an ulp,
    and the compiler contracts the product with the ``+ 1.5 * 2**23`` of
    :func:`rint` into one FMA, which rounds the unrounded product to an integer.
    Where ``v / scale`` is an exact ``k + 0.5`` (common with bf16 inputs and
    8-bit codes) that product sits just above or below the tie and about half of
    the ties go the other way from ``torch.round``. ``div.rn`` is opaque to
    contraction and ties round half to even.
    """
    return tl.div_rn(v, scale)


@triton.jit
def quotient_fma(v, scale, inv):
    """``v / scale`` from ``inv = div_rn(1, scale)`` with one Markstein correction step.

    ``q = v * inv``, ``r = v - q * scale`` (exact in one FMA), ``q + r * inv``: with
    ``inv`` correctly rounded and ``q`` within an ulp, the corrected value rounds to
    the IEEE quotient. One asm block, so no step is fused or reordered; three
    instructions instead of the division subroutine.
    """
    return tl.inline_asm_elementwise(
        "{ .reg .f32 q, nq, r; mul.rn.f32 q, $1, $3; neg.f32 nq, q; "
        "fma.rn.f32 r, nq, $2, $1; fma.rn.f32 $0, r, $3, q; }",
        "=r,r,r,r", [v, scale, inv], dtype=tl.float32, is_pure=True, pack=1)
