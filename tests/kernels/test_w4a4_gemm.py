"""W4A4 / W4A8 / W4A16 GEMMs: bit-exact integer paths against format.w4a4_matmul_ref."""

import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_kernels.linear import prepare_w4, prepare_w4_ref
from spinquant_kernels.w4a4_gemm import (
    w4a4_gemm, w4a4_gemm_ref, w4a4_matmul_exact, w4a16_gemm, w4a16_gemm_ref)


def _weight(N, K, g, device="cpu", fill=None):
    if fill is None:
        qw = torch.randint(fmt.qmin(4), fmt.qmax(4) + 1, (N, K), generator=g, dtype=torch.int8)
    else:
        qw = torch.full((N, K), fill, dtype=torch.int8)
    sw = torch.rand(N, generator=g) + 0.05
    return qw.to(device), prepare_w4(fmt.pack_int4(qw).to(device), sw.to(device))


def _acts(M, K, bits, g, device="cpu", dtype=torch.float32):
    x = (torch.randn(M, K, generator=g) * 2 + 0.3).to(dtype).to(device)
    q, s, z = fmt.quantize_act(x.float(), bits)
    return q, (fmt.pack_int4(q) if bits == 4 else q), s, z


def test_pack_roundtrip_and_rowsum():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (7, 38), generator=g, dtype=torch.int8)
    p = fmt.pack_int4(q)
    assert torch.equal(fmt.unpack_int4(p), q)
    sw = torch.rand(7, generator=g)
    w, wr = prepare_w4(p, sw), prepare_w4_ref(p, sw)
    assert torch.equal(w.rowsum, q.int().sum(1).int()) and torch.equal(w.rowsum, wr.rowsum)
    assert torch.equal(w.qweight, p) and w.K == 38 and w.N == 7


# ---------------------------------------------------------------------------
# CPU (TRITON_INTERPRET=1): small tiles, shapes that straddle them
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("M,K,N", [(1, 64, 33), (3, 192, 70), (17, 576, 48), (16, 128, 32), (33, 96, 31)])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_exact_small(M, K, N, bits):
    g = torch.Generator().manual_seed(M * 7 + K + N)
    qw, w = _weight(N, K, g)
    q, qa, s, z = _acts(M, K, bits, g)
    y = w4a4_gemm(qa, s, z, w, torch.float32)
    assert torch.equal(y, fmt.w4a4_matmul_ref(q, s, z, qw, w.scale))
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    yb = w4a4_gemm(qa, s, z, w, torch.float32, bias=bias)
    assert torch.equal(yb, w4a4_gemm_ref(qa, s, z, w, torch.float32, bias=bias))
    # bf16 output: the interpreter truncates to bfloat16 where the GPU rounds (one ulp)
    y16 = w4a4_gemm(qa, s, z, w, torch.bfloat16, bias=bias)
    torch.testing.assert_close(y16.float(), yb, rtol=2 ** -7, atol=0)


def test_gemm_worst_case_codes_small():
    # all codes -8: the largest partial sums (64 * K) that int4 codes can make
    K, N, M = 256, 32, 3
    g = torch.Generator().manual_seed(3)
    qw, w = _weight(N, K, g, fill=-8)
    q = torch.full((M, K), -8, dtype=torch.int8)
    s, z = torch.ones(M, 1), torch.zeros(M, 1)
    y = w4a4_gemm(fmt.pack_int4(q), s, z, w, torch.float32)
    assert torch.equal(y, fmt.w4a4_matmul_ref(q, s, z, qw, w.scale))


def test_gemm_unpacked_int4_activations():
    # int4 codes one per byte (hadamard_quant(pack=False)) take the int8 path
    g = torch.Generator().manual_seed(8)
    qw, w = _weight(40, 192, g)
    q, qa, s, z = _acts(5, 192, 4, g)
    y = w4a4_gemm(q, s, z, w, torch.float32)
    assert torch.equal(y, fmt.w4a4_matmul_ref(q, s, z, qw, w.scale))


def test_gemm_tuple_weight_and_errors():
    g = torch.Generator().manual_seed(4)
    qw, w = _weight(32, 64, g)
    q, qa, s, z = _acts(2, 64, 4, g)
    y = w4a4_gemm(qa, s, z, (w.qweight, w.scale, w.rowsum), torch.float32)
    assert torch.equal(y, fmt.w4a4_matmul_ref(q, s, z, qw, w.scale))
    with pytest.raises(ValueError, match="qx must be"):
        w4a4_gemm(qa[:, :16], s, z, w)
    with pytest.raises(ValueError, match="sx must be"):
        w4a4_gemm(qa, s[:1], z, w)
    with pytest.raises(ValueError, match="bias must be"):
        w4a4_gemm(qa, s, z, w, bias=torch.zeros(31))


@pytest.mark.parametrize("M,K,N", [(1, 64, 33), (17, 192, 40)])
def test_w4a16_small(M, K, N):
    g = torch.Generator().manual_seed(5)
    _, w = _weight(N, K, g)
    x = torch.randn(M, K, generator=g).to(torch.float16)
    y = w4a16_gemm(x, w, torch.float32)
    torch.testing.assert_close(y, w4a16_gemm_ref(x, w, torch.float32), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------
# GPU, real sizes: autotuned tiles
# ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,K,N", [(1, 4096, 6144), (16, 14336, 4096), (100, 4096, 4096),
                                   (2048, 4096, 28672), (4096, 14336, 4096)])
def test_gemm_exact_gpu(M, K, N, bits):
    g = torch.Generator().manual_seed(M + K + N)
    qw, w = _weight(N, K, g, "cuda")
    q, qa, s, z = _acts(M, K, bits, g, "cuda")
    y = w4a4_gemm(qa, s, z, w, torch.float32)
    assert torch.equal(y, w4a4_matmul_exact(q, s, z, qw, w.scale))
    bias = torch.randn(N, generator=g).to(torch.bfloat16).cuda()
    yb = w4a4_gemm(qa, s, z, w, torch.bfloat16, bias=bias)
    ref = w4a4_gemm_ref(qa, s, z, w, torch.bfloat16, bias=bias)
    if not torch.equal(yb, ref):
        # the bf16 + bias call has its own autotuning key (tensor dtypes), so it may run
        # another tile than the float32 call: say which, and whether the kernel agrees
        # with itself (its float32 + bias output rounded to bf16)
        from spinquant_kernels.w4a4_gemm import tuned_configs
        yf = w4a4_gemm(qa, s, z, w, torch.float32, bias=bias)
        bad = (yb != ref)
        pytest.fail(f"{int(bad.sum())} of {bad.numel()} bf16 outputs differ, max "
                    f"|diff| {(yb.float() - ref.float()).abs().max().item()}, rows "
                    f"{bad.any(1).nonzero().flatten()[:8].tolist()}, cols "
                    f"{bad.any(0).nonzero().flatten()[:8].tolist()}; kernel fp32+bias -> bf16 "
                    f"equals its bf16 output: {torch.equal(yf.to(torch.bfloat16), yb)}, equals "
                    f"the reference: {torch.equal(yf.to(torch.bfloat16), ref)}; tuned: {tuned_configs()}")


def _bucket16_configs():
    from spinquant_kernels.w4a4_gemm import _CONFIGS
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in _CONFIGS[16]]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _bucket16_configs(), ids=lambda c: "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}-w{num_warps}-st{num_stages}".format(**c))
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_bucket16_tiles_gpu(cfg, bits):
    """Every decode tile (the autotuner may pick any per key), exact in fp32 and bf16 + bias."""
    M, K, N = 16, 14336, 4096
    g = torch.Generator().manual_seed(M + K + N)
    qw, w = _weight(N, K, g, "cuda")
    q, qa, s, z = _acts(M, K, bits, g, "cuda")
    bias = torch.randn(N, generator=g).to(torch.bfloat16).cuda()
    ref = w4a4_gemm_ref(qa, s, z, w, torch.bfloat16, bias=bias)
    exact = w4a4_matmul_exact(q, s, z, qw, w.scale)
    for i in range(2):
        y = w4a4_gemm(qa, s, z, w, torch.float32, config=cfg)
        assert torch.equal(y, exact), f"round {i}: fp32 differs"
        yb = w4a4_gemm(qa, s, z, w, torch.bfloat16, bias=bias, config=cfg)
        bad = int((yb != ref).sum())
        assert bad == 0, f"round {i}: {bad} of {yb.numel()} bf16 + bias outputs differ"


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 2048])
def test_gemm_unpacked_gpu(M):
    K, N = 4096, 6144
    g = torch.Generator().manual_seed(9)
    qw, w = _weight(N, K, g, "cuda")
    q, qa, s, z = _acts(M, K, 4, g, "cuda")
    y = w4a4_gemm(q, s, z, w, torch.float32)
    assert torch.equal(y, w4a4_matmul_exact(q, s, z, qw, w.scale))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2048])
def test_gemm_worst_case_gpu(M):
    # all codes -8 at K = 14336 make the largest partial sums int4 codes can (917,504)
    K, N = 14336, 4096
    g = torch.Generator().manual_seed(6)
    qw, w = _weight(N, K, g, "cuda", fill=-8)
    q = torch.full((M, K), -8, dtype=torch.int8, device="cuda")
    s = torch.ones(M, 1, device="cuda")
    z = torch.zeros(M, 1, device="cuda")
    y = w4a4_gemm(fmt.pack_int4(q), s, z, w, torch.float32)
    assert torch.equal(y, w4a4_matmul_exact(q, s, z, qw, w.scale))
    # the integer product itself: 64 * K in every entry
    assert torch.equal(y, w.scale[None, :].expand(M, N) * (64.0 * K))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 1024])
def test_w4a16_gpu(M):
    g = torch.Generator().manual_seed(7)
    _, w = _weight(4096, 4096, g, "cuda")
    x = torch.randn(M, 4096, generator=g).to(torch.bfloat16).cuda()
    y = w4a16_gemm(x, w, torch.float32)
    torch.testing.assert_close(y, w4a16_gemm_ref(x, w, torch.float32), rtol=1e-3, atol=1e-2)
