"""The quantization format spec: packing, quantizers, the W4A4 identity, the config.

Integer paths are checked bit-exactly; quantizers against their analytic
error bounds; the config through a JSON round trip.
"""

import dataclasses
import json

import pytest
import torch

from spinquant_kernels import format as fmt


# ----------------------------------------------------------------------------
# bit widths
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_code_range_from_bits(bits):
    assert fmt.qmin(bits) == -(2 ** (bits - 1))
    assert fmt.qmax(bits) == 2 ** (bits - 1) - 1
    assert fmt.qmax(bits) - fmt.qmin(bits) + 1 == 2 ** bits


def test_int4_range():
    assert (fmt.qmin(4), fmt.qmax(4)) == (-8, 7)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, "4", None])
def test_bad_bit_width(bits):
    with pytest.raises(ValueError, match="bit width"):
        fmt.qmax(bits)
    with pytest.raises(ValueError, match="bit width"):
        fmt.qmin(bits)


# ----------------------------------------------------------------------------
# int4 packing
# ----------------------------------------------------------------------------
def test_pack_every_code_pair_bit_exact():
    """All 256 (low, high) code pairs map to all 256 bytes and back."""
    codes = torch.arange(fmt.qmin(4), fmt.qmax(4) + 1, dtype=torch.int8)
    lo, hi = torch.meshgrid(codes, codes, indexing="ij")
    q = torch.stack((lo.reshape(-1), hi.reshape(-1)), dim=-1)         # (256, 2)
    p = fmt.pack_int4(q)
    assert p.shape == (256, 1) and p.dtype == torch.uint8
    assert sorted(p.reshape(-1).tolist()) == list(range(256))
    assert torch.equal(fmt.unpack_int4(p), q)
    all_bytes = torch.arange(256, dtype=torch.int16).to(torch.uint8).reshape(16, 16)
    assert torch.equal(fmt.pack_int4(fmt.unpack_int4(all_bytes)), all_bytes)


def test_nibble_order_low_first():
    # element 2j -> low nibble, 2j + 1 -> high nibble, two's complement
    q = torch.tensor([[1, -1, -8, 7, 0, 3]], dtype=torch.int8)
    p = fmt.pack_int4(q)
    assert p.tolist() == [[0xF1, 0x78, 0x30]]


@pytest.mark.parametrize("shape", [(2,), (1, 2), (3, 6), (7, 130), (2, 3, 16), (5, 0), (1, 128),
                                   (127, 254)])
def test_pack_roundtrip_shapes(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(fmt.qmin(4), fmt.qmax(4) + 1, shape, generator=g).to(torch.int8)
    if q.numel():
        q.view(-1)[0], q.view(-1)[-1] = fmt.qmin(4), fmt.qmax(4)
    before = q.clone()
    p = fmt.pack_int4(q)
    assert torch.equal(q, before), "pack_int4 mutated its input"
    assert p.shape == (*shape[:-1], shape[-1] // 2) and p.dtype == fmt.PACKED_DTYPE
    p_before = p.clone()
    out = fmt.unpack_int4(p)
    assert torch.equal(p, p_before), "unpack_int4 mutated its input"
    assert out.dtype == fmt.CODE_DTYPE
    assert torch.equal(out, q)


def test_pack_non_contiguous_input():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (6, 10), generator=g).to(torch.int8).T       # (10, 6) strided
    assert not q.is_contiguous()
    assert torch.equal(fmt.pack_int4(q), fmt.pack_int4(q.contiguous()))
    assert torch.equal(fmt.unpack_int4(fmt.pack_int4(q)), q)


@pytest.mark.parametrize("K", [1, 3, 129])
def test_pack_rejects_odd_k(K):
    with pytest.raises(ValueError, match=rf"even.*\b{K}\b"):
        fmt.pack_int4(torch.zeros(2, K, dtype=torch.int8))


@pytest.mark.parametrize("bad", [8, -9, 127, -128])
def test_pack_rejects_out_of_range_codes(bad):
    q = torch.zeros(2, 4, dtype=torch.int8)
    q[1, 2] = bad
    with pytest.raises(ValueError, match=rf"\[-8, 7\].*{bad}"):
        fmt.pack_int4(q)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float32, torch.int16])
def test_pack_rejects_wrong_dtype(dtype):
    with pytest.raises(ValueError, match=str(dtype)):
        fmt.pack_int4(torch.zeros(2, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_unpack_rejects_wrong_dtype(dtype):
    with pytest.raises(ValueError, match=str(dtype)):
        fmt.unpack_int4(torch.zeros(2, 4, dtype=dtype))


# ----------------------------------------------------------------------------
# activations: per token, asymmetric
# ----------------------------------------------------------------------------
def _acts(M, K, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4 + shift
    x[:, ::7] = 0.0                               # exact zeros (ReLU-like / padding)
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M, K, shift", [(1, 1, 0.0), (3, 127, 0.0), (16, 128, 0.0),
                                         (5, 129, 2.0), (4, 64, -3.0)])
def test_quantize_act_codes_and_error_bound(bits, M, K, shift):
    x = _acts(M, K, seed=M * K + bits, shift=shift)
    before = x.clone()
    q, scale, zero = fmt.quantize_act(x, bits)
    assert torch.equal(x, before)
    assert q.shape == (M, K) and q.dtype == torch.int8
    assert scale.shape == (M, 1) and scale.dtype == torch.float32
    assert zero.shape == (M, 1) and zero.dtype == torch.float32
    assert int(q.min()) >= fmt.qmin(bits) and int(q.max()) <= fmt.qmax(bits)
    assert torch.equal(zero, zero.round())
    assert bool(((zero >= fmt.qmin(bits)) & (zero <= fmt.qmax(bits))).all())
    assert bool((scale > 0).all())
    deq = fmt.dequantize_asym(q, scale, zero)
    # clip = 1: the grid spans [min, max] (shifted by < 1/2 code by the rounded
    # zero point), so even the clamped extremes are within half a step.
    err = (deq - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all()), float((err / scale).max())
    # exact zeros land on the code z and dequantize to exactly 0
    assert bool((deq[x == 0] == 0).all())


def test_quantize_act_clipping():
    x = _acts(8, 256, seed=11)
    clip = 0.6
    q, scale, zero = fmt.quantize_act(x, 4, clip=clip)
    deq = fmt.dequantize_asym(q, scale, zero)
    lo = scale * (fmt.qmin(4) - zero)
    hi = scale * (fmt.qmax(4) - zero)
    inside = (x >= lo) & (x <= hi)
    err = (deq - x).abs()
    assert bool((err[inside] <= (scale.expand_as(x)[inside] / 2) * (1 + 1e-5)).all())
    # clipped elements saturate at the end codes
    assert bool(((q == fmt.qmin(4)) | (q == fmt.qmax(4)))[~inside].all())
    assert bool((~inside).any()), "clip ratio did not clip anything; the test is vacuous"


def test_quantize_act_all_zero_rows_stay_finite_and_zero():
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-1, 1, 16)
    q, scale, zero = fmt.quantize_act(x, 4)
    deq = fmt.dequantize_asym(q, scale, zero)
    assert bool(torch.isfinite(scale).all()) and bool((scale >= fmt.MIN_SCALE).all())
    assert torch.equal(deq[0], torch.zeros(16)) and torch.equal(deq[2], torch.zeros(16))


def test_quantize_act_bf16_input():
    x = _acts(4, 64, seed=5).to(torch.bfloat16)
    q, scale, zero = fmt.quantize_act(x, 4)
    q32, s32, z32 = fmt.quantize_act(x.float(), 4)
    assert torch.equal(q, q32) and torch.equal(scale, s32) and torch.equal(zero, z32)


def test_quantize_kv_per_head():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, 64, generator=g)                      # (tokens, kv heads, head_dim)
    q, scale, zero = fmt.quantize_kv(x, 4)
    assert q.shape == x.shape and scale.shape == (5, 2, 1) and zero.shape == (5, 2, 1)
    err = (fmt.dequantize_asym(q, scale, zero) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())


def test_fake_quant_asym_matches_quantize_dequantize():
    x = _acts(6, 96, seed=4)
    q, s, z = fmt.quantize_act(x, 4)
    assert torch.equal(fmt.fake_quant_asym(x, 4), fmt.dequantize_asym(q, s, z))


# ----------------------------------------------------------------------------
# weights: per output channel, symmetric
# ----------------------------------------------------------------------------
def _weights(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[:, :3] *= 8                                 # outlier columns make clipping pay off
    return w


@pytest.mark.parametrize("N, K", [(1, 16), (33, 127), (64, 256)])
def test_mse_weight_scale_never_worse_than_absmax(N, K):
    w = _weights(N, K, seed=N + K)
    p = 2.4                                        # the norm weight_scale_mse minimises

    def err(mse):
        q, s = fmt.quantize_weight(w, 4, mse=mse)
        assert q.dtype == torch.int8 and s.shape == (N,) and s.dtype == fmt.SCALE_DTYPE
        assert int(q.min()) >= fmt.qmin(4) and int(q.max()) <= fmt.qmax(4)
        return (fmt.dequantize_weight(q, s) - w).abs().pow(p).sum(dim=1)

    e_mse, e_absmax = err(True), err(False)
    assert bool((e_mse <= e_absmax * (1 + 1e-6)).all())
    if N > 1:   # with outliers the search must actually find smaller clips somewhere
        assert bool((e_mse < e_absmax * 0.999).any())


def test_absmax_weight_quant_error_bound():
    w = _weights(16, 64, seed=1)
    q, s = fmt.quantize_weight(w, 4, mse=False)
    torch.testing.assert_close(s, w.abs().amax(dim=1) / fmt.qmax(4))
    err = (fmt.dequantize_weight(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())
    assert int(q.min()) >= -fmt.qmax(4)           # symmetric absmax never uses -8


def test_weight_scale_rejects_non_2d():
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        fmt.weight_scale_mse(torch.zeros(2, 3, 4), 4)


# ----------------------------------------------------------------------------
# the integer GEMM identity
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("M, N, K", [(1, 1, 2), (3, 5, 127), (17, 33, 128), (8, 16, 1024)])
def test_w4a4_matmul_ref_equals_dequantized_matmul(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g) + 0.3
    w = torch.randn(N, K, generator=g) * 0.05
    qx, sx, zx = fmt.quantize_act(x, 4)
    qw, sw = fmt.quantize_weight(w, 4)
    y = fmt.w4a4_matmul_ref(qx, sx, zx, qw, sw)
    assert y.shape == (M, N) and y.dtype == torch.float32
    X = sx.double() * (qx.double() - zx.double())
    W = qw.double() * sw.double()[:, None]
    expect = X @ W.T
    # float32 rounding of the final scaling, relative to the magnitude of the sum
    bound = 1e-5 * (X.abs() @ W.abs().T) + 1e-12
    assert bool(((y.double() - expect).abs() <= bound).all())


def test_w4a4_matmul_ref_integer_part_is_exact():
    # unit scales and zero points: the result is the integer product itself
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(-8, 8, (4, 4096), generator=g).to(torch.int8)
    qw = torch.randint(-8, 8, (3, 4096), generator=g).to(torch.int8)
    qx[0], qw[0] = -8, -8                                         # extreme sum 64 * 4096
    y = fmt.w4a4_matmul_ref(qx, torch.ones(4, 1), torch.zeros(4, 1), qw, torch.ones(3))
    exact = qx.to(torch.int64) @ qw.to(torch.int64).T
    assert torch.equal(y, exact.float())


# ----------------------------------------------------------------------------
# the config
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(fmt.Preset))
def test_presets(preset):
    cfg = fmt.SpinQuantConfig.from_preset(preset.value)
    assert (cfg.weight_bits, cfg.act_bits, cfg.kv_bits) == preset.bits
    assert cfg.preset == preset.value
    assert cfg.quantize_acts == (cfg.act_bits < 16)
    assert cfg.quantize_kv == (cfg.kv_bits < 16)
    assert fmt.SpinQuantConfig.from_preset(preset) == cfg


def test_preset_bits_parse():
    assert fmt.Preset.W4A4KV4.bits == (4, 4, 4)
    assert fmt.Preset.W4A16KV16.bits == (4, 16, 16)
    assert fmt.Preset.W4A8KV4.bits == (4, 8, 4)


def test_from_preset_with_overrides_and_bad_preset():
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=11008, rotation="hadamard")
    assert cfg.r4_size == 11008 and cfg.rotation is fmt.Rotation.HADAMARD
    with pytest.raises(ValueError, match="W3A4KV4"):
        fmt.SpinQuantConfig.from_preset("W3A4KV4")


# A resolved config (what a checkpoint holds): SmolLM2-135M's R4 and R3 block sizes.
RESOLVED = {"r4_size": 1536, "r3_size": 64}


@pytest.mark.parametrize("kw", [RESOLVED, {"r4_size": 11008, "r3_size": 128, "act_clip": 0.9},
                                {"rotation": "none", "weight_method": "rtn", "kv_bits": 16},
                                {"modules_not_quantized": ["lm_head"], "r4_size": 64, "kv_bits": 16}])
def test_json_roundtrip(kw):
    cfg = fmt.SpinQuantConfig(**kw)
    d = cfg.to_dict()
    assert d["quant_method"] == fmt.QUANT_METHOD and d["version"] == fmt.FORMAT_VERSION
    back = fmt.SpinQuantConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert fmt.SpinQuantConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert isinstance(back.rotation, fmt.Rotation) and isinstance(back.modules_not_quantized, tuple)
    # plain JSON types only (no enums leaking into config.json)
    assert all(type(v) in (str, int, float, bool, list) for v in d.values()), d


@pytest.mark.parametrize("field, value", [
    ("weight_bits", 3), ("weight_bits", 8), ("act_bits", 5), ("kv_bits", 8), ("kv_bits", 2),
    ("version", 2), ("weight_granularity", "per_group"), ("act_granularity", "per_tensor"),
    ("kv_granularity", "per_token"), ("weight_symmetric", False), ("act_symmetric", True),
    ("kv_symmetric", True), ("pack_order", "high_nibble_first"), ("r4_size", -1),
    ("r3_size", 1.5), ("act_clip", 0.0), ("act_clip", 1.5), ("kv_clip", -0.1),
    ("kv_clip", float("nan")),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SpinQuantConfig\.{field}\b"):
        fmt.SpinQuantConfig(**{**RESOLVED, field: value})
    d = fmt.SpinQuantConfig(**RESOLVED).to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        fmt.SpinQuantConfig.from_dict(d)


def test_hadamard_sizes_none_means_derive_from_the_model():
    cfg = fmt.SpinQuantConfig()
    assert cfg.r4_size is None and cfg.r3_size is None and not cfg.resolved
    # what needs no model is derived at once: no rotation, no online Hadamard; KV16, no R3
    none = fmt.SpinQuantConfig(rotation="none")
    assert (none.r4_size, none.r3_size) == (0, 0) and none.resolved
    kv16 = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=128)
    assert (kv16.r4_size, kv16.r3_size) == (128, 0) and kv16.resolved
    # an explicit R3 with a 16-bit KV cache stays (it leaves QK^T unchanged)
    assert fmt.SpinQuantConfig(kv_bits=16, r4_size=128, r3_size=64).r3_size == 64
    resolved = fmt.SpinQuantConfig(**RESOLVED)
    assert resolved.resolved and dataclasses.replace(resolved, act_clip=0.9).resolved


@pytest.mark.parametrize("kw, match", [
    ({"r4_size": 0}, r"r4_size must be > 0 with rotation 'learned'.*got 0"),
    ({"rotation": "hadamard", "r4_size": 0, "r3_size": 64}, r"r4_size must be > 0 with rotation 'hadamard'"),
    ({"r4_size": 128, "r3_size": 0}, r"r3_size must be > 0 with rotation 'learned' and kv_bits=4.*got 0"),
    ({"rotation": "none", "r4_size": 128}, r"r4_size must be 0 with rotation 'none'.*got 128"),
    ({"rotation": "none", "r3_size": 64}, r"r3_size must be 0 with rotation 'none'.*got 64"),
    ({"r4_size": True}, r"r4_size must be an int >= 0 or None.*got True"),
])
def test_hadamard_sizes_must_fit_the_rotation(kw, match):
    with pytest.raises(ValueError, match=match):
        fmt.SpinQuantConfig(**kw)


def test_unresolved_config_has_no_checkpoint_form():
    with pytest.raises(ValueError, match=r"quantization_config needs SpinQuantConfig\.r4_size as an int.*"
                                         r"got None.*resolve_config"):
        fmt.SpinQuantConfig().to_dict()
    with pytest.raises(ValueError, match=r"r3_size as an int.*got None"):
        fmt.SpinQuantConfig(r4_size=128).to_dict()
    d = fmt.SpinQuantConfig(**RESOLVED).to_dict()
    for name in RESOLVED:
        with pytest.raises(ValueError, match=rf"quantization_config needs SpinQuantConfig\.{name} as an int"):
            fmt.SpinQuantConfig.from_dict({**d, name: None})
    with pytest.raises(ValueError, match=r"^the writer needs SpinQuantConfig\.r4_size"):
        fmt.SpinQuantConfig().require_resolved("the writer")
    fmt.SpinQuantConfig(**RESOLVED).require_resolved("the writer")


@pytest.mark.parametrize("field, value", [("rotation", "random"), ("weight_method", "awq")])
def test_invalid_enum_values(field, value):
    with pytest.raises(ValueError, match=rf"SpinQuantConfig\.{field} must be one of .*got '{value}'"):
        fmt.SpinQuantConfig(**{field: value})


def test_unknown_keys_rejected():
    d = fmt.SpinQuantConfig(**RESOLVED).to_dict()
    d["group_size"] = 128
    with pytest.raises(ValueError, match="group_size"):
        fmt.SpinQuantConfig.from_dict(d)


@pytest.mark.parametrize("d, what", [
    ({"quant_method": "awq"}, "quant_method"),
    ({}, "quant_method"),
    ([("quant_method", "spinquant")], "JSON object"),
])
def test_from_dict_rejects_foreign_configs(d, what):
    with pytest.raises(ValueError, match=what):
        fmt.SpinQuantConfig.from_dict(d)


def test_config_is_frozen():
    cfg = fmt.SpinQuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.act_bits = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r4_size = 64
    assert cfg.act_bits == 4 and hash(cfg) == hash(fmt.SpinQuantConfig())


# ----------------------------------------------------------------------------
# tensor_parallel_sizes: the degrees whose intermediate shard holds whole R4 blocks
# ----------------------------------------------------------------------------
def test_tensor_parallel_sizes_round_trip_and_old_configs_still_load():
    cfg = fmt.SpinQuantConfig(r4_size=192, r3_size=64, tensor_parallel_sizes=[8, 1, 4, 2])
    assert cfg.tensor_parallel_sizes == (1, 2, 4, 8) and cfg.resolved    # sorted, a tuple
    d = json.loads(cfg.to_json())
    assert d["tensor_parallel_sizes"] == [1, 2, 4, 8]
    assert fmt.SpinQuantConfig.from_dict(d) == cfg
    # written before the field existed (and configs that do not record it): the key is absent
    old = fmt.SpinQuantConfig(**RESOLVED)
    assert "tensor_parallel_sizes" not in old.to_dict()
    assert fmt.SpinQuantConfig.from_dict(old.to_dict()).tensor_parallel_sizes is None


def test_tensor_parallel_sizes_are_derived_from_r4_size_and_checked():
    cfg = fmt.SpinQuantConfig(r4_size=192, r3_size=64)
    assert cfg.r4_tensor_parallel_sizes(1536) == (1, 2, 4, 8)
    assert fmt.SpinQuantConfig(**RESOLVED).r4_tensor_parallel_sizes(1536) == (1,)
    assert fmt.SpinQuantConfig(r4_size=128, r3_size=64).r4_tensor_parallel_sizes(1536) == (1, 2, 3, 4, 6, 12)
    assert fmt.SpinQuantConfig(rotation="none").r4_tensor_parallel_sizes(12) == (1, 2, 3, 4, 6, 12)
    cfg.check_intermediate_size(1536)                                   # nothing recorded: fits
    dataclasses.replace(cfg, tensor_parallel_sizes=(1, 2, 4, 8)).check_intermediate_size(1536)
    with pytest.raises(ValueError, match=r"tensor_parallel_sizes=\[1, 2\] does not match r4_size=192 and "
                                         r"intermediate_size 1536.*are \[1, 2, 4, 8\]"):
        dataclasses.replace(cfg, tensor_parallel_sizes=(1, 2)).check_intermediate_size(1536)
    with pytest.raises(ValueError, match=r"r4_size 192 must divide intermediate_size 1000"):
        cfg.check_intermediate_size(1000)
    with pytest.raises(ValueError, match="needs a resolved r4_size"):
        fmt.SpinQuantConfig().r4_tensor_parallel_sizes(1536)


@pytest.mark.parametrize("value", [[], [0, 2], [2.0], "1,2", 4, [True]])
def test_bad_tensor_parallel_sizes_name_the_field(value):
    with pytest.raises(ValueError, match=r"SpinQuantConfig\.tensor_parallel_sizes must be .*got"):
        fmt.SpinQuantConfig(**RESOLVED, tensor_parallel_sizes=value)


def test_a_tensor_parallel_request_has_no_checkpoint_form():
    """At the offline input the field holds the degrees asked for ([2, 4]: not every divisor of 4);
    resolve_config replaces it by the recorded set, and only that is written or read back."""
    asked = fmt.SpinQuantConfig(**RESOLVED, tensor_parallel_sizes=(2, 4))
    assert not asked.resolved
    with pytest.raises(ValueError, match=r"quantization_config needs SpinQuantConfig\.tensor_parallel_sizes "
                                         r"as recorded.*got the request \[2, 4\].*resolve_config"):
        asked.to_dict()
    d = {**fmt.SpinQuantConfig(**RESOLVED).to_dict(), "tensor_parallel_sizes": [1, 4]}
    with pytest.raises(ValueError, match=r"got the request \[1, 4\]"):
        fmt.SpinQuantConfig.from_dict(d)
