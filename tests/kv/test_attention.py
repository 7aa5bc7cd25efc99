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


# The kernels feed codes with the offset 128 - qmin (136 for 4 bits) and one correction
# cancels it, which costs fp32 ~136 x 2^-24 relative to the row's weight sum (1.1e-5 seen at
# worst): the absolute tolerance of the float32 comparisons.
ATOL = 3e-5

DECODE_CASES = [
    # (Hkv, Hq, D, seq_lens, num_splits, min_split)
    (3, 9, 64, [1, 15, 16, 17, 40], 1, 1),     # SmolLM2 GQA; lengths straddle block / tile
    (3, 9, 64, [1, 15, 16, 17, 40], 4, 1),     # split context + reduce (some splits empty)
    (2, 8, 128, [33, 64, 65, 0], 2, 128),      # min_split: one live split; empty sequence
    (1, 1, 128, [70], 8, 1),                   # MHA, more splits than tiles
]


@pytest.mark.parametrize("Hkv,Hq,D,seq_lens,splits,min_split", DECODE_CASES)
def test_decode_matches_reference(Hkv, Hq, D, seq_lens, splits, min_split):
    g = torch.Generator().manual_seed(len(seq_lens) * 7 + D + splits)
    dev = _device()
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, dev)
    S = len(seq_lens)
    q = torch.randn(S, Hq, D, generator=g).to(dev)
    cu = _cu([1] * S, dev)
    scale = 1 / math.sqrt(D)
    out = at.kv4_decode_attention(q, cache, bt, sl, cu, scale, num_splits=splits, tile_n=16,
                                  min_split=min_split)
    ref = at.kv4_decode_attention_ref(q, cache, bt, sl, cu, scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=ATOL)


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
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=ATOL)


PREFILL_CASES = [
    # (Hkv, Hq, D, seq_lens, q_lens)
    (3, 9, 64, [5, 40, 33, 1], [5, 7, 33, 1]),   # fresh prompt, context + chunk, GQA 3
    (2, 4, 128, [50, 17], [20, 16]),
    (2, 4, 128, [97, 17], [61, 16]),             # several query blocks: unmasked interior tiles
]


@pytest.mark.parametrize("Hkv,Hq,D,seq_lens,q_lens", PREFILL_CASES)
def test_prefill_matches_reference(Hkv, Hq, D, seq_lens, q_lens):
    g = torch.Generator().manual_seed(sum(seq_lens) + D)
    dev = _device()
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, dev)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dev)
    cu = _cu(q_lens, dev)
    scale = 1 / math.sqrt(D)
    out = at.kv4_prefill_attention(q, cache, bt, sl, cu, scale, max(q_lens), block_m=32, tile_n=16)
    ref = at.kv4_prefill_attention_ref(q, cache, bt, sl, cu, scale, max(q_lens))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("block_m,tile_n,num_stages", [(256, 64, 2), (128, 32, None)])
def test_prefill_tile_overrides_match_reference(block_m, tile_n, num_stages):
    """Tile overrides a benchmark may pass (more rows per tile, explicit pipelining
    depth) give the reference answer; a depth below 1 is refused."""
    g = torch.Generator().manual_seed(41)
    dev = _device()
    seq_lens, q_lens = [70, 9], [40, 9]
    cache, bt, sl, _ = _paged(seq_lens, 2, 64, 16, g, dev)
    q = torch.randn(sum(q_lens), 8, 64, generator=g).to(dev)
    cu = _cu(q_lens, dev)
    out = at.kv4_prefill_attention(q, cache, bt, sl, cu, 0.125, max(q_lens), block_m=block_m,
                                   tile_n=tile_n, num_stages=num_stages)
    ref = at.kv4_prefill_attention_ref(q, cache, bt, sl, cu, 0.125, max(q_lens))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=ATOL)
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
    tiles = {"block_m": 16, "tile_n": 16}
    out = at.kv4_mixed_attention_flash(q, cache, bt, sl, cu, 0.125, 9, varlen=at.varlen_causal_ref,
                                       prefill_kw=tiles)
    at.kv4_mixed_attention_flash(q, cache, bt, sl, cu, 0.125, 9, varlen=at.varlen_causal_ref,
                                 decode_kw={"num_splits": 4}, prefill_kw=tiles)
    assert seen == [1, 4]
    ref = at.kv4_mixed_attention_flash_ref(q, cache, bt, sl, cu, 0.125, 9)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=ATOL)


def test_mixed_batch_without_flash_splits_on_device():
    """kv4_mixed_attention_flash with no flash kernel (fp32 on the GPU): one-row sequences
    (decodes, a 1-token chunk) through the decode kernel, the rest (fresh prompts included)
    through the prefill kernel, a padding entry untouched; equal to the reference, and each
    kernel alone leaves the other's rows as they were."""
    g = torch.Generator().manual_seed(17)
    dev = _device()
    seq_lens, q_lens = [40, 1, 33, 70, 5, 0], [1, 1, 12, 1, 5, 0]
    cache, bt, sl, _ = _paged(seq_lens, 2, 64, 16, g, dev)
    q = torch.randn(sum(q_lens), 6, 64, generator=g).to(dev)
    cu = _cu(q_lens, dev)
    ref = at.kv4_mixed_attention_flash_ref(q, cache, bt, sl, cu, 0.125, max(q_lens))
    out = at.kv4_mixed_attention_flash(q, cache, bt, sl, cu, 0.125, max(q_lens),
                                       out=torch.full_like(q, 7.0), varlen=None,
                                       prefill_kw=dict(tile_n=16, block_m=16),
                                       decode_kw=dict(tile_n=16, num_splits=2, min_split=1))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=ATOL)
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
    torch.testing.assert_close(d[single.to(dev)], ref[single.to(dev)], rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(p[~single.to(dev)], ref[~single.to(dev)], rtol=1e-4, atol=ATOL)


def test_prefill_equals_decode_on_last_token():
    g = torch.Generator().manual_seed(9)
    dev = _device()
    cache, bt, sl, _ = _paged([23, 31], 3, 64, 16, g, dev)
    q = torch.randn(2, 9, 64, generator=g).to(dev)
    cu = _cu([1, 1], dev)
    a = at.kv4_prefill_attention(q, cache, bt, sl, cu, 0.125, 1, block_m=16, tile_n=16)
    b = at.kv4_decode_attention(q, cache, bt, sl, cu, 0.125, num_splits=2, tile_n=16, min_split=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=ATOL)


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
    for splits, min_split in ((None, 256), (1, 128), (16, 1), (32, 256)):
        out = at.kv4_decode_attention(q, cache, bt, sl, cu, scale, num_splits=splits,
                                      min_split=min_split)
        assert (out.float() - ref).abs().max().item() <= tol, (splits, min_split)


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
    for bm, tn, nw in ((128, 32, 4), (256, 64, 8)):
        out = at.kv4_prefill_attention(*args, max(q_lens), block_m=bm, tile_n=tn, num_warps=nw)
        assert (out.float() - ref).abs().max().item() <= tol, bm


@pytest.mark.gpu
def test_mixed_without_flash_gpu_bf16():
    """kv4_mixed_attention_flash with no flash kernel (what fp32 models run) on a batch of
    decodes, fresh prompts and prefill chunks, Llama-3-8B shapes in bf16."""
    q_lens = [1, 1000, 1, 513, 1, 7]
    args, ref, tol = _bf16_case(23, [4097, 1000, 300, 2049, 1, 40], q_lens)
    out = at.kv4_mixed_attention_flash(*args, max(q_lens), varlen=None)
    assert (out.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("had", [None, 32])
def test_mixed_flash_with_reference_varlen(had):
    """kv4_mixed_attention_flash with the plain-PyTorch varlen stand-in: fresh prompts
    (one of a single token), a chunk with cached context, decodes and a padding entry all get
    the reference answer; the flash call sees, for each fresh prompt, exactly its tokens as the
    cache holds them; the prefill kernel with skip_fresh leaves fresh rows untouched."""
    g = torch.Generator().manual_seed(41)
    Hkv, Hq, D = 2, 6, 64
    seq_lens, q_lens = [20, 37, 1, 17, 9, 0, 5], [20, 3, 1, 1, 9, 0, 1]
    dev = _device()
    cache, bt, sl, _ = _paged(seq_lens, Hkv, D, 16, g, dev, had=had)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dev)
    cu = _cu(q_lens, dev)
    scale = 1 / math.sqrt(D)
    ref = at.kv4_mixed_attention_flash_ref(q, cache, bt, sl, cu, scale, max(q_lens), had_size=had)
    seen = []

    def varlen(qr, k, v, c, max_q, sc, out):
        seen.append((k.clone(), v.clone(), c.tolist(), max_q, sc))
        return at.varlen_causal_ref(qr, k, v, c, max_q, sc, out)
    out = at.kv4_mixed_attention_flash(q, cache, bt, sl, cu, scale, max(q_lens),
                                       out=torch.full_like(q, float("nan")), had_size=had,
                                       varlen=varlen, prefill_kw={"block_m": 16, "tile_n": 16})
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    (k, v, c, max_q, sc), = seen
    assert c == cu.tolist() and max_q == 20 and sc == pytest.approx(scale / kc.had_norm(D, had))
    for i, (L, n) in enumerate(zip(seq_lens, q_lens)):
        if L == n and n:
            ks, vs = kc.kv4_cache_gather_ref(cache, bt[i], L, D)
            torch.testing.assert_close(k[c[i]:c[i + 1]], ks, rtol=0, atol=1e-6)
            torch.testing.assert_close(v[c[i]:c[i + 1]], vs, rtol=0, atol=1e-6)
    fresh = torch.zeros(q.shape[0], dtype=torch.bool, device=dev)
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
    varlens = [("torch", at.torch_varlen_causal)]
    try:
        from spinquant_vllm.attention import flash_varlen
        varlens.append(flash_varlen()[::-1])
    except ImportError:
        pass
    for name, fn in varlens:
        out = at.kv4_mixed_attention_flash(*args, max(q_lens), varlen=fn)
        assert (out.float() - ref).abs().max().item() <= tol, name


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
