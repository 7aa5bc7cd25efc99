"""The 4-bit KV cache write path: layout, scale word, fused R3 + quantize kernel vs reference."""

import math

import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_kernels import kv_cache as kc
from spinquant_kernels.hadamard import hadamard_transform_ref


# the Triton interpreter (CPU runs) converts loop bounds through numpy scalars
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _slots(n_tokens, num_blocks, block_size, gen, pad_every=0):
    """Distinct random slots; every ``pad_every``-th token is padding (-1)."""
    s = torch.randperm(num_blocks * block_size, generator=gen)[:n_tokens]
    if pad_every:
        s[::pad_every] = -1
    return s


def _sqnr_db(x, y):
    x, y = x.double(), y.double()
    return 10 * math.log10(float((x ** 2).sum() / ((x - y) ** 2).sum().clamp_min(1e-30)))


# ----------------------------------------------------------------------------
# layout and the scale word
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 128])
def test_layout_bytes(head_dim):
    assert kc.kv4_head_bytes(head_dim) == head_dim // 2 + 4
    shape = kc.kv4_cache_shape(3, 16, 5, head_dim)
    assert shape == (3, 5, 16, 2 * (head_dim // 2 + 4))
    for layout in ("NHD", "HND"):
        c = kc.allocate_kv4_cache(3, 16, 5, head_dim, "cpu", layout)
        assert tuple(c.shape) == shape and c.dtype == torch.uint8
        kc.check_kv4_cache(c, 5, head_dim)


@pytest.mark.parametrize("head_dim", [0, 12, 60, 100])
def test_bad_head_dim_rejected(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        kc.kv4_head_bytes(head_dim)


def test_scale_word_roundtrip_exact():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(16, 7, generator=g) * 10 ** torch.randint(-8, 3, (16, 7), generator=g)
    scale = fmt.kv_truncate_scale(scale.clamp_min(fmt.MIN_SCALE))
    zero = torch.arange(fmt.qmin(fmt.KV_BITS), fmt.qmax(fmt.KV_BITS) + 1).float()[:, None].expand(16, 7)
    s2, z2 = fmt.kv_unpack_scale_zero(fmt.kv_pack_scale_zero(scale, zero))
    assert torch.equal(s2, scale) and torch.equal(z2, zero)
    # truncation moves a scale by less than 2**-19 relatively, never up
    raw = torch.rand(1000, generator=g) + 1e-3
    t = fmt.kv_truncate_scale(raw)
    assert bool((t <= raw).all()) and float(((raw - t) / raw).max()) < 2 ** -19


def test_quantize_kv4_ref_is_format_quantize_kv():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 64, generator=g)
    q, s, z = kc.quantize_kv4_ref(x)
    q0, s0, z0 = fmt.quantize_kv(x)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    torch.testing.assert_close(s, s0, rtol=2 ** -19, atol=0)
    # codes may only move at rounding ties caused by the 2**-19 scale change
    assert int((q.int() - q0.int()).abs().max()) <= 1
    assert float((q != q0).float().mean()) < 1e-3
    err = (fmt.dequantize_asym(q, s, z) - x).abs()
    assert bool((err <= s * 0.5 * (1 + 1e-5) + 1e-7).all())


# ----------------------------------------------------------------------------
# the fused write kernel vs its reference
# ----------------------------------------------------------------------------
WRITE_CASES = [
    # (num_tokens, num_kv_heads, head_dim, had_size, layout)
    (37, 3, 64, None, "NHD"),     # SmolLM2: 3 kv heads, head_dim 64, BLOCK_T straddle
    (17, 2, 128, None, "HND"),
    (16, 1, 64, 0, "NHD"),        # no rotation
    (5, 2, 64, 16, "NHD"),        # block-diagonal R3 (had_size < head_dim)
    (9, 1, 96, None, "NHD"),      # head_dim 96 = 12 * 8: Paley base order, padded tiles
]


@pytest.mark.parametrize("T,H,D,had,layout", WRITE_CASES)
def test_write_bit_exact_when_sums_are_exact(T, H, D, had, layout):
    """Integer-valued keys make every Hadamard sum exact: codes and words must match bit for bit."""
    g = torch.Generator().manual_seed(T * 131 + D)
    dev = _device()
    bs, nb = 16, 6
    k = torch.randint(-4, 5, (T, H, D), generator=g).float()
    v = torch.randn(T, H, D, generator=g)
    slots = _slots(T, nb, bs, g, pad_every=4)
    c1 = kc.allocate_kv4_cache(nb, bs, H, D, dev, layout)
    c2 = kc.allocate_kv4_cache(nb, bs, H, D, dev, layout)
    kc.kv4_cache_write(k.to(dev), v.to(dev), c1, slots.to(dev), had_size=had)
    kc.kv4_cache_write_ref(k.to(dev), v.to(dev), c2, slots.to(dev), had_size=had)
    assert torch.equal(c1, c2)
    # padding tokens and unused slots stay untouched (zero)
    used = torch.zeros(nb * bs, dtype=torch.bool)
    used[slots[slots >= 0]] = True
    flat = c1.cpu().permute(0, 2, 1, 3).reshape(nb * bs, H, -1)
    assert int(flat[~used].count_nonzero()) == 0
    assert int(flat[used].count_nonzero()) > 0


@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_write_random_fp32_within_one_code(clip):
    g = torch.Generator().manual_seed(7)
    dev = _device()
    T, H, D, bs, nb = 40, 3, 128, 16, 4
    k = torch.randn(T, H, D, generator=g) * 3
    v = torch.randn(T, H, D, generator=g)
    slots = _slots(T, nb, bs, g).to(dev)
    c1 = kc.allocate_kv4_cache(nb, bs, H, D, dev)
    c2 = kc.allocate_kv4_cache(nb, bs, H, D, dev)
    kc.kv4_cache_write(k.to(dev), v.to(dev), c1, slots, clip=clip)
    kc.kv4_cache_write_ref(k.to(dev), v.to(dev), c2, slots, clip=clip)
    half = D // 2
    for part in (0, 1):
        base, wi = kc.codes_offset(part, D), kc.word_index(part, D)
        sa, za = fmt.kv_unpack_scale_zero(c1.view(torch.int32)[..., wi])
        sb, zb = fmt.kv_unpack_scale_zero(c2.view(torch.int32)[..., wi])
        torch.testing.assert_close(sa, sb, rtol=1e-5, atol=0)
        assert float((za != zb).float().mean()) < 0.02
        qa = fmt.unpack_int4(c1[..., base:base + half].contiguous()).int()
        qb = fmt.unpack_int4(c2[..., base:base + half].contiguous()).int()
        assert int((qa - qb).abs().max()) <= 1
        assert float((qa != qb).float().mean()) < 0.01


def test_gather_ref_dequantizes_exactly():
    """What the kernel wrote dequantizes to scale * (q - zero) of the reference quantizer."""
    g = torch.Generator().manual_seed(3)
    T, H, D, bs = 33, 3, 64, 16
    k = torch.randint(-6, 7, (T, H, D), generator=g).float()
    v = torch.randn(T, H, D, generator=g)
    nb = 3
    block_row = torch.tensor([2, 0, 1], dtype=torch.int32)
    pos = torch.arange(T)
    slots = block_row.long()[pos // bs] * bs + pos % bs
    dev = _device()
    cache = kc.allocate_kv4_cache(nb, bs, H, D, dev)
    kc.kv4_cache_write(k.to(dev), v.to(dev), cache, slots.to(dev))
    kd, vd = kc.kv4_cache_gather_ref(cache.cpu(), block_row, T, D)
    for x, got in ((kc.r3_rotate_ref(k, D), kd), (v, vd)):
        q, s, z = kc.quantize_kv4_ref(x)
        assert torch.equal(got, fmt.dequantize_asym(q, s, z))


def test_r3_helps_keys_with_outlier_channels():
    """R3 spreads an outlier channel over head_dim: much lower 4-bit error than without it."""
    g = torch.Generator().manual_seed(5)
    T, H, D, bs = 64, 2, 64, 16
    k = torch.randn(T, H, D, generator=g)
    k[..., 3] *= 25.0
    v = torch.randn(T, H, D, generator=g)
    block_row = torch.arange(T // bs, dtype=torch.int32)
    slots = torch.arange(T)
    out = {}
    for had in (None, 0):
        cache = kc.allocate_kv4_cache(T // bs, bs, H, D, "cpu")
        kc.kv4_cache_write_ref(k, v, cache, slots, had_size=had)
        kd, vd = kc.kv4_cache_gather_ref(cache, block_row, T, D)
        ref = hadamard_transform_ref(k, D) if had is None else k
        out[had] = _sqnr_db(ref, kd)
        assert _sqnr_db(v, vd) > 15.0
    assert out[None] > 15.0
    assert out[None] > out[0] + 3.0


@pytest.mark.parametrize("D,had", [(64, 64), (128, 128), (96, 96), (64, 16), (64, 0)])
def test_r3_rotate_ref_is_the_spec_hadamard(D, had):
    g = torch.Generator().manual_seed(D + had)
    x = torch.randn(7, 3, D, generator=g)
    want = hadamard_transform_ref(x, had) if had else x
    torch.testing.assert_close(kc.r3_rotate_ref(x, had), want, rtol=1e-5, atol=1e-5)


def _filled_cache(seq_lens, H, D, bs, gen, dev):
    S = len(seq_lens)
    maxb = max(1, max(-(-L // bs) for L in seq_lens))
    nb = S * maxb + 2
    bt = torch.randperm(nb, generator=gen)[:S * maxb].reshape(S, maxb).to(torch.int32)
    cache = kc.allocate_kv4_cache(nb, bs, H, D, dev)
    for i, L in enumerate(seq_lens):
        pos = torch.arange(L)
        slots = bt[i].long()[pos // bs] * bs + pos % bs
        kc.kv4_cache_write_ref(torch.randn(L, H, D, generator=gen).to(dev),
                               torch.randn(L, H, D, generator=gen).to(dev), cache, slots.to(dev))
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = sl.cumsum(0)
    return cache, bt.to(dev), sl.to(dev), cu.to(dev)


@pytest.mark.parametrize("D", [64, 128])
def test_dequant_kernel_matches_reference_fp32(D):
    """Whole-sequence read-back (the FlashAttention path of fresh prompts) is exact in float32."""
    g = torch.Generator().manual_seed(D)
    dev = _device()
    seq_lens = [5, 40, 0, 17]
    cache, bt, sl, cu = _filled_cache(seq_lens, 3, D, 16, g, dev)
    total = sum(seq_lens) + 3  # trailing rows stay zero
    a = kc.kv4_cache_dequant(cache, bt, sl, cu, D, max(seq_lens), total, torch.float32)
    b = kc.kv4_cache_dequant_ref(cache, bt, sl, cu, D, max(seq_lens), total, torch.float32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(a[0][sum(seq_lens):].count_nonzero()) == 0


@pytest.mark.gpu
def test_dequant_kernel_gpu_bf16_exact():
    g = torch.Generator().manual_seed(12)
    seq_lens = [1, 1000, 4097, 33]
    cache, bt, sl, cu = _filled_cache(seq_lens, 8, 128, 16, g, "cuda")
    a = kc.kv4_cache_dequant(cache, bt, sl, cu, 128, max(seq_lens), sum(seq_lens))
    b = kc.kv4_cache_dequant_ref(cache, bt, sl, cu, 128, max(seq_lens), sum(seq_lens))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_write_rejects_bad_inputs():
    c = kc.allocate_kv4_cache(2, 16, 2, 64, "cpu")
    k = torch.zeros(3, 2, 64)
    with pytest.raises(ValueError, match="uint8"):
        kc.kv4_cache_write(k, k, c.to(torch.int16), torch.arange(3))
    with pytest.raises(ValueError, match="num_kv_heads"):
        kc.kv4_cache_write(torch.zeros(3, 4, 64), torch.zeros(3, 4, 64), c, torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        kc.kv4_cache_write(k, k, c, torch.arange(2))
    with pytest.raises(ValueError, match="had_size"):
        kc.kv4_cache_write(k, k, c, torch.arange(3), had_size=48)
    with pytest.raises(ValueError, match="clip"):
        kc.kv4_cache_write(k, k, c, torch.arange(3), clip=0.0)


# ----------------------------------------------------------------------------
# GPU: real sizes, bf16 keys
# ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_write_gpu_bf16_matches_reference(D):
    g = torch.Generator().manual_seed(11)
    T, H, bs, nb = 4099, 8, 16, 300
    k = (torch.randn(T, H, D, generator=g) * 2).bfloat16().cuda()
    v = torch.randn(T, H, D, generator=g).bfloat16().cuda()
    slots = _slots(T, nb, bs, g, pad_every=97).cuda()
    c1 = kc.allocate_kv4_cache(nb, bs, H, D, "cuda")
    c2 = kc.allocate_kv4_cache(nb, bs, H, D, "cuda")
    kc.kv4_cache_write(k, v, c1, slots)
    kc.kv4_cache_write_ref(k, v, c2, slots)
    half = D // 2
    for part in (0, 1):
        base, wi = kc.codes_offset(part, D), kc.word_index(part, D)
        qa = fmt.unpack_int4(c1[..., base:base + half].contiguous()).int()
        qb = fmt.unpack_int4(c2[..., base:base + half].contiguous()).int()
        assert int((qa - qb).abs().max()) <= 1
        assert float((qa != qb).float().mean()) < 1e-3
        sa, _ = fmt.kv_unpack_scale_zero(c1.view(torch.int32)[..., wi])
        sb, _ = fmt.kv_unpack_scale_zero(c2.view(torch.int32)[..., wi])
        torch.testing.assert_close(sa, sb, rtol=1e-5, atol=0)
    # V is not rotated: its sums are trivially exact, so V must match bit for bit
    v0, vw = kc.codes_offset(1, D), kc.word_index(1, D)
    assert torch.equal(c1[..., v0:v0 + half], c2[..., v0:v0 + half])
    assert torch.equal(c1.view(torch.int32)[..., vw], c2.view(torch.int32)[..., vw])
