"""SpinQuantLinearMethod: weights through vLLM's parameter classes and loaders, and apply().

Checks, by path:
* weight loading is integer data moved around: bit-exact against the
  checkpoint's tensors (and their tensor-parallel slices);
* apply() on the reference backend is bit-exact against the runtime math of
  ARCHITECTURE.md written with the format module; on the Triton backend
  (interpreted on CPU) it meets an SQNR floor against that reference;
* the lossy end-to-end W4A{4,8} result meets SQNR floors against the float
  product with the dequantized weight.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_kernels.hadamard import hadamard_transform_ref

GEN_SEED = 1234


@pytest.fixture(autouse=True)
def _registered(vllm_dist):
    pass


def runtime_math_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, act_bits: int,
                     had_size: int) -> torch.Tensor:
    """ARCHITECTURE.md "runtime math of one quantized linear", from the format module."""
    xf = x.float()
    if had_size:
        xf = hadamard_transform_ref(xf, had_size)
    if act_bits == 16:
        y = xf @ fmt.dequantize_weight(codes, scale).T
    else:
        qx, sx, zx = fmt.quantize_act(xf, act_bits)
        y = fmt.w4a4_matmul_ref(qx, sx, zx, codes, scale)
    return y.to(x.dtype)


def float_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, had_size: int) -> torch.Tensor:
    """The product the quantized layer approximates: unquantized activations, dequantized weight."""
    xf = x.double()
    if had_size:
        xf = hadamard_transform_ref(xf, had_size)
    return xf @ fmt.dequantize_weight(codes, scale).double().T


def _cat(sd, layer, names, suffix):
    return torch.cat([sd[f"model.layers.{layer}.{n}.{suffix}"] for n in names], dim=0)


# checkpoint names behind each vLLM layer, in the fused order
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


@pytest.fixture
def loaded(tmp_path, ckpt, load_vllm_model):
    """``load(preset, r4_size=128, shape=None, act_bits=None, backends=None) -> (model, state dict, cfg)``."""

    def load(preset: str = "W4A4KV16", r4_size: int = 128, shape=None, act_bits=None, backends=None):
        cfg = fmt.SpinQuantConfig.from_preset(preset, r4_size=r4_size, rotation="hadamard",
                                              weight_method="rtn")
        if act_bits is not None:
            cfg = dataclasses.replace(cfg, act_bits=act_bits)
        d = tmp_path / cfg.preset
        sd = ckpt.write(str(d), cfg, shape or ckpt.Shape(layers=2))
        model, _ = load_vllm_model(str(d), backends=backends)
        return model, sd, cfg

    return load


def _vllm_layer(model, i, name):
    return model.get_submodule(f"model.layers.{i}.{name}")


# ----------------------------------------------------------------------------
# parameters and loading
# ----------------------------------------------------------------------------
def test_create_weights_uses_vllm_parameter_classes(vllm_ctx):
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.parameter import ChannelQuantScaleParameter, PackedvLLMParameter

    from spinquant_vllm.config import SpinQuantVllmConfig

    qc = SpinQuantVllmConfig(fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=128))
    kw = dict(quant_config=qc, params_dtype=torch.bfloat16, bias=False)
    layers = {
        (128, 64): QKVParallelLinear(64, 16, 4, 2, prefix="model.layers.0.self_attn.qkv_proj", **kw),
        (256, 64): MergedColumnParallelLinear(64, [128, 128], prefix="model.layers.0.mlp.gate_up_proj", **kw),
        (64, 128): RowParallelLinear(128, 64, prefix="model.layers.0.mlp.down_proj", **kw),
    }
    for (N, K), layer in layers.items():
        q, s = layer.qweight, layer.weight_scale
        assert isinstance(q, PackedvLLMParameter) and isinstance(s, ChannelQuantScaleParameter)
        assert (tuple(q.shape), q.dtype) == ((N, K // 2), torch.uint8)
        assert (tuple(s.shape), s.dtype) == ((N,), torch.float32)
        assert (q.input_dim, q.output_dim, q.packed_dim, q.packed_factor) == (1, 0, 1, 2)
        assert s.output_dim == 0
        # the layer routes checkpoint tensors through the parameter's own loader
        assert q.weight_loader.__wrapped__ == layer.weight_loader_v2


def test_model_loads_every_layer_bit_exact(loaded):
    """qkv_proj / gate_up_proj fuse their parts in order; o_proj / down_proj load whole."""
    model, sd, cfg = loaded("W4A4KV16")
    for i in range(2):
        for vname, parts in FUSED.items():
            layer = _vllm_layer(model, i, vname)
            q_disk = _cat(sd, i, parts, "qweight")
            s_disk = _cat(sd, i, parts, "weight_scale")
            assert torch.equal(layer.qweight, q_disk), vname
            assert torch.equal(layer.weight_scale, s_disk), vname
            rowsum = fmt.unpack_int4(q_disk).to(torch.int32).sum(1, dtype=torch.int32)
            assert torch.equal(layer.weight_rowsum, rowsum), vname
            assert layer.quant_method.backend in ("triton", "reference")
    # 16-bit tensors stay 16-bit
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight[:96], sd["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight[:96], sd["model.embed_tokens.weight"])


def test_missing_checkpoint_tensor_is_named(tmp_path, ckpt, load_vllm_model):
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=128)
    ckpt.write(str(tmp_path), cfg, drop=("model.layers.0.mlp.down_proj.weight_scale",))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_scale"):
        load_vllm_model(str(tmp_path))
    # one part of a fused layer
    ckpt.write(str(tmp_path), cfg, drop=("model.layers.0.self_attn.k_proj.qweight",))
    with pytest.raises(ValueError, match=r"self_attn\.qkv_proj\.qweight for shard\(s\) \['k'\]"):
        load_vllm_model(str(tmp_path))


# ----------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_apply_reference_backend_is_bit_exact(loaded, act_bits):
    model, sd, cfg = loaded("W4A4KV16", act_bits=act_bits, backends=("reference",))
    g = torch.Generator().manual_seed(GEN_SEED)
    for vname, parts in FUSED.items():
        layer = _vllm_layer(model, 0, vname)
        assert layer.quant_method.backend == "reference"
        codes = fmt.unpack_int4(_cat(sd, 0, parts, "qweight"))
        scale = _cat(sd, 0, parts, "weight_scale")
        had = cfg.r4_size if vname == "mlp.down_proj" else 0
        x = torch.randn(7, codes.shape[1], generator=g).to(torch.bfloat16)
        y = layer.quant_method.apply(layer, x)
        assert y.dtype == torch.bfloat16 and tuple(y.shape) == (7, codes.shape[0])
        assert torch.equal(y, runtime_math_ref(x, codes, scale, act_bits, had)), vname


@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_apply_default_backend_matches_reference(loaded, sqnr, act_bits):
    """The backend vLLM picks (Triton, interpreted here) against the reference, and the lossy floor."""
    model, sd, cfg = loaded("W4A4KV16", act_bits=act_bits)
    assert cfg.act_bits == act_bits
    g = torch.Generator().manual_seed(GEN_SEED)
    for vname, parts in FUSED.items():
        layer = _vllm_layer(model, 0, vname)
        codes = fmt.unpack_int4(_cat(sd, 0, parts, "qweight"))
        scale = _cat(sd, 0, parts, "weight_scale")
        had = cfg.r4_size if vname == "mlp.down_proj" else 0
        assert layer.quant_method.backend == "triton"  # CUDA, or TRITON_INTERPRET=1 on CPU
        x = torch.randn(5, codes.shape[1], generator=g).to(torch.bfloat16)
        y = layer.quant_method.apply(layer, x)
        # same integers and float32 epilogue; bf16 output rounding (~2^-9 relative)
        # and rare rounding ties in the activation codes are the only differences
        assert sqnr(runtime_math_ref(x, codes, scale, act_bits, had).float(), y.float()) > 35, vname
        # per-token min-max on Gaussian rows: step ~ range / (2^b - 1), which puts the
        # SQNR near 20 dB for 4 bits and 44 dB for 8 in theory; 16 = bf16 output rounding
        floor = {4: 12, 8: 30, 16: 35}[act_bits]
        assert sqnr(float_ref(x, codes, scale, had), y) > floor, vname


def test_apply_adds_bias_and_handles_empty_batches(vllm_ctx):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from spinquant_vllm.config import SpinQuantVllmConfig

    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=64)
    qc = SpinQuantVllmConfig(cfg, backends=("reference",))
    layer = RowParallelLinear(64, 48, bias=True, quant_config=qc,
                              params_dtype=torch.bfloat16, prefix="model.layers.0.mlp.down_proj")
    g = torch.Generator().manual_seed(GEN_SEED)
    q, s = fmt.quantize_weight(torch.randn(48, 64, generator=g), mse=False)
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    layer.qweight.weight_loader(layer.qweight, fmt.pack_int4(q))
    layer.weight_scale.weight_loader(layer.weight_scale, s)
    layer.bias.weight_loader(layer.bias, bias)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    y, _ = layer(x)
    ref = runtime_math_ref(x, q, s, 4, 64).float() + bias.float()
    assert torch.allclose(y.float(), ref, rtol=2 ** -7, atol=1e-2)
    empty = layer.quant_method.apply(layer, x[:0])
    assert tuple(empty.shape) == (0, 48) and empty.dtype == torch.bfloat16


# ----------------------------------------------------------------------------
# tensor parallelism (every rank of a group simulated in turn: loading and apply only)
# ----------------------------------------------------------------------------
def _rank_rows(shape, tp: int, rank: int) -> dict[str, tuple[int, int]]:
    """Rows of each column-parallel checkpoint tensor rank ``rank`` of ``tp`` holds (vLLM's rule:
    query heads split evenly; kv heads split, or replicated when tp exceeds them)."""
    hd, I = shape.head_dim, shape.intermediate
    q = shape.heads // tp
    kv0, nkv = (rank * shape.kv_heads // tp, shape.kv_heads // tp) if tp <= shape.kv_heads \
        else (rank * shape.kv_heads // tp, 1)
    return {"self_attn.q_proj": (rank * q * hd, (rank + 1) * q * hd),
            "self_attn.k_proj": (kv0 * hd, (kv0 + nkv) * hd),
            "self_attn.v_proj": (kv0 * hd, (kv0 + nkv) * hd),
            "mlp.gate_proj": (rank * I // tp, (rank + 1) * I // tp),
            "mlp.up_proj": (rank * I // tp, (rank + 1) * I // tp)}


@pytest.mark.parametrize("tp, r4", [(2, 64), (4, 32), (4, 16)])
def test_tp_ranks_load_their_shards_and_sum_to_the_tp1_layer(vllm_ctx, tp_rank, tp_layers, ckpt,
                                                             tmp_path, sqnr, tp, r4):
    """TP 2 and 4 (kv heads replicated at 4): each rank's qweight / weight_scale are its slice
    of the checkpoint; column-parallel outputs are the TP=1 outputs' columns bit for bit;
    row-parallel partial products (the per-rank R4 blocks on down_proj) add up to the TP=1
    product: exactly in float64 without activation quantization, above an SQNR floor with it."""
    from spinquant_vllm.config import SpinQuantVllmConfig

    shape = ckpt.Shape()
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=r4)
    sd = ckpt.write(str(tmp_path), cfg, shape)
    qc = SpinQuantVllmConfig(cfg, backends=("reference",))
    tp_rank(0, 1)
    whole = tp_layers(qc, sd, shape)
    by_rank = []
    for rank in range(tp):
        tp_rank(rank, tp)
        by_rank.append(tp_layers(qc, sd, shape))
    L = "model.layers.0"
    for layer in [*whole.values(), *(lay for r in by_rank for lay in r.values())]:
        layer.quant_method.process_weights_after_loading(layer)

    g = torch.Generator().manual_seed(GEN_SEED)
    for rank, layers in enumerate(by_rank):
        rows = _rank_rows(shape, tp, rank)
        # column parallel, fused: this rank's rows of each part, in the fused order
        for vname in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            for suffix in ("qweight", "weight_scale"):
                want = torch.cat([sd[f"{L}.{part}.{suffix}"][slice(*rows[part])]
                                  for part in FUSED[vname]])
                assert torch.equal(getattr(layers[vname], suffix).data, want), (vname, suffix)
            x = torch.randn(5, shape.hidden, generator=g).to(torch.bfloat16)
            y1 = whole[vname].quant_method.apply(whole[vname], x)
            cols = torch.cat([torch.arange(*rows[part]) + sum(sd[f"{L}.{p}.qweight"].shape[0]
                                                              for p in FUSED[vname][:j])
                              for j, part in enumerate(FUSED[vname])])
            assert torch.equal(layers[vname].quant_method.apply(layers[vname], x), y1[:, cols])
        # row parallel: bytes [r K/(2t), (r+1) K/(2t)) of every packed row, all scales
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            K = sd[f"{L}.{name}.qweight"].shape[1] * fmt.PACK_FACTOR
            b = K // fmt.PACK_FACTOR // tp
            assert torch.equal(layers[name].qweight.data, sd[f"{L}.{name}.qweight"][:, rank * b:(rank + 1) * b])
            assert torch.equal(layers[name].weight_scale.data, sd[f"{L}.{name}.weight_scale"])
            assert layers[name].quant_method.had_size == (r4 if name == "mlp.down_proj" else 0)

    for name in ("self_attn.o_proj", "mlp.down_proj"):
        had = r4 if name == "mlp.down_proj" else 0
        K = sd[f"{L}.{name}.qweight"].shape[1] * fmt.PACK_FACTOR
        x = torch.randn(6, K, generator=g).to(torch.bfloat16)
        full_codes, scale = fmt.unpack_int4(sd[f"{L}.{name}.qweight"]), sd[f"{L}.{name}.weight_scale"]
        exact, lossy = [], []
        for rank, layers in enumerate(by_rank):
            layer, xs = layers[name], x[:, rank * K // tp:(rank + 1) * K // tp]
            codes = fmt.unpack_int4(layer.qweight.data)
            y = layer.quant_method.apply(layer, xs)
            assert torch.equal(y, runtime_math_ref(xs, codes, layer.weight_scale.data, 4, had))
            lossy.append(y.double())
            exact.append(float_ref(xs, codes, layer.weight_scale.data, had))
        full = float_ref(x, full_codes, scale, had)
        torch.testing.assert_close(sum(exact), full, rtol=1e-12, atol=1e-10)
        # activation scales are per token and shard: close to, not equal to, TP=1
        assert sqnr(full, sum(lossy)) > 12, name
    # the sum above can tell the blocks apart: the whole-intermediate Hadamard gives another product
    xd = torch.randn(3, shape.intermediate, generator=g, dtype=torch.float64)
    codes = fmt.unpack_int4(sd[f"{L}.mlp.down_proj.qweight"])
    scale = sd[f"{L}.mlp.down_proj.weight_scale"]
    wrong = float_ref(xd, codes, scale, shape.intermediate)
    assert (wrong - float_ref(xd, codes, scale, r4)).abs().max() > 1e-3


@pytest.mark.parametrize("recorded", [False, True])
def test_r4_over_sharded_intermediate_fails_at_start(vllm_ctx, tp_rank, recorded):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from spinquant_vllm.config import SpinQuantVllmConfig

    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=64)
    if recorded:  # a checkpoint of the offline stage records the degrees
        cfg = dataclasses.replace(cfg, tensor_parallel_sizes=cfg.r4_tensor_parallel_sizes(128))
    qc = SpinQuantVllmConfig(cfg)
    tp_rank(0, 4)
    with pytest.raises(ValueError, match=r"r4_size=64.*\(128\).*tensor parallel size 4.*32 columns.*"
                                         r"tensor parallel sizes \[1, 2\].*--tensor-parallel-sizes 4"):
        RowParallelLinear(128, 64, quant_config=qc, params_dtype=torch.bfloat16, bias=False,
                          prefix="model.layers.0.mlp.down_proj")
    # o_proj has no R4: it shards freely
    layer = RowParallelLinear(128, 64, quant_config=qc, params_dtype=torch.bfloat16, bias=False,
                              prefix="model.layers.0.self_attn.o_proj")
    assert tuple(layer.qweight.shape) == (64, 16)


# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------
def _reference_down_proj():
    from vllm.model_executor.layers.linear import RowParallelLinear

    from spinquant_vllm.config import SpinQuantVllmConfig

    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=64)
    qc = SpinQuantVllmConfig(cfg, backends=("reference",))
    layer = RowParallelLinear(128, 64, quant_config=qc, params_dtype=torch.bfloat16,
                              bias=False, prefix="model.layers.0.mlp.down_proj")
    g = torch.Generator().manual_seed(GEN_SEED)
    q, s = fmt.quantize_weight(torch.randn(64, 128, generator=g), mse=False)
    layer.qweight.weight_loader(layer.qweight, fmt.pack_int4(q))
    layer.weight_scale.weight_loader(layer.weight_scale, s)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, g


def test_op_passes_opcheck(vllm_ctx):
    layer, g = _reference_down_proj()
    x = torch.randn(4, 128, generator=g).to(torch.bfloat16)
    args = (x, layer.qweight, layer.weight_scale, layer.weight_rowsum, 4, 64, None, "reference")
    torch.library.opcheck(torch.ops.spinquant.w4ax_linear.default, args)


def test_apply_compiles_fullgraph_with_dynamic_tokens(vllm_ctx):
    """Dynamo traces apply() without graph breaks, one graph for every token count."""
    import torch._dynamo.testing

    layer, g = _reference_down_proj()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    fn = torch.compile(lambda x: layer.quant_method.apply(layer, x), backend=counter,
                       fullgraph=True, dynamic=True)
    for m in (3, 5, 17):
        x = torch.randn(m, 128, generator=g).to(torch.bfloat16)
        assert torch.equal(fn(x), layer.quant_method.apply(layer, x))
    assert counter.frame_count == 1


def test_apply_float16_activations(loaded, sqnr):
    """fp16 is the other activation dtype the config advertises."""
    model, sd, cfg = loaded("W4A4KV16")
    g = torch.Generator().manual_seed(GEN_SEED)
    for vname in ("self_attn.qkv_proj", "mlp.down_proj"):
        layer = _vllm_layer(model, 0, vname)
        codes = fmt.unpack_int4(_cat(sd, 0, FUSED[vname], "qweight"))
        scale = _cat(sd, 0, FUSED[vname], "weight_scale")
        had = cfg.r4_size if vname == "mlp.down_proj" else 0
        x = torch.randn(4, codes.shape[1], generator=g).to(torch.float16)
        y = layer.quant_method.apply(layer, x)
        assert y.dtype == torch.float16
        assert sqnr(runtime_math_ref(x, codes, scale, 4, had).float(), y.float()) > 35, vname


# ----------------------------------------------------------------------------
# backend choice at load time
# ----------------------------------------------------------------------------
def _down_proj(backends=None, warmup=False, bias=False, prefix="model.layers.0.mlp.down_proj", seed=0):
    """A down_proj (64 x 128, r4 64) with loaded weights, not yet processed."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    from spinquant_kernels.options import Options
    from spinquant_vllm.config import SpinQuantVllmConfig

    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=64)
    qc = SpinQuantVllmConfig(cfg, backends=backends, opts=Options(warmup=warmup))
    layer = RowParallelLinear(128, 64, quant_config=qc, bias=bias, params_dtype=torch.bfloat16,
                              prefix=prefix)
    g = torch.Generator().manual_seed(GEN_SEED + seed)
    q, s = fmt.quantize_weight(torch.randn(64, 128, generator=g), mse=False)
    layer.qweight.weight_loader(layer.qweight, fmt.pack_int4(q))
    layer.weight_scale.weight_loader(layer.weight_scale, s)
    if bias:
        layer.bias.weight_loader(layer.bias, torch.randn(64, generator=g).to(torch.bfloat16))
    return layer


def test_apply_trusts_the_backend_chosen_at_load(vllm_ctx, monkeypatch):
    """After loading, apply() neither chooses nor checks a backend again."""
    from spinquant_kernels import linear as lin

    layer = _down_proj()
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.backend == "triton"  # interpreted on CPU
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(GEN_SEED)).to(torch.bfloat16)
    want = layer.quant_method.apply(layer, x)

    def refuse(*a, **k):
        raise AssertionError("a backend was chosen on the hot path")

    monkeypatch.setattr(lin, "select_backend", refuse)
    monkeypatch.setattr(lin, "can_implement", refuse)
    assert torch.equal(layer.quant_method.apply(layer, x), want)


def test_backend_falls_back_with_the_refusal_logged(vllm_ctx, monkeypatch):
    """Triton refused (a CPU device without the interpreter): the reference path, and why."""
    from spinquant_kernels import linear as lin
    from spinquant_vllm import linear as sq_linear

    monkeypatch.setattr(lin, "interpreting", lambda: False)
    warned = []
    monkeypatch.setattr(sq_linear.logger, "warning", lambda msg, *a: warned.append(msg % a))
    layer = _down_proj()
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.backend == "reference"
    assert len(warned) == 1 and "'reference'" in warned[0] and "triton: needs a CUDA device" in warned[0]


def test_no_usable_backend_fails_at_load_with_every_reason(vllm_ctx, monkeypatch):
    from spinquant_kernels import linear as lin

    monkeypatch.setattr(lin, "interpreting", lambda: False)
    layer = _down_proj(backends=("cutlass", "triton"))
    with pytest.raises(ValueError) as e:
        layer.quant_method.process_weights_after_loading(layer)
    assert "unknown backend 'cutlass'" in str(e.value) and "triton: needs a CUDA device" in str(e.value)


# ----------------------------------------------------------------------------
# GEMM autotuner warm-up at load time
# ----------------------------------------------------------------------------
def _warm_layers(bias=False, n=2, backends=None):
    """``n`` down_proj layers of one shape (64 x 128, r4 64) with loaded weights and warm-up on."""
    return [_down_proj(backends, True, bias, f"model.layers.{i}.mlp.down_proj", seed=i) for i in range(n)]


@pytest.fixture
def warm_record(monkeypatch):
    """Record spinquant_kernels.linear.warmup calls made by the plugin (kernels never run)."""
    from spinquant_kernels import linear as lin

    calls = []

    def fake(w, act_bits=4, had_size=0, dtype=torch.bfloat16, bias=None, max_m=None, sizes=None):
        calls.append(dict(NK=(w.N, w.K), act_bits=act_bits, had_size=had_size, dtype=dtype,
                          bias=None if bias is None else bias.dtype, max_m=max_m, qweight=w.qweight))
        return False

    monkeypatch.setattr(lin, "warmup", fake)
    return calls


def test_process_weights_calls_warmup_with_final_weights(vllm_ctx, warm_record):
    from vllm.config import get_current_vllm_config

    (layer,) = _warm_layers(bias=True, n=1)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.backend == "triton"  # interpreted on CPU
    max_m = get_current_vllm_config().scheduler_config.max_num_batched_tokens
    assert warm_record == [dict(NK=(64, 128), act_bits=4, had_size=64, dtype=torch.bfloat16,
                                bias=torch.bfloat16, max_m=max_m, qweight=warm_record[0]["qweight"])]
    # the packed tensor the op reads, not the loader's parameter
    assert warm_record[0]["qweight"].data_ptr() == layer.qweight.data_ptr()


def test_warmup_option_off_skips_it(vllm_ctx, warm_record):
    layer = _down_proj(warmup=False)
    assert layer.quant_method.warmup is False
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.backend == "triton"
    assert warm_record == []


@pytest.mark.parametrize("warmup", [True, False])
def test_config_reads_the_process_options_once(vllm_ctx, monkeypatch, warmup):
    """vLLM builds the config with no options: it reads options() once, the layers take it from there."""
    from spinquant_kernels.options import Options
    from spinquant_vllm import config as sq_config

    reads = []
    monkeypatch.setattr(sq_config, "options", lambda: reads.append(1) or Options(warmup=warmup))
    qc = sq_config.SpinQuantVllmConfig.from_config(fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=128).to_dict())
    assert qc.options.warmup is warmup and len(reads) == 1
    from spinquant_vllm.linear import SpinQuantLinearMethod

    assert SpinQuantLinearMethod(qc, "model.layers.0.mlp.down_proj").warmup is warmup
    assert len(reads) == 1


def test_warmup_skipped_on_reference_backend(vllm_ctx, warm_record):
    for layer in _warm_layers(backends=("reference",)):
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.quant_method.backend == "reference"
    assert warm_record == []


def test_warmup_on_cpu_launches_nothing(vllm_ctx, monkeypatch):
    """The real warm-up under the interpreter on CPU: returns at once, no kernel, no log total."""
    from spinquant_kernels import linear as lin
    from spinquant_kernels import w4a4_gemm as gemm
    from spinquant_vllm import linear as sq_linear

    def boom(*a, **k):
        raise AssertionError("warm-up launched a kernel on CPU")

    monkeypatch.setattr(lin, "w4ax_linear", boom)
    monkeypatch.setattr(gemm, "_launch", boom)
    monkeypatch.setattr(lin, "_WARMED", set())
    monkeypatch.setattr(sq_linear, "_WARMUP_TOTAL", {"shapes": 0, "seconds": 0.0})
    for layer in _warm_layers():
        layer.quant_method.process_weights_after_loading(layer)
    assert lin._WARMED == set() and sq_linear._WARMUP_TOTAL["shapes"] == 0


def test_warmup_once_per_shape_across_layers(vllm_ctx, monkeypatch):
    """Two layers of one shape: the second finds the shape in the warmed set (as on a GPU)."""
    from spinquant_kernels import linear as lin
    from spinquant_vllm import linear as sq_linear

    runs = []
    monkeypatch.setattr(lin, "_warmup_applies", lambda device: True)
    monkeypatch.setattr(lin, "_WARMED", set())
    monkeypatch.setattr(lin, "w4ax_linear",
                        lambda x, w, *a, **k: runs.append(x.shape[0]) or x.new_zeros(x.shape[0], w.N))
    monkeypatch.setattr(sq_linear, "_WARMUP_TOTAL", {"shapes": 0, "seconds": 0.0})
    layers = _warm_layers(n=3)
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    max_m = layers[0].quant_method._warmup_max_m
    assert runs == lin.warmup_sizes(max_m)
    assert sq_linear._WARMUP_TOTAL["shapes"] == 1


def test_warmup_out_of_memory_warns_and_loading_goes_on(vllm_ctx, monkeypatch):
    from spinquant_kernels import linear as lin
    from spinquant_kernels.options import WARMUP_ENV
    from spinquant_vllm import linear as sq_linear

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 470.00 MiB")

    monkeypatch.setattr(lin, "warmup", oom)
    (layer,) = _warm_layers(n=1)
    warned = []
    monkeypatch.setattr(sq_linear.logger, "warning", lambda msg, *a: warned.append(msg % a))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.backend == "triton"
    assert len(warned) == 1 and "470.00 MiB" in warned[0] and WARMUP_ENV in warned[0]


def test_warmup_failure_other_than_memory_stops_the_load(vllm_ctx, monkeypatch):
    """A kernel that fails in the warm-up would fail the first request: the load says so instead."""
    from spinquant_kernels import linear as lin

    def broken(*a, **k):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(lin, "warmup", broken)
    (layer,) = _warm_layers(n=1)
    with pytest.raises(RuntimeError, match="PTX compile failed"):
        layer.quant_method.process_weights_after_loading(layer)
