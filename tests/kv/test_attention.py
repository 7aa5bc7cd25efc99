"""Attention over the 4-bit paged cache: Triton decode / prefill kernels vs their references."""

import math

import pytest
import torch
import torch.nn.functional as F

from spinquant_kernels import attention as at
from spinquant_kernels import kv_cache as kc
from spinquant_kernels.hadamard import hadamard_transform_ref


# the Triton interpreter (CPU runs) converts loop bounds through numpy scalars
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sqnr_db(x, y):
    x, y = x.double(), y.double()
    return 10 * math.log10(float((x ** 2).sum() / ((x - y) ** 2).sum().clamp_min(1e-30)))


def _paged(seq_lens, Hkv, D, bs, gen, dev, had=None, dtype=torch.float32, spare_blocks=3):
    """A shuffled paged cache holding random K/V for each sequence; returns the raw K/V too."""
    S = len(seq_lens)
    max_blocks = max(1, max(-(-L // bs) for L in seq_lens))
    nb = S * max_blocks + spare_blocks
    perm = torch.randperm(nb, generator=gen)[:S * max_blocks]
    block_table = perm.reshape(S, max_blocks).to(torch.int32)
    cache = kc.allocate_kv4_cache(nb, bs, Hkv, D, dev)
    raw = []
    for i, L in enumerate(seq_lens):
        k = torch.randn(L, Hkv, D, generator=gen)
        v = torch.randn(L, Hkv, D, generator=gen)
        pos = torch.arange(L)
        slots = block_table[i].long()[pos // bs] * bs + pos % bs
        kc.kv4_cache_write_ref(k.to(dev, dtype), v.to(dev, dtype), cache, slots.to(dev),
                               had_size=had)
        raw.append((k, v))
    return cache, block_table.to(dev), torch.tensor(seq_lens, dtype=torch.int32, device=dev), raw


def _cu(q_lens, dev):
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    return cu.to(dev)


DECODE_CASES = [
    # (Hkv, Hq, D, seq_lens, num_splits, min_split, fold_zero)
    (3, 9, 64, [1, 15, 16, 17, 40], 1, 1, False),   # SmolLM2 GQA; lengths straddle block / tile
    (3, 9, 64, [1, 15, 16, 17, 40], 4, 1, False),   # split context + reduce (some splits empty)
    (3, 9, 64, [1, 15, 16, 17, 40], 4, 1, True),    # zero point folded out of the unpack
    (2, 8, 128, [33, 64, 65, 0], 2, 128, False),    # min_split: one live split; empty sequence
    (1, 1, 128, [70], 8, 1, True),                   # MHA, more splits than tiles
]


@pytest.mark.parametrize("Hkv,Hq,D,seq_lens,splits,min_split,fold", DECODE_CASES)
def test_decode_matches_reference(Hkv, Hq, D, seq_lens, splits, min_split, fold):
    g = torch.Generator().manual_seed(len(seq_lens) * 7 + D + splits)
    dev = _device()
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, dev)
    S = len(seq_lens)
    q = torch.randn(S, Hq, D, generator=g).to(dev)
    cu = _cu([1] * S, dev)
    scale = 1 / math.sqrt(D)
    out = at.kv4_decode_attention(q, cache, bt, sl, cu, scale, num_splits=splits, tile_n=16,
                                  min_split=min_split, fold_zero=fold)
    ref = at.kv4_decode_attention_ref(q, cache, bt, sl, cu, scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_decode_skips_padding_entries():
    """q_len 0 entries (CUDA-graph padding) leave their rows untouched; others are right."""
    g = torch.Generator().manual_seed(2)
    dev = _device()
    cache, bt, sl, _ = _paged([20, 0, 9], 1, 64, 16, g, dev)
    q = torch.randn(2, 3, 64, generator=g).to(dev)
    cu = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=dev)
    out = torch.full_like(q, 7.0)
    at.kv4_decode_attention(q, cache, bt, sl, cu, 0.125, out=out, num_splits=2, tile_n=16,
                            min_split=1)
    ref = at.kv4_decode_attention_ref(q, cache, bt, sl, cu, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


PREFILL_CASES = [
    # (Hkv, Hq, D, seq_lens, q_lens, unpack, heavy_first)
    (3, 9, 64, [5, 40, 33, 1], [5, 7, 33, 1], "sub", True),  # fresh prompt, context + chunk, GQA 3
    (2, 4, 128, [50, 17], [20, 16], "fold", True),
    (3, 9, 64, [5, 40, 33, 1], [5, 7, 33, 1], "magic", True),
    (2, 4, 128, [97, 17], [61, 16], "magic", False),   # several query blocks: unmasked interior
    (2, 4, 128, [97, 17], [61, 16], "sub", False),     # tiles, launched in order
]


@pytest.mark.parametrize("Hkv,Hq,D,seq_lens,q_lens,unpack,heavy", PREFILL_CASES)
def test_prefill_matches_reference(Hkv, Hq, D, seq_lens, q_lens, unpack, heavy):
    g = torch.Generator().manual_seed(sum(seq_lens) + D)
    dev = _device()
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, dev)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dev)
    cu = _cu(q_lens, dev)
    scale = 1 / math.sqrt(D)
    out = at.kv4_prefill_attention(q, cache, bt, sl, cu, scale, max(q_lens), block_m=32, tile_n=16,
                                   unpack=unpack, heavy_first=heavy)
    ref = at.kv4_prefill_attention_ref(q, cache, bt, sl, cu, scale, max(q_lens))
    # magic: products carry the offset 136 + z and the correction cancels it, which costs
    # fp32 ~136 x 2^-24 relative to the row's weight sum (1.1e-5 seen here at worst)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=3e-5 if unpack == "magic" else 1e-5)


def test_magic_unpack_decode_and_bad_modes():
    """The bf16 bit-pattern unpack gives the reference answer in decode too; an unknown
    mode, or fold_zero with another mode, is refused naming the value."""
    g = torch.Generator().manual_seed(5)
    dev = _device()
    cache, bt, sl, _ = _paged([1, 37, 80], 2, 64, 16, g, dev)
    q = torch.randn(3, 6, 64, generator=g).to(dev)
    cu = _cu([1, 1, 1], dev)
    out = at.kv4_decode_attention(q, cache, bt, sl, cu, 0.125, num_splits=2, tile_n=16,
                                  min_split=1, unpack="magic")
    ref = at.kv4_decode_attention_ref(q, cache, bt, sl, cu, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unpack must be one of .* got 'nibble'"):
        at.kv4_decode_attention(q, cache, bt, sl, cu, 0.125, unpack="nibble")
    with pytest.raises(ValueError, match="fold_zero=True asks for unpack='fold', got unpack='magic'"):
        at.kv4_prefill_attention(q, cache, bt, sl, cu, 0.125, 1, fold_zero=True, unpack="magic")


@pytest.mark.parametrize("block_m,tile_n,num_stages", [(256, 64, 2), (128, 32, None)])
def test_prefill_benchmark_settings_match_reference(block_m, tile_n, num_stages):
    """Settings the benchmark's prefill sweep times (more rows per tile, explicit
    pipelining depth) give the reference answer; a depth below 1 is refused."""
    g = torch.Generator().manual_seed(41)
    dev = _device()
    seq_lens, q_lens = [70, 9], [40, 9]
    cache, bt, sl, _ = _paged(seq_lens, 2, 64, 16, g, dev)
    q = torch.randn(sum(q_lens), 8, 64, generator=g).to(dev)
    cu = _cu(q_lens, dev)
    out = at.kv4_prefill_attention(q, cache, bt, sl, cu, 0.125, max(q_lens), block_m=block_m,
                                   tile_n=tile_n, num_stages=num_stages)
    ref = at.kv4_prefill_attention_ref(q, cache, bt, sl, cu, 0.125, max(q_lens))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_stages must be >= 1"):
        at.kv4_prefill_attention(q, cache, bt, sl, cu, 0.125, max(q_lens), num_stages=0)


def test_mixed_batch_decodes_unsplit_by_default(monkeypatch):
    """The decode part of a mixed batch runs with one split unless told otherwise (one
    kernel variant to compile while serving, whatever the batch size)."""
    seen = []
    real = at.kv4_decode_attention

    def spy(*a, **kw):
        seen.append(kw.get("num_splits"))
        return real(*a, **kw)
    monkeypatch.setattr(at, "kv4_decode_attention", spy)
    g = torch.Generator().manual_seed(3)
    dev = _device()
    cache, bt, sl, _ = _paged([20, 9], 1, 64, 16, g, dev)
    q = torch.randn(1 + 9, 2, 64, generator=g).to(dev)
    cu = _cu([1, 9], dev)
    out = at.kv4_mixed_attention(q, cache, bt, sl, cu, 0.125, 9, prefill_kw={"block_m": 16,
                                                                             "tile_n": 16})
    at.kv4_mixed_attention(q, cache, bt, sl, cu, 0.125, 9, decode_kw={"num_splits": 4},
                           prefill_kw={"block_m": 16, "tile_n": 16})
    assert seen == [1, 4]
    ref = at.kv4_mixed_attention_ref(q, cache, bt, sl, cu, 0.125, 9)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unpack", ["sub", "magic"])
def test_mixed_batch_splits_on_device(unpack):
    """kv4_mixed_attention: one-row sequences (decodes, a 1-token chunk) through the decode
    kernel, the rest through the prefill kernel, a padding entry untouched; equal to the
    reference, and each kernel alone leaves the other's rows as they were."""
    g = torch.Generator().manual_seed(17)
    dev = _device()
    seq_lens, q_lens = [40, 1, 33, 70, 5, 0], [1, 1, 12, 1, 5, 0]
    cache, bt, sl, _ = _paged(seq_lens, 2, 64, 16, g, dev)
    q = torch.randn(sum(q_lens), 6, 64, generator=g).to(dev)
    cu = _cu(q_lens, dev)
    ref = at.kv4_mixed_attention_ref(q, cache, bt, sl, cu, 0.125, max(q_lens))
    kw = dict(unpack=unpack, tile_n=16)
    out = at.kv4_mixed_attention(q, cache, bt, sl, cu, 0.125, max(q_lens),
                                 prefill_kw=dict(kw, block_m=16),
                                 decode_kw=dict(kw, num_splits=2, min_split=1))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=3e-5)
    single = torch.zeros(q.shape[0], dtype=torch.bool)
    for i, n in enumerate(q_lens):
        if n == 1:
            single[int(cu[i])] = True
    d = at.kv4_decode_attention(q, cache, bt, sl, cu, 0.125, out=torch.full_like(q, 7.0),
                                single_rows_only=True, num_splits=2, min_split=1, tile_n=16)
    p = at.kv4_prefill_attention(q, cache, bt, sl, cu, 0.125, max(q_lens),
                                 out=torch.full_like(q, 7.0), skip_single_rows=True,
                                 block_m=16, tile_n=16)
    assert bool((d[~single.to(dev)] == 7.0).all()) and bool((p[single.to(dev)] == 7.0).all())
    torch.testing.assert_close(d[single.to(dev)], ref[single.to(dev)], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p[~single.to(dev)], ref[~single.to(dev)], rtol=1e-4, atol=1e-5)


def test_prefill_equals_decode_on_last_token():
    g = torch.Generator().manual_seed(9)
    dev = _device()
    cache, bt, sl, _ = _paged([23, 31], 3, 64, 16, g, dev)
    q = torch.randn(2, 9, 64, generator=g).to(dev)
    cu = _cu([1, 1], dev)
    a = at.kv4_prefill_attention(q, cache, bt, sl, cu, 0.125, 1, block_m=16, tile_n=16)
    b = at.kv4_decode_attention(q, cache, bt, sl, cu, 0.125, num_splits=2, tile_n=16, min_split=1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_end_to_end_sqnr_against_unquantized_attention():
    """Write (R3 + int4) then attend: close to fp32 attention on the original K/V."""
    g = torch.Generator().manual_seed(4)
    dev = _device()
    Hkv, Hq, D, L = 3, 9, 64, 48
    cache, bt, sl, raw = _paged([L], Hkv, D, 16, g, dev)
    q = torch.randn(1, Hq, D, generator=g)
    out = at.kv4_decode_attention(q.to(dev), cache, bt, sl, _cu([1], dev), 1 / math.sqrt(D),
                                  num_splits=1, tile_n=16).cpu()
    k, v = raw[0]
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(3, 0),
        v.transpose(0, 1).repeat_interleave(3, 0)).transpose(0, 1)
    assert _sqnr_db(ref, out) > 15.0


def test_attention_rejects_bad_inputs():
    cache = kc.allocate_kv4_cache(2, 16, 2, 64, "cpu")
    bt = torch.zeros(1, 2, dtype=torch.int32)
    sl = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        at.kv4_decode_attention(torch.zeros(1, 3, 64), cache, bt, sl, _cu([1], "cpu"), 1.0)
    with pytest.raises(ValueError, match="num_seqs"):
        at.kv4_decode_attention(torch.zeros(1, 4, 64), cache, bt, sl, _cu([1, 1], "cpu"), 1.0)
    with pytest.raises(ValueError, match="power of two"):
        at.kv4_decode_attention(torch.zeros(1, 4, 64), cache, bt, sl, _cu([1], "cpu"), 1.0,
                                num_splits=3)


# ----------------------------------------------------------------------------
# GPU: real sizes in bf16
# ----------------------------------------------------------------------------
def _bf16_sdpa_error(q, cache, bt, sl, cu, scale, ref):
    """Error of bf16 sdpa on the dequantized cache: the tolerance yardstick."""
    out = torch.empty_like(ref)
    D = q.shape[2]
    cul = cu.tolist()
    for i, L in enumerate(sl.tolist()):
        a, b = cul[i], cul[i + 1]
        k, v = kc.kv4_cache_gather_ref(cache, bt[i], L, D)
        qr = hadamard_transform_ref(q[a:b].float(), D).bfloat16()
        rep = q.shape[1] // k.shape[1]
        n = b - a
        qpos = torch.arange(L - n, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(
            qr.transpose(0, 1), k.bfloat16().transpose(0, 1).repeat_interleave(rep, 0),
            v.bfloat16().transpose(0, 1).repeat_interleave(rep, 0), attn_mask=mask, scale=scale)
        out[a:b] = o.transpose(0, 1).float()
    return (out - ref).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("Hkv,Hq,D", [(8, 32, 128), (3, 9, 64)])
def test_decode_gpu_bf16(Hkv, Hq, D):
    g = torch.Generator().manual_seed(21)
    seq_lens = [1, 100, 1023, 4097] * 2
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, "cuda", dtype=torch.bfloat16)
    S = len(seq_lens)
    q = torch.randn(S, Hq, D, generator=g).bfloat16().cuda()
    cu = _cu([1] * S, "cuda")
    scale = 1 / math.sqrt(D)
    ref = at.kv4_decode_attention_ref(q.float(), cache, bt, sl, cu, scale)
    tol = 2 * _bf16_sdpa_error(q, cache, bt, sl, cu, scale, ref) + 2e-3
    for splits, min_split, unpack in ((None, 256, "sub"), (1, 128, "sub"), (16, 1, "fold"),
                                      (32, 256, "fold"), (None, 256, "magic")):
        out = at.kv4_decode_attention(q, cache, bt, sl, cu, scale, num_splits=splits,
                                      min_split=min_split, unpack=unpack)
        assert (out.float() - ref).abs().max().item() <= tol, unpack


def _bf16_case(seed, seq_lens, q_lens):
    """Llama-3-8B attention shapes on the GPU in bf16: the inputs, the float32 reference
    and the tolerance (twice bf16 sdpa's own error, plus 2e-3)."""
    g = torch.Generator().manual_seed(seed)
    Hkv, Hq, D = 8, 32, 128
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, "cuda", dtype=torch.bfloat16)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).bfloat16().cuda()
    cu = _cu(q_lens, "cuda")
    scale = 1 / math.sqrt(D)
    ref = at.kv4_prefill_attention_ref(q.float(), cache, bt, sl, cu, scale, max(q_lens))
    tol = 2 * _bf16_sdpa_error(q, cache, bt, sl, cu, scale, ref) + 2e-3
    return (q, cache, bt, sl, cu, scale), ref, tol


@pytest.mark.gpu
def test_prefill_gpu_bf16():
    q_lens = [1000, 45, 513]
    args, ref, tol = _bf16_case(22, [1000, 300, 2049], q_lens)
    for unpack, heavy, bm, tn, nw in (("sub", True, 128, 32, 4), ("fold", True, 128, 32, 4),
                                      ("magic", True, 128, 32, 4), ("sub", False, 128, 32, 4),
                                      ("magic", True, 256, 64, 8)):
        out = at.kv4_prefill_attention(*args, max(q_lens), unpack=unpack, heavy_first=heavy,
                                       block_m=bm, tile_n=tn, num_warps=nw)
        assert (out.float() - ref).abs().max().item() <= tol, (unpack, heavy, bm)


@pytest.mark.gpu
def test_mixed_split_gpu_bf16():
    """kv4_mixed_attention on a batch of decodes and prefill chunks, Llama-3-8B shapes in bf16."""
    q_lens = [1, 1000, 1, 513, 1, 7]
    args, ref, tol = _bf16_case(23, [4097, 1000, 300, 2049, 1, 40], q_lens)
    for unpack in ("sub", "magic"):
        out = at.kv4_mixed_attention(*args, max(q_lens), prefill_kw={"unpack": unpack},
                                     decode_kw={"unpack": unpack})
        assert (out.float() - ref).abs().max().item() <= tol, unpack


@pytest.mark.gpu
def test_prefill_dense_gpu_bf16():
    """Dequantize once + varlen flash: same answer as the reference (bottom-right causal)."""
    seq_lens, q_lens = [1000, 300, 2049, 7], [1000, 45, 513, 1]
    args, ref, tol = _bf16_case(23, seq_lens, q_lens)
    out = at.kv4_prefill_attention_dense(*args, max(q_lens), max(seq_lens))
    assert (out.float() - ref).abs().max().item() <= tol


def _varlen_attn_cpu(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size):
    """Plain-PyTorch stand-in for ``torch.nn.attention.varlen.varlen_attn`` (CUDA only):
    causal with the mask aligned to the last key (bottom-right), float32."""
    assert window_size == (-1, 0)
    out = torch.zeros_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        n, L = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if n == 0:
            continue
        qs = q[cq[i]:cq[i + 1]].float().transpose(0, 1)          # (H, n, D)
        ks = k[ck[i]:ck[i + 1]].float().transpose(0, 1)
        vs = v[ck[i]:ck[i + 1]].float().transpose(0, 1)
        mask = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[cq[i]:cq[i + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


@pytest.mark.parametrize("had", [None, 32])
def test_prefill_dense_path_cpu(had):
    """The dense prefill's own code (dequantize, R3 on q, GQA repeat, scale) on CPU,
    with a plain-PyTorch varlen attention in place of the CUDA-only one; the public
    entry point refuses CPU with its documented ValueError."""
    g = torch.Generator().manual_seed(29)
    Hkv, Hq, D = 2, 6, 64
    seq_lens, q_lens = [20, 37, 5], [20, 3, 1]
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, "cpu", had=had)
    q = torch.randn(sum(q_lens), Hq, D, generator=g)
    cu = _cu(q_lens, "cpu")
    scale = 1 / math.sqrt(D)
    with pytest.raises(ValueError, match="fp16/bf16 on CUDA"):
        at.kv4_prefill_attention_dense(q, cache, bt, sl, cu, scale, max(q_lens), max(seq_lens),
                                       had_size=had)
    out = at._prefill_dense(q, cache, bt, sl, cu, scale, max(q_lens), max(seq_lens), None, None,
                            had, None, _varlen_attn_cpu)
    ref = at.kv4_prefill_attention_ref(q, cache, bt, sl, cu, scale, max(q_lens), had_size=had)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_mixed_dense_gpu_bf16():
    """Mixed batch (decodes interleaved with prefills) through the dense split: same
    answer as the reference on every row."""
    args, ref, tol = _bf16_case(31, [700, 1000, 33, 2049, 5, 300], [1, 1000, 1, 513, 1, 45])
    out = at.kv4_mixed_attention_dense(*args)
    assert (out.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("q_lens", [[1, 20, 1, 3, 1], [20, 3], [1, 1, 1]])
def test_mixed_dense_split_cpu(q_lens):
    """The split of a mixed batch: the dense path sees only sequences with more than
    one query row (no decode's context is dequantized), the decode path only the
    one-row ones, and every output row matches the reference wherever it sat."""
    g = torch.Generator().manual_seed(37)
    Hkv, Hq, D, had = 2, 6, 64, 32
    seq_lens = [20, 37, 5, 17, 9][:len(q_lens)]
    seq_lens = [max(s, n) for s, n in zip(seq_lens, q_lens)]
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, "cpu", had=had)
    q = torch.randn(sum(q_lens), Hq, D, generator=g)
    cu = _cu(q_lens, "cpu")
    scale = 1 / math.sqrt(D)
    seen = {"dense": [], "decode": []}

    def dense(qs, b, s, c, max_q, max_k, total):
        seen["dense"].append(s.tolist())
        assert max_q == max(c.diff().tolist()) and max_k == max(s.tolist()) and total == s.sum()
        return at._prefill_dense(qs, cache, b, s, c, scale, max_q, max_k, total, None, had,
                                 None, _varlen_attn_cpu)

    def decode(qs, b, s, c):
        seen["decode"].append(s.tolist())
        assert c.tolist() == list(range(len(s) + 1))
        return at.kv4_decode_attention_ref(qs, cache, b, s, c, scale, had_size=had)

    out = at._split_mixed(q, bt, sl, cu, torch.full_like(q, float("nan")), dense, decode)
    ref = at.kv4_prefill_attention_ref(q, cache, bt, sl, cu, scale, max(q_lens), had_size=had)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    pre = [s for s, n in zip(seq_lens, q_lens) if n > 1]
    dec = [s for s, n in zip(seq_lens, q_lens) if n == 1]
    assert seen == {"dense": [pre] if pre else [], "decode": [dec] if dec else []}
    with pytest.raises(ValueError, match="fp16/bf16 on CUDA"):
        at.kv4_mixed_attention_dense(q, cache, bt, sl, cu, scale, had_size=had)


@pytest.mark.parametrize("split_decodes,had", [(False, None), (True, 32)])
def test_mixed_flash_cpu(split_decodes, had):
    """kv4_mixed_attention_flash on CPU with the plain-PyTorch varlen stand-in: fresh prompts
    (one of a single token), a chunk with cached context, decodes and a padding entry all get
    the reference answer; the flash call sees, for each fresh prompt, exactly its tokens as the
    cache holds them; the prefill kernel with skip_fresh leaves fresh rows untouched."""
    g = torch.Generator().manual_seed(41)
    Hkv, Hq, D = 2, 6, 64
    seq_lens, q_lens = [20, 37, 1, 17, 9, 0, 5], [20, 3, 1, 1, 9, 0, 1]
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, "cpu", had=had)
    q = torch.randn(sum(q_lens), Hq, D, generator=g)
    cu = _cu(q_lens, "cpu")
    scale = 1 / math.sqrt(D)
    ref = at.kv4_prefill_attention_ref(q, cache, bt, sl, cu, scale, max(q_lens), had_size=had)
    seen = []

    def varlen(qr, k, v, c, max_q, sc, out):
        seen.append((k.clone(), v.clone(), c.tolist(), max_q, sc))
        return at.varlen_causal_ref(qr, k, v, c, max_q, sc, out)
    out = at.kv4_mixed_attention_flash(q, cache, bt, sl, cu, scale, max(q_lens),
                                       out=torch.full_like(q, float("nan")), had_size=had,
                                       varlen=varlen, split_decodes=split_decodes,
                                       prefill_kw={"block_m": 16, "tile_n": 16})
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    (k, v, c, max_q, sc), = seen
    assert c == cu.tolist() and max_q == 20 and sc == pytest.approx(scale / kc.had_norm(D, had))
    for i, (L, n) in enumerate(zip(seq_lens, q_lens)):
        if L == n and n:
            ks, vs = kc.kv4_cache_gather_ref(cache, bt[i], L, D)
            torch.testing.assert_close(k[c[i]:c[i + 1]], ks, rtol=0, atol=1e-6)
            torch.testing.assert_close(v[c[i]:c[i + 1]], vs, rtol=0, atol=1e-6)
    fresh = torch.zeros(q.shape[0], dtype=torch.bool)
    for i, (L, n) in enumerate(zip(seq_lens, q_lens)):
        fresh[c[i]:c[i + 1]] = L == n
    p = at.kv4_prefill_attention(q, cache, bt, sl, cu, scale, max(q_lens), had_size=had,
                                 out=torch.full_like(q, 7.0), skip_fresh=True, block_m=16,
                                 tile_n=16)
    assert bool((p[fresh] == 7.0).all())
    torch.testing.assert_close(p[~fresh], ref[~fresh], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_mixed_flash_gpu_bf16():
    """kv4_mixed_attention_flash on Llama-3-8B shapes in bf16 (fresh 1000- and 513-token
    prompts, a chunk with context, decodes), through torch's varlen_attn and, where vLLM is
    installed, through the FlashAttention the plugin uses."""
    seq_lens, q_lens = [1000, 1000, 33, 513, 5, 300], [1, 1000, 1, 513, 1, 45]
    args, ref, tol = _bf16_case(43, seq_lens, q_lens)
    varlens = [("torch", None)]
    try:
        from spinquant_vllm.attention import flash_varlen
        varlens.append(flash_varlen()[::-1])
    except ImportError:
        pass
    for name, fn in varlens:
        for split in (False, True):
            out = at.kv4_mixed_attention_flash(*args, max(q_lens), varlen=fn, split_decodes=split)
            assert (out.float() - ref).abs().max().item() <= tol, (name, split)


@pytest.mark.parametrize("module", ["attention", "kv_cache", "w4a4_gemm", "hadamard_quant",
                                    "hadamard", "linear", "format"])
def test_kernel_modules_resolve_every_global(module):
    """Every global name a function of the kernels package reads exists (a missing
    import in a CUDA-only path raised NameError only on the H100)."""
    import builtins
    import dis
    import importlib
    import types

    mod = importlib.import_module(f"spinquant_kernels.{module}")

    def codes(co):
        yield co
        for c in co.co_consts:
            if isinstance(c, types.CodeType):
                yield from codes(c)

    missing = []
    for name, obj in vars(mod).items():
        fn = getattr(obj, "fn", obj)              # triton.jit / autotune wrappers
        fn = getattr(fn, "fn", fn)
        if not isinstance(fn, types.FunctionType) or fn.__module__ != mod.__name__:
            continue
        for co in codes(fn.__code__):
            for ins in dis.get_instructions(co):
                if ins.opname == "LOAD_GLOBAL" and ins.argval not in vars(mod) \
                        and not hasattr(builtins, ins.argval):
                    missing.append(f"{name}: {ins.argval}")
    assert not missing, f"undefined globals in spinquant_kernels.{module}: {missing}"
