"""Experimental swap-AB TMA W4A8-storage GEMM (int4 codes one per byte for activations)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from spinquant_kernels import format as fmt
from spinquant_kernels._common import mul_rn


def kgroup(K: int) -> int:
    for g in (256, 128, 64):
        if K % g == 0:
            return g
    raise ValueError(f"K={K} must be a multiple of 64")


def repack_ref(codes: torch.Tensor, G: int) -> torch.Tensor:
    """(N, K) int8 codes -> (N, K/2) uint8: byte g*G/2 + j = code g*G+j (lo) | code g*G+G/2+j (hi)."""
    N, K = codes.shape
    c = codes.reshape(N, K // G, 2, G // 2).to(torch.int16) & 0xF
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(N, K // 2).to(torch.uint8)


_LO16 = "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }"
_HI16 = "and.b32 $0, $1, 0xF0F0F0F0;"


@triton.jit
def _split16(wb, USE_ASM: tl.constexpr):
    if USE_ASM:
        lo = tl.inline_asm_elementwise(_LO16, "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_HI16, "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
        return lo, hi
    else:
        s = wb.to(tl.int8, bitcast=True)
        return s << 4, s & -16


@triton.jit
def _gemm_kernel(
    w_desc, x_desc,
    sx_ptr, zx_ptr, sw_ptr, rs_ptr, bias_ptr, c_ptr,
    M, N, K, stride_cm, num_progs,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, SWAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_n * num_m
    k_tiles = (K // 2) // BLOCK_KH
    for tile in tl.range(tl.program_id(0), num_tiles, num_progs, flatten=True):
        group = GROUP * num_m
        first_n = (tile // group) * GROUP
        gsize = min(num_n - first_n, GROUP)
        pid_n = first_n + (tile % group) % gsize
        pid_m = (tile % group) // gsize
        n0 = pid_n * BLOCK_N
        m0 = pid_m * BLOCK_M
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            kb = ki * BLOCK_KH
            wb = w_desc.load([n0, kb])
            w_lo, w_hi = _split16(wb, USE_ASM)
            x_lo = x_desc.load([m0, 2 * kb])
            x_hi = x_desc.load([m0, 2 * kb + BLOCK_KH])
            if SWAP:
                acc = tl.dot(w_lo, x_lo.T, acc, out_dtype=tl.int32)
                acc = tl.dot(w_hi, x_hi.T, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x_lo, w_lo.T, acc, out_dtype=tl.int32)
                acc = tl.dot(x_hi, w_hi.T, acc, out_dtype=tl.int32)
        acc = acc >> 4
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        nm = offs_n < N
        mm = offs_m < M
        sw = tl.load(sw_ptr + offs_n, mask=nm, other=0.0)
        rs = tl.load(rs_ptr + offs_n, mask=nm, other=0).to(tl.float32)
        sx = tl.load(sx_ptr + offs_m, mask=mm, other=0.0)
        zx = tl.load(zx_ptr + offs_m, mask=mm, other=0.0)
        if SWAP:
            scl = sx[None, :] * sw[:, None]
            y = mul_rn(scl, acc.to(tl.float32) - zx[None, :] * rs[:, None], USE_ASM)
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[:, None]
            c_ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None]
            tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=nm[:, None] & mm[None, :])
        else:
            scl = sx[:, None] * sw[None, :]
            y = mul_rn(scl, acc.to(tl.float32) - zx[:, None] * rs[None, :], USE_ASM)
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
            c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def launch(qx, sx, zx, qw, sw, rs, out, cfg, swap=True, use_asm=True, persistent=False, bias=None):
    M, K = qx.shape
    N = qw.shape[0]
    bn, bm, bkh = cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["BLOCK_KH"]
    wd = TensorDescriptor(qw, [N, K // 2], [K // 2, 1], [bn, bkh])
    xd = TensorDescriptor(qx, [M, K], [K, 1], [bm, bkh])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    progs = min(tiles, 132 * cfg.get("PPS", 1)) if persistent else tiles
    _gemm_kernel[(progs,)](wd, xd, sx, zx, sw, rs, bias if bias is not None else sw, out,
                           M, N, K, out.stride(0), progs,
                           HAS_BIAS=bias is not None, USE_ASM=use_asm, SWAP=swap,
                           BLOCK_N=bn, BLOCK_M=bm, BLOCK_KH=bkh, GROUP=cfg.get("GROUP", 8),
                           num_warps=cfg["warps"], num_stages=cfg["stages"])
    return out


@triton.jit
def _fp8_kernel(
    w_desc, x_desc,
    sx_ptr, zx_ptr, xs_ptr, sw_ptr, rs_ptr, bias_ptr, c_ptr,
    M, N, K, stride_cm, num_progs,
    HAS_BIAS: tl.constexpr, IMPRECISE: tl.constexpr, USE_ASM: tl.constexpr, SWAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP: tl.constexpr,
):
    # W nibbles are offset-binary u = c + 8; a nibble u in the low 4 bits of a byte is the e4m3
    # value u * 2**-9 (subnormal for u < 8, exponent 1 above: one linear grid).
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_n * num_m
    k_tiles = (K // 2) // BLOCK_KH
    for tile in tl.range(tl.program_id(0), num_tiles, num_progs, flatten=True):
        group = GROUP * num_m
        first_n = (tile // group) * GROUP
        gsize = min(num_n - first_n, GROUP)
        pid_n = first_n + (tile % group) % gsize
        pid_m = (tile % group) // gsize
        n0 = pid_n * BLOCK_N
        m0 = pid_m * BLOCK_M
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            kb = ki * BLOCK_KH
            wb = w_desc.load([n0, kb])
            w_lo = (wb & 15).to(tl.float8e4nv, bitcast=True)
            w_hi = (wb >> 4).to(tl.float8e4nv, bitcast=True)
            x_lo = x_desc.load([m0, 2 * kb])
            x_hi = x_desc.load([m0, 2 * kb + BLOCK_KH])
            if SWAP:
                acc = tl.dot(w_lo, x_lo.T, acc, max_num_imprecise_acc=IMPRECISE)
                acc = tl.dot(w_hi, x_hi.T, acc, max_num_imprecise_acc=IMPRECISE)
            else:
                acc = tl.dot(x_lo, w_lo.T, acc, max_num_imprecise_acc=IMPRECISE)
                acc = tl.dot(x_hi, w_hi.T, acc, max_num_imprecise_acc=IMPRECISE)
        if not SWAP:
            acc = tl.trans(acc)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        nm = offs_n < N
        mm = offs_m < M
        sw = tl.load(sw_ptr + offs_n, mask=nm, other=0.0)
        rs = tl.load(rs_ptr + offs_n, mask=nm, other=0).to(tl.float32)
        sx = tl.load(sx_ptr + offs_m, mask=mm, other=0.0)
        zx = tl.load(zx_ptr + offs_m, mask=mm, other=0.0)
        xs8 = tl.load(xs_ptr + offs_m, mask=mm, other=0).to(tl.float32) * 8.0
        a = acc * 512.0 - xs8[None, :]
        scl = sx[None, :] * sw[:, None]
        y = mul_rn(scl, a - zx[None, :] * rs[:, None], USE_ASM)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=nm[:, None] & mm[None, :])


def repack_u_ref(codes, G):
    """offset-binary nibbles u = c + 8, same grouping as repack_ref."""
    N, K = codes.shape
    c = (codes.reshape(N, K // G, 2, G // 2).to(torch.int16) + 8) & 0xF
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(N, K // 2).to(torch.uint8)


def launch_fp8(qx8, sx, zx, xsum, qw, sw, rs, out, cfg, imprecise=128, persistent=False, bias=None, swap=True):
    M, K = qx8.shape
    N = qw.shape[0]
    bn, bm, bkh = cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["BLOCK_KH"]
    wd = TensorDescriptor(qw, [N, K // 2], [K // 2, 1], [bn, bkh])
    xd = TensorDescriptor(qx8, [M, K], [K, 1], [bm, bkh])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    progs = min(tiles, 132 * cfg.get("PPS", 1)) if persistent else tiles
    _fp8_kernel[(progs,)](wd, xd, sx, zx, xsum, sw, rs, bias if bias is not None else sw, out,
                          M, N, K, out.stride(0), progs,
                          HAS_BIAS=bias is not None, IMPRECISE=imprecise, USE_ASM=os.environ.get("TRITON_INTERPRET") != "1", SWAP=swap,
                          BLOCK_N=bn, BLOCK_M=bm, BLOCK_KH=bkh, GROUP=cfg.get("GROUP", 8),
                          num_warps=cfg["warps"], num_stages=cfg["stages"])
    return out
