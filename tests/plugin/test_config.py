"""SpinQuantVllmConfig: parsing, validation, routing, and flag/checkpoint mismatches."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from spinquant_kernels import format as fmt


@pytest.fixture(autouse=True)
def _registered(vllm_dist):
    pass


def _cls():
    from spinquant_vllm.config import SpinQuantVllmConfig

    return SpinQuantVllmConfig


def _preset(preset: str = "W4A4KV16", **kw) -> fmt.SpinQuantConfig:
    """A checkpoint's config: the Hadamard sizes resolved (R4 128, R3 16 with a 4-bit cache)."""
    kw.setdefault("r4_size", 128)
    if fmt.Preset(preset).bits[2] < 16:
        kw.setdefault("r3_size", 16)
    return fmt.SpinQuantConfig.from_preset(preset, **kw)


@pytest.fixture
def no_attention_module(monkeypatch):
    import spinquant_vllm.config as c

    monkeypatch.setattr(c, "_attention_module_available", lambda: False)


# ----------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["W4A4KV16", "W4A16KV16"])
def test_from_config_round_trips_the_format_config(preset):
    cfg = fmt.SpinQuantConfig.from_preset(preset, r4_size=128, rotation="hadamard", weight_method="rtn")
    qc = _cls().from_config(cfg.to_dict())
    assert qc.cfg == cfg
    assert qc.get_name() == "spinquant"
    assert qc.get_supported_act_dtypes() == [torch.bfloat16, torch.float16]
    assert qc.get_min_capability() == 80
    assert qc.get_config_filenames() == []


@pytest.mark.parametrize("field,value", [
    ("act_bits", 3), ("weight_bits", 8), ("kv_bits", 8), ("version", 99),
    ("pack_order", "high_nibble_first"), ("act_symmetric", True), ("r4_size", -4),
])
def test_from_config_rejects_unsupported_values_naming_field_and_value(field, value):
    d = _preset().to_dict()
    d[field] = value
    with pytest.raises(ValueError) as e:
        _cls().from_config(d)
    assert field in str(e.value) and repr(value) in str(e.value)


def test_from_config_rejects_unknown_keys_and_other_methods():
    d = _preset().to_dict()
    with pytest.raises(ValueError, match="group_size"):
        _cls().from_config({**d, "group_size": 128})
    with pytest.raises(ValueError, match="'gptq'"):
        _cls().from_config({**d, "quant_method": "gptq"})


def test_missing_quantization_config_is_named():
    # vLLM calls the class with no argument when config.json has no quantization_config
    with pytest.raises(ValueError, match="no quantization_config"):
        _cls()()


def test_act_clip_other_than_one_is_refused():
    d = _preset(act_clip=0.9).to_dict()
    with pytest.raises(ValueError, match=r"act_clip=0\.9"):
        _cls().from_config(d)


@pytest.mark.parametrize("field", ["r4_size", "r3_size"])
def test_hadamard_sizes_must_be_resolved(field):
    """0 is "not applied"; the offline stage's None ("derive from the model") is refused."""
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", rotation="none", r4_size=0, r3_size=0)
    assert _cls()(cfg).cfg.r4_size == 0
    # a config built in code, or parsed by a format that let None through
    object.__setattr__(cfg, field, None)
    with pytest.raises(ValueError, match=rf"{field}=None.*as an int \(0 = not applied\)"):
        _cls()(cfg)


@pytest.mark.parametrize("backends", ["reference", (), ("triton", 3)])
def test_backends_must_be_a_list_of_names(backends):
    cfg = _preset()
    with pytest.raises(ValueError, match="backends must be a non-empty sequence"):
        _cls()(cfg, backends=backends)
    assert _cls()(cfg, backends=["reference"]).backends == ("reference",)
    assert _cls()(cfg).backends is None


def test_kv4_without_attention_backend_fails_at_start(no_attention_module):
    d = _preset("W4A4KV4").to_dict()
    with pytest.raises(ValueError, match=r"kv_bits=4.*spinquant_vllm\.attention"):
        _cls().from_config(d)


# ----------------------------------------------------------------------------
# --quantization vs the checkpoint
# ----------------------------------------------------------------------------
def test_override_claims_only_spinquant_checkpoints():
    ours = _preset().to_dict()
    ov = _cls().override_quantization_method
    assert ov(ours, None) == "spinquant"
    assert ov(ours, "spinquant") == "spinquant"
    # another flag on our checkpoint: left to vLLM's own mismatch error
    assert ov(ours, "fp8") is None
    # other checkpoints without the flag: not ours
    assert ov({"quant_method": "gptq", "bits": 4}, None) is None
    assert ov({"quant_method": "gptq", "bits": 4}, "gptq") is None
    with pytest.raises(ValueError, match=r"--quantization spinquant.*quant_method='gptq'"):
        ov({"quant_method": "gptq", "bits": 4}, "spinquant")


def test_model_config_detects_checkpoint_method(tmp_path, ckpt):
    from vllm.config import ModelConfig

    ckpt.write(str(tmp_path), fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=128))
    assert ModelConfig(model=str(tmp_path), skip_tokenizer_init=True).quantization == "spinquant"
    assert ModelConfig(model=str(tmp_path), quantization="spinquant",
                       skip_tokenizer_init=True).quantization == "spinquant"
    with pytest.raises(Exception, match=r"spinquant.*does not match.*fp8"):
        ModelConfig(model=str(tmp_path), quantization="fp8", skip_tokenizer_init=True)


def test_model_config_refuses_flag_on_other_checkpoint(tmp_path, ckpt):
    import json

    from vllm.config import ModelConfig

    ckpt.write(str(tmp_path), fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=128))
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                     "desc_act": False, "sym": True}
    path.write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"--quantization spinquant.*quant_method='gptq'"):
        ModelConfig(model=str(tmp_path), quantization="spinquant", skip_tokenizer_init=True)


def test_engine_config_refuses_flag_on_unquantized_checkpoint(tmp_path, ckpt):
    import json

    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    ckpt.write(str(tmp_path), fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=128))
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]
    path.write_text(json.dumps(config))
    mc = ModelConfig(model=str(tmp_path), quantization="spinquant", skip_tokenizer_init=True)
    with pytest.raises(Exception, match="no quantization_config"):
        VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), load_config=LoadConfig())


def test_engine_config_checks_r4_against_intermediate_size(tmp_path, ckpt):
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    # 48 does not divide intermediate_size 128
    ckpt.write(str(tmp_path), fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=48))
    mc = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True)
    with pytest.raises(Exception, match=r"r4_size=48.*intermediate_size \(128\)"):
        VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), load_config=LoadConfig())


def test_engine_config_checks_recorded_tensor_parallel_sizes(tmp_path, ckpt):
    """quantization_config.tensor_parallel_sizes is derived from r4_size and the model's
    intermediate_size; a recorded set that disagrees (an edited config) is refused before any
    weight is allocated, and a consistent one loads (as does one without the key)."""
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    base = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=32)      # 128 / 32 = 4
    for tps, ok in ((None, True), ((1, 2, 4), True), ((1, 2, 4, 8), False), ((1, 2), False)):
        d = tmp_path / str(tps)
        ckpt.write(str(d), dataclasses.replace(base, tensor_parallel_sizes=tps))
        mc = ModelConfig(model=str(d), skip_tokenizer_init=True)
        build = lambda: VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"),  # noqa: E731
                                   load_config=LoadConfig())
        if ok:
            assert build().quant_config.cfg.tensor_parallel_sizes == tps
        else:
            with pytest.raises(Exception, match=re.escape(f"tensor_parallel_sizes={list(tps)}")
                               + r".*r4_size=32 and intermediate_size 128.*\[1, 2, 4\]"):
                build()


# ----------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,prefix,hit", [
    ("lm_head", "lm_head", True),
    ("embed_tokens", "model.embed_tokens", True),
    ("down_proj", "model.layers.3.mlp.down_proj", True),
    ("layers.3", "model.layers.3.mlp.down_proj", True),
    ("layers.3", "model.layers.31.mlp.down_proj", False),
    ("proj", "model.layers.3.mlp.down_proj", False),
    ("model.layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj", True),
])
def test_module_matches(pattern, prefix, hit):
    from spinquant_vllm.config import module_matches

    assert module_matches(prefix, pattern) is hit


def test_layer_skipping_honours_modules_not_quantized():
    base = _preset()
    qc = _cls()(dataclasses.replace(base, modules_not_quantized=("lm_head", "layers.1.mlp")))
    qc.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                 "gate_up_proj": ["gate_proj", "up_proj"]}
    assert qc.is_layer_skipped("lm_head")
    assert qc.is_layer_skipped("model.layers.1.mlp.gate_up_proj")
    assert qc.is_layer_skipped("model.layers.1.mlp.down_proj")
    assert not qc.is_layer_skipped("model.layers.0.mlp.gate_up_proj")
    assert not qc.is_layer_skipped("model.layers.1.self_attn.qkv_proj")
    partial = _cls()(dataclasses.replace(base, modules_not_quantized=("layers.0.self_attn.k_proj",)))
    with pytest.raises(ValueError, match=r"some but not all parts.*qkv_proj"):
        partial.is_layer_skipped("model.layers.0.self_attn.qkv_proj")


def test_get_quant_method_routes_layers(vllm_ctx):
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
        UnquantizedLinearMethod,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    from spinquant_vllm.linear import SpinQuantLinearMethod

    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV16", r4_size=64,
                                          modules_not_quantized=("embed_tokens", "lm_head", "layers.1"))
    qc = _cls()(cfg)
    kw = dict(quant_config=qc, params_dtype=torch.bfloat16, bias=False)
    qkv = QKVParallelLinear(64, 16, 4, 2, prefix="model.layers.0.self_attn.qkv_proj", **kw)
    gate_up = MergedColumnParallelLinear(64, [128, 128], prefix="model.layers.0.mlp.gate_up_proj", **kw)
    down = RowParallelLinear(128, 64, prefix="model.layers.0.mlp.down_proj", **kw)
    o = RowParallelLinear(64, 64, prefix="model.layers.0.self_attn.o_proj", **kw)
    for layer in (qkv, gate_up, down, o):
        assert isinstance(layer.quant_method, SpinQuantLinearMethod), layer.prefix
    assert down.quant_method.had_size == 64
    assert qkv.quant_method.had_size == gate_up.quant_method.had_size == o.quant_method.had_size == 0
    skipped = RowParallelLinear(128, 64, prefix="model.layers.1.mlp.down_proj", **kw)
    assert isinstance(skipped.quant_method, UnquantizedLinearMethod)
    other = ReplicatedLinear(64, 8, prefix="model.layers.0.mlp.router", **kw)
    assert isinstance(other.quant_method, UnquantizedLinearMethod)
    lm_head = ParallelLMHead(96, 64, quant_config=qc, prefix="lm_head", params_dtype=torch.bfloat16)
    embed = VocabParallelEmbedding(96, 64, quant_config=qc, prefix="model.embed_tokens",
                                   params_dtype=torch.bfloat16)
    for layer in (lm_head, embed):
        assert type(layer.quant_method).__name__ == "UnquantizedEmbeddingMethod"
        assert layer.weight.dtype == torch.bfloat16


def test_kv4_attention_layers_go_through_the_attention_hook(vllm_ctx, cpu_attention, monkeypatch):
    from vllm.model_executor.layers.attention import Attention

    import spinquant_vllm.attention as sq_attention

    calls = []
    monkeypatch.setattr(sq_attention, "get_attention_quant_method",
                        lambda layer, prefix, cfg: calls.append((layer, prefix, cfg)))
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV4", r4_size=128, r3_size=16)
    qc = _cls().from_config(cfg.to_dict())
    layer = Attention(num_heads=4, head_size=16, scale=0.25, num_kv_heads=2,
                      prefix="model.layers.0.self_attn.attn")
    assert qc.get_quant_method(layer, "model.layers.0.self_attn.attn") is None
    assert calls == [(layer, "model.layers.0.self_attn.attn", cfg)]
    # 16-bit KV: the hook is not called
    calls.clear()
    qc16 = _cls().from_config(_preset().to_dict())
    assert qc16.get_quant_method(layer, "model.layers.0.self_attn.attn") is None
    assert calls == []
