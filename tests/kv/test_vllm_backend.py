"""The vLLM side: registration, the hook on a real vLLM Attention layer, page sizing, impl calls."""

import math
import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CacheConfig, DeviceConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers.attention.attention import Attention  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode  # noqa: E402

from spinquant_kernels import attention as at  # noqa: E402
from spinquant_kernels import format as fmt  # noqa: E402
from spinquant_kernels import kv_cache as kc  # noqa: E402
from spinquant_kernels.format import SpinQuantConfig  # noqa: E402
from spinquant_vllm import attention as sa  # noqa: E402


# the Triton interpreter (CPU runs) converts loop bounds through numpy scalars
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning")


def _vllm_config(cache_dtype="auto"):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return VllmConfig(device_config=DeviceConfig(device=dev),
                      cache_config=CacheConfig(cache_dtype=cache_dtype))


_layer_ids = iter(range(10 ** 6))


def _layer(vc, num_heads=9, head_size=64, num_kv_heads=3, **kw):
    """A vLLM Attention layer built as vLLM would (Triton backend passed explicitly on CPU)."""
    prefix = f"model.layers.{next(_layer_ids)}.self_attn.attn"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with set_current_vllm_config(vc):
            layer = Attention(num_heads, head_size, 1 / math.sqrt(head_size),
                              num_kv_heads=num_kv_heads, cache_config=vc.cache_config,
                              prefix=prefix, attn_backend=TritonAttentionBackend, **kw)
    finally:
        torch.set_default_dtype(old)
    return layer, prefix


def test_register_is_idempotent():
    sa.register_attention_backend()
    sa.register_attention_backend()
    assert AttentionBackendEnum.CUSTOM.get_class() is sa.SpinQuantKV4Backend
    assert sa.SpinQuantKV4Backend.get_name() == "CUSTOM"
    # full CUDA graphs for pure decode only: the prefill grid depends on max_query_len
    assert sa.SpinQuantKV4Backend.get_builder_cls()._cudagraph_support \
        == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


@pytest.mark.parametrize("head_size", [64, 128])
def test_page_size_matches_layout_and_capacity(head_size):
    """vLLM's int4 page spec sizes exactly our layout: >= 3.5x the bf16 capacity."""
    bs, H = 16, 8
    spec4 = FullAttentionSpec(block_size=bs, num_kv_heads=H, head_size=head_size,
                              head_size_v=head_size, dtype=torch.uint8,
                              kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD)
    spec16 = FullAttentionSpec(block_size=bs, num_kv_heads=H, head_size=head_size,
                               head_size_v=head_size, dtype=torch.bfloat16)
    shape = sa.SpinQuantKV4Backend.get_kv_cache_shape(1, bs, H, head_size, "auto")
    assert math.prod(shape) == spec4.page_size_bytes
    assert spec16.page_size_bytes / spec4.page_size_bytes >= 3.5


def test_hook_switches_layer_and_is_idempotent():
    vc = _vllm_config()
    layer, prefix = _layer(vc)
    cfg = SpinQuantConfig(r3_size=64, kv_clip=0.95)
    assert sa.get_attention_quant_method(layer, prefix, cfg) is None
    impl = layer.impl
    assert isinstance(impl, sa.SpinQuantKV4Impl)
    assert impl.had_size == 64 and impl.kv_clip == 0.95
    assert layer.attn_backend is sa.SpinQuantKV4Backend
    assert layer.backend == AttentionBackendEnum.CUSTOM
    assert layer.kv_cache_dtype == sa.KV_CACHE_DTYPE
    spec = layer.get_kv_cache_spec(vc)
    assert spec.kv_quant_mode == KVQuantMode.INT4_PER_TOKEN_HEAD and spec.dtype == torch.uint8
    assert spec.page_size_bytes == math.prod(
        sa.SpinQuantKV4Backend.get_kv_cache_shape(1, spec.block_size, 3, 64))
    sa.get_attention_quant_method(layer, prefix, cfg)
    assert layer.impl is impl


def test_hook_leaves_kv16_and_explicit_dtypes_alone():
    vc = _vllm_config()
    layer, prefix = _layer(vc)
    impl = layer.impl
    sa.get_attention_quant_method(layer, prefix, SpinQuantConfig(kv_bits=16))
    assert layer.impl is impl
    vc = _vllm_config(cache_dtype="int4_per_token_head")
    layer, prefix = _layer(vc)
    impl = layer.impl
    sa.get_attention_quant_method(layer, prefix, SpinQuantConfig(r3_size=64))
    assert layer.impl is impl and layer.attn_backend is TritonAttentionBackend


def test_hook_refuses_unsupported_layers():
    vc = _vllm_config()
    layer, prefix = _layer(vc, per_layer_sliding_window=128)
    with pytest.raises(ValueError, match="sliding_window"):
        sa.get_attention_quant_method(layer, prefix, SpinQuantConfig(r3_size=64))
    layer, prefix = _layer(vc)
    with pytest.raises(ValueError, match="r3_size"):
        sa.get_attention_quant_method(layer, prefix, SpinQuantConfig(r3_size=48))


def test_impl_write_and_attend_match_references():
    """The impl's do_kv_cache_update + forward (mixed then decode batch) vs the references."""
    vc = _vllm_config()
    layer, prefix = _layer(vc)
    sa.get_attention_quant_method(layer, prefix, SpinQuantConfig(r3_size=64))
    impl = layer.impl
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, bs, nb = 9, 3, 64, 16, 8
    shape = sa.SpinQuantKV4Backend.get_kv_cache_shape(nb, bs, Hkv, D)
    with set_current_vllm_config(vc):
        order = sa.SpinQuantKV4Backend.get_kv_cache_stride_order()
    phys = torch.zeros([shape[i] for i in order], dtype=torch.uint8, device=dev)
    inv = [order.index(i) for i in range(4)]
    kv_cache = phys.permute(*inv)
    assert tuple(kv_cache.shape) == shape
    ref_cache = torch.zeros_like(kv_cache)
    block_table = torch.tensor([[3, 1, 6], [0, 2, 5]], dtype=torch.int32, device=dev)
    seq_lens = torch.tensor([20, 7], dtype=torch.int32, device=dev)
    q_lens = [20, 7]
    pos = [torch.arange(L) for L in q_lens]
    slots = torch.cat([block_table[i].cpu().long()[p // bs] * bs + p % bs
                       for i, p in enumerate(pos)]).to(dev)
    T = sum(q_lens)
    q = torch.randn(T, Hq, D, generator=g).to(dev)
    k = torch.randn(T, Hkv, D, generator=g).to(dev)
    v = torch.randn(T, Hkv, D, generator=g).to(dev)
    impl.do_kv_cache_update(layer, k, v, kv_cache, slots)
    kc.kv4_cache_write_ref(k, v, ref_cache, slots, had_size=64)
    v0, vw = kc.codes_offset(1, D), kc.word_index(1, D)              # V: no rotation, exact
    assert torch.equal(kv_cache[..., v0:v0 + D // 2], ref_cache[..., v0:v0 + D // 2])
    assert torch.equal(kv_cache.view(torch.int32)[..., vw], ref_cache.view(torch.int32)[..., vw])
    qa = fmt.unpack_int4(kv_cache[..., :D // 2].contiguous()).int()
    qb = fmt.unpack_int4(ref_cache[..., :D // 2].contiguous()).int()
    assert int((qa - qb).abs().max()) <= 1                           # K: summation-order ties
    cu = torch.tensor([0, 20, 27], dtype=torch.int32, device=dev)
    meta = types.SimpleNamespace(num_actual_tokens=T, max_query_len=20, query_start_loc=cu,
                                 seq_lens=seq_lens, block_table=block_table, slot_mapping=slots)
    ref = at.kv4_mixed_attention_flash_ref(q, kv_cache, block_table, seq_lens, cu, impl.scale, 20)
    out = torch.full((T, Hq, D), 7.0, device=dev)   # two fresh prompts
    impl.forward(layer, q, k, v, kv_cache, meta, out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=3e-5)
    # one decode step for both sequences
    q1 = torch.randn(2, Hq, D, generator=g).to(dev)
    k1 = torch.randn(2, Hkv, D, generator=g).to(dev)
    v1 = torch.randn(2, Hkv, D, generator=g).to(dev)
    seq_lens = seq_lens + 1
    s1 = torch.tensor([block_table[0, 1] * bs + 4, block_table[1, 0] * bs + 7], device=dev)
    impl.do_kv_cache_update(layer, k1, v1, kv_cache, s1)
    cu1 = torch.tensor([0, 1, 2], dtype=torch.int32, device=dev)
    meta = types.SimpleNamespace(num_actual_tokens=2, max_query_len=1, query_start_loc=cu1,
                                 seq_lens=seq_lens, block_table=block_table, slot_mapping=s1)
    out1 = torch.empty(2, Hq, D, device=dev)
    impl.forward(layer, q1, k1, v1, kv_cache, meta, out1)
    ref1 = at.kv4_decode_attention_ref(q1, kv_cache, block_table, seq_lens, cu1, impl.scale)
    torch.testing.assert_close(out1, ref1, rtol=1e-4, atol=3e-5)
    # a mixed step (chunked prefill): sequence 0 decodes, sequence 1 gets a 4-token chunk
    q2 = torch.randn(5, Hq, D, generator=g).to(dev)
    k2 = torch.randn(5, Hkv, D, generator=g).to(dev)
    v2 = torch.randn(5, Hkv, D, generator=g).to(dev)
    s2 = torch.tensor([block_table[0, 1] * bs + 5] + [block_table[1, 0] * bs + 8 + i
                                                      for i in range(4)], device=dev)
    impl.do_kv_cache_update(layer, k2, v2, kv_cache, s2)
    seq_lens = seq_lens + torch.tensor([1, 4], dtype=torch.int32, device=dev)
    cu2 = torch.tensor([0, 1, 5], dtype=torch.int32, device=dev)
    meta = types.SimpleNamespace(num_actual_tokens=5, max_query_len=4, query_start_loc=cu2,
                                 seq_lens=seq_lens, block_table=block_table, slot_mapping=s2)
    ref2 = at.kv4_mixed_attention_flash_ref(q2, kv_cache, block_table, seq_lens, cu2, impl.scale,
                                            4)
    out2 = torch.full((5, Hq, D), 7.0, device=dev)
    impl.forward(layer, q2, k2, v2, kv_cache, meta, out2)
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=3e-5)
    # profiling run: no metadata
    assert impl.forward(layer, q1, k1, v1, kv_cache, None, out1).abs().sum() == 0


def test_fresh_prompt_attention_is_chosen_by_device_and_dtype(monkeypatch):
    """Fresh prompts: the plain-PyTorch stand-in on the CPU; on the GPU vLLM's
    FlashAttention (or torch's varlen_attn) for 16-bit activations and none for fp32 (the
    Triton prefill kernel answers them). The impl resolves it once per dtype."""
    cuda = torch.device("cuda", 0)
    assert sa.fresh_prompt_varlen(torch.device("cpu"), torch.float32) is at.varlen_causal_ref
    assert sa.fresh_prompt_varlen(cuda, torch.float32) is None
    flash = object()
    monkeypatch.setattr(sa, "flash_varlen", lambda: (flash, "stub"))
    assert sa.fresh_prompt_varlen(cuda, torch.bfloat16) is flash
    assert sa.fresh_prompt_varlen(cuda, torch.float16) is flash
    calls = []
    real = sa.fresh_prompt_varlen

    def counted(device, dtype):
        calls.append((device.type, dtype))
        return real(device, dtype)
    monkeypatch.setattr(sa, "fresh_prompt_varlen", counted)
    impl = sa.SpinQuantKV4Impl(8, 64, 0.125, 2)
    for _ in range(3):
        assert impl._fresh_varlen(cuda, torch.bfloat16) is flash
        assert impl._fresh_varlen(cuda, torch.float32) is None
    assert calls == [("cuda", torch.bfloat16), ("cuda", torch.float32)]


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_kv_heads_split_across_ranks_match_tp1(tp):
    """Tensor parallelism hands each rank's Attention layer its own heads (vLLM's Llama: query
    heads 8/tp; kv heads 4/tp, or at tp 8 one kv head replicated on two ranks). Each rank's
    cache write gives the TP=1 cache of its kv heads bit for bit (quantization and R3 are per
    (token, kv head)), and its attention the TP=1 output of its query heads (bit for bit while
    the query group per kv head is the same)."""
    vc = _vllm_config()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    Hq, Hkv, D, bs, nb = 8, 4, 64, 16, 6
    cfg = SpinQuantConfig(r3_size=64)
    g = torch.Generator().manual_seed(5)
    q_lens = [19, 6]
    T = sum(q_lens)
    q = torch.randn(T, Hq, D, generator=g).to(dev)
    k = torch.randn(T, Hkv, D, generator=g).to(dev)
    v = torch.randn(T, Hkv, D, generator=g).to(dev)
    block_table = torch.tensor([[4, 1], [0, 3]], dtype=torch.int32, device=dev)
    seq_lens = torch.tensor(q_lens, dtype=torch.int32, device=dev)
    slots = torch.cat([block_table[i].cpu().long()[p // bs] * bs + p % bs
                       for i, p in enumerate(torch.arange(L) for L in q_lens)]).to(dev)
    cu = torch.tensor([0, 19, 25], dtype=torch.int32, device=dev)
    meta = types.SimpleNamespace(num_actual_tokens=T, max_query_len=19, query_start_loc=cu,
                                 seq_lens=seq_lens, block_table=block_table, slot_mapping=slots)

    def run(hq, hkv, q_, k_, v_):
        layer, prefix = _layer(vc, num_heads=hq, head_size=D, num_kv_heads=hkv)
        sa.get_attention_quant_method(layer, prefix, cfg)
        cache = torch.zeros(sa.SpinQuantKV4Backend.get_kv_cache_shape(nb, bs, hkv, D),
                            dtype=torch.uint8, device=dev)
        layer.impl.do_kv_cache_update(layer, k_, v_, cache, slots)
        out = torch.zeros(T, hq, D, device=dev)
        layer.impl.forward(layer, q_, k_, v_, cache, meta, out)
        return cache, out

    cache1, out1 = run(Hq, Hkv, q, k, v)
    hq, hkv = Hq // tp, max(1, Hkv // tp)
    for rank in range(tp):
        qh = slice(rank * hq, (rank + 1) * hq)
        kv0 = rank * hq * Hkv // Hq               # the kv head of this rank's first query head
        kvh = slice(kv0, kv0 + hkv)
        cache, out = run(hq, hkv, q[:, qh].contiguous(), k[:, kvh].contiguous(),
                         v[:, kvh].contiguous())
        assert torch.equal(cache, cache1[:, kvh]), (tp, rank)
        if hq // hkv == Hq // Hkv:
            assert torch.equal(out, out1[:, qh]), (tp, rank)
        else:
            # a replicated kv head serves one query head here, two at TP=1: the kernels
            # tile the group differently, so the float sums run in another order
            torch.testing.assert_close(out, out1[:, qh], rtol=1e-5, atol=1e-6)
