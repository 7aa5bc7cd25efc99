"""hadamard_quant against its plain-PyTorch twin.

Codes may differ from the float32 reference by +-1 where x / scale lands
within rounding error of a .5 tie (the kernel sums the Hadamard in another
order): the fraction of such codes is bounded, and the dequantized output must
keep an SQNR floor against the exact transform.
"""

import math

import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_kernels.hadamard import hadamard_transform_ref
from spinquant_kernels.hadamard_quant import (
    hadamard_only, hadamard_only_ref, hadamard_quant, hadamard_quant_ref, hadamard_quant_supported)

# Fraction of codes allowed to differ by one step (rounding ties); none may differ by more.
MAX_TIE_FRACTION = 2e-3
# Dequantized SQNR floors in dB for zero-mean Gaussian rows (min-max, per token):
# ~6 dB per bit minus the loss of a min-max range (~ +-4.2 sigma at K = 14336).
# A mean offset is not Gaussian after the Hadamard: it lands in one coefficient
# per block (sqrt(n) * mean) and widens the range, so rows with an offset are
# only held to the reference's own SQNR (the kernel may lose 0.05 dB to ties).
SQNR_FLOOR = {4: 12.0, 8: 34.0}
SQNR_SLACK_DB = 0.05


def _codes(q, bits):
    return fmt.unpack_int4(q) if bits == 4 else q


def _sqnr_db(ref, test):
    noise = (ref - test).pow(2).sum()
    return 10 * math.log10(ref.pow(2).sum().item() / max(noise.item(), 1e-30))


def _check(x, had, bits, clip=1.0):
    q, s, z = hadamard_quant(x, had, bits, clip)
    # the reference runs on CPU: IEEE float32 division there (CUDA's need not be correctly rounded)
    qr, sr, zr = (t.to(x.device) for t in hadamard_quant_ref(x.cpu(), had, bits, clip))
    M, K = x.shape
    assert q.shape == qr.shape and q.dtype == qr.dtype
    if not had and clip == 1.0:
        # no Hadamard: the kernel computes the reference's float32 operations
        # (IEEE divisions, round half to even, nothing contracted into an FMA),
        # so codes, scales and zero points are bit-identical, ties included.
        # (clip < 1: "hi * clip - lo" may become one FMA on the GPU: scale may
        # then differ by an ulp, so only the bounds below apply.)
        assert torch.equal(s, sr) and torch.equal(z, zr)
        diff = (_codes(q, bits).int() != _codes(qr, bits).int())
        where = diff.nonzero()[:3].tolist()
        assert not diff.any(), (
            f"{int(diff.sum())} codes differ without a Hadamard, first at (row, k) {where}; "
            f"x/scale there: {[(x.float()[i, j] / s[i, 0]).item() for i, j in where]}")
    assert s.shape == (M, 1) and z.shape == (M, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert torch.equal(z, torch.round(z)), "zero point must be integer-valued"
    zdiff = (z - zr).abs()
    assert zdiff.max().item() <= 1, f"zero points differ by {zdiff.max().item()}"
    # a tie in the zero point (round(qmin - lo / s)) shifts a whole row's codes by one:
    # bound such rows, and compare the centred codes (q - zero), which it leaves alone
    assert (zdiff > 0).float().mean().item() <= 0.02, f"{int((zdiff > 0).sum())} of {M} zero points differ"
    c, cr = _codes(q, bits).int(), _codes(qr, bits).int()
    diff = ((c - z.int()) - (cr - zr.int())).abs()
    where = diff.nonzero()[:3].tolist()
    detail = f"first at (row, k) {where}; x/scale there: " + str(
        [(x.float()[i, j] / s[i, 0]).item() for i, j in where] if not had else "")
    assert diff.max().item() <= 1, f"centred codes differ by {diff.max().item()} (> 1); {detail}"
    frac = (diff > 0).float().mean().item()
    assert frac <= MAX_TIE_FRACTION, f"{frac:.2e} of codes differ from the reference; {detail}"
    xt = (hadamard_transform_ref(x.cpu().double(), had).float() if had else x.cpu().float()).to(x.device)
    db = _sqnr_db(xt, fmt.dequantize_asym(c, s, z))
    db_ref = _sqnr_db(xt, fmt.dequantize_asym(cr, sr, zr))
    assert db >= db_ref - SQNR_SLACK_DB, f"SQNR {db:.2f} dB vs the reference's {db_ref:.2f} dB"
    if abs(x.float().mean().item()) < 0.05 * x.float().std().item():
        assert db >= SQNR_FLOOR[bits], f"SQNR {db:.1f} dB below {SQNR_FLOOR[bits]}"
    return q, s, z


# ---------------------------------------------------------------------------
# CPU (TRITON_INTERPRET=1), small sizes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("M,K,had", [
    (1, 64, 0), (3, 192, 0), (17, 576, 0), (3, 64, 64), (1, 256, 128),
    (3, 576, 576), (2, 384, 192), (2, 1536, 1536), (17, 448, 448),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_hadamard_quant_small(M, K, had, dtype, bits):
    g = torch.Generator().manual_seed(M * 1000 + K + had)
    x = (torch.randn(M, K, generator=g) * 3 + 0.5).to(dtype)
    _check(x, had, bits)


def test_hadamard_quant_clip_and_zero_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 192, generator=g).to(torch.bfloat16)
    x[2] = 0  # a padding token: scale floors at MIN_SCALE, codes are the zero point
    _check(x, 0, 4, clip=0.9)
    q, s, z = hadamard_quant(x, 192, 4)
    assert s[2].item() == torch.tensor(fmt.MIN_SCALE, dtype=torch.float32).item()
    assert torch.equal(fmt.unpack_int4(q)[2].float(), z[2].expand(192))


def test_hadamard_quant_all_positive_rows():
    # the range always includes 0: an all-positive row maps 0 to qmin
    x = torch.linspace(1, 2, 128).repeat(3, 1).to(torch.float32)
    q, s, z = hadamard_quant(x, 0, 4)
    assert torch.equal(z, torch.full_like(z, fmt.qmin(4)))
    _check(x, 0, 4)


@pytest.mark.parametrize("had", [0, 192])
def test_unpacked_int4_codes(had):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 384, generator=g).to(torch.bfloat16)
    q, s, z = hadamard_quant(x, had, 4)
    qu, su, zu = hadamard_quant(x, had, 4, pack=False)
    assert qu.dtype == torch.int8 and qu.shape == (3, 384)
    assert torch.equal(fmt.pack_int4(qu), q) and torch.equal(s, su) and torch.equal(z, zu)
    qr, _, _ = hadamard_quant_ref(x, had, 4, pack=False)
    assert qr.dtype == torch.int8 and qr.shape == (3, 384)


def test_hadamard_only_matches_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 576, generator=g)
    torch.testing.assert_close(hadamard_only(x, 576), hadamard_only_ref(x, 576), rtol=1e-5, atol=1e-5)


def test_supported_and_errors():
    assert hadamard_quant_supported(14336, 14336, 4)[0]
    ok, why = hadamard_quant_supported(96, 96, 4)  # 12 x 8: power-of-two part below 16
    assert not ok and "16" in why
    with pytest.raises(ValueError, match="divide"):
        hadamard_quant(torch.zeros(2, 64), 48, 4)
    with pytest.raises(ValueError, match="bits"):
        hadamard_quant(torch.zeros(2, 64), 0, 3)
    with pytest.raises(ValueError, match="even"):
        hadamard_quant(torch.zeros(2, 63), 0, 4)


@pytest.mark.parametrize("had", [0, 192])
def test_launch_settings_leave_the_results_alone(had):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 384, generator=g).to(torch.bfloat16)
    want = hadamard_quant(x, had, 4)
    for kw in ({"programs_per_sm": 1, "num_warps": 8}, {"programs_per_sm": 3}, {"num_warps": 2}):
        got = hadamard_quant(x, had, 4, **kw)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), kw


@pytest.mark.parametrize("kw,seen", [({"programs_per_sm": 0}, "0"), ({"num_warps": 2.0}, "2.0"),
                                     ({"num_warps": -4}, "-4")])
def test_bad_launch_settings_are_named(kw, seen):
    (name,) = kw
    with pytest.raises(ValueError, match=rf"{name} must be None or an int >= 1, got {seen}"):
        hadamard_quant(torch.zeros(2, 64), 0, 4, **kw)


# ---------------------------------------------------------------------------
# GPU, real sizes (same command on the H100)
# ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 257, 4096])
@pytest.mark.parametrize("K,had", [(4096, 0), (14336, 14336), (4096, 4096), (1536, 1536),
                                   (576, 576), (14336, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_hadamard_quant_gpu(M, K, had, dtype, bits):
    g = torch.Generator().manual_seed(M + K)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype).cuda()
    _check(x, had, bits)
    _check(x + 0.25, had, bits)  # a mean offset: held to the reference's SQNR


@pytest.mark.gpu
@pytest.mark.parametrize("K,had,settings", [
    (4096, 0, ({"programs_per_sm": 1, "num_warps": 8}, {"programs_per_sm": 3}, {"num_warps": 2})),
    (14336, 14336, ({"programs_per_sm": 2}, {"programs_per_sm": 8, "num_warps": 8})),
])
def test_launch_settings_leave_the_results_alone_gpu(K, had, settings):
    """Benchmarks override the persistent grid and the warps: the codes must not move."""
    g = torch.Generator().manual_seed(K + had)
    x = (torch.randn(1029, K, generator=g) * 2).to(torch.bfloat16).cuda()
    want = hadamard_quant(x, had, 4)
    for kw in settings:
        got = hadamard_quant(x, had, 4, **kw)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), kw


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4096])
@pytest.mark.parametrize("K,had", [(4096, 0), (14336, 14336), (14336, 0), (576, 576)])
@pytest.mark.parametrize("bits", [4, 8])
def test_fma_quotient_gives_the_division_codes_gpu(M, K, had, bits):
    """The production quotient (reciprocal + one FMA residual step) must reproduce the
    IEEE-division codes (``_quot_fma=False``) bit for bit, ties included: bf16 rows with
    8-bit codes land on exact .5 quotients often (1.3% of codes at K = 14336 on the H100)."""
    g = torch.Generator().manual_seed(7 * M + K + bits)
    for x in ((torch.randn(M, K, generator=g) * 2).to(torch.bfloat16).cuda(),
              (torch.randint(-40, 41, (M, K), generator=g) / 8).to(torch.bfloat16).cuda()):
        q_div, s_div, z_div = hadamard_quant(x, had, bits, _quot_fma=False)
        q_fma, s_fma, z_fma = hadamard_quant(x, had, bits)
        assert torch.equal(s_fma, s_div) and torch.equal(z_fma, z_div)
        bad = int((q_fma != q_div).sum())
        assert bad == 0, f"{bad} of {q_div.numel()} packed codes differ from the division's"
