"""A checkpoint written by the offline stage, served by the plugin's layers.

The offline pipeline (tiny random Llama, Hadamard rotations, RTN weights)
writes a checkpoint with ``spinquant_offline.checkpoint.save_checkpoint``;
vLLM loads it through DefaultModelLoader; each vLLM linear's apply() must
compute what the offline fake-quant QuantLinear modules compute on the same
input (fused layers: the concatenated outputs of their parts).
"""

from __future__ import annotations

import pytest
import torch

from spinquant_kernels import format as fmt

GEN_SEED = 4321


class _NoTokenizer:
    """save_checkpoint writes tokenizer files; the vLLM side skips the tokenizer."""

    def save_pretrained(self, path):
        return ()


@pytest.fixture(autouse=True)
def _registered(vllm_dist):
    pass


@pytest.mark.parametrize("preset", ["W4A4KV16", "W4A16KV16"])
def test_vllm_layers_match_offline_fake_quant(tmp_path, load_vllm_model, sqnr, preset):
    checkpoint = pytest.importorskip("spinquant_offline.checkpoint")
    from spinquant_offline import fake_quant, pipeline
    from spinquant_offline.model import tiny_llama

    model = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128,
                       dtype=torch.float32)
    cfg = fmt.SpinQuantConfig.from_preset(preset, rotation="hadamard", weight_method="rtn")
    model, cfg, meta = pipeline.build(model, None, cfg, pipeline.PipelineOptions(progress=False))
    assert cfg.r4_size == 128  # R4 over the whole intermediate dimension
    out = checkpoint.save_checkpoint(tmp_path / "ckpt", model, cfg, _NoTokenizer(), meta)

    vmodel, _ = load_vllm_model(out, backends=("reference",))
    offline = fake_quant.quant_linears(model)
    g = torch.Generator().manual_seed(GEN_SEED)
    fused = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj": ("self_attn.o_proj",),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj": ("mlp.down_proj",),
    }
    for i in range(2):
        for vname, parts in fused.items():
            layer = vmodel.get_submodule(f"model.layers.{i}.{vname}")
            assert layer.quant_method.had_size == (128 if vname == "mlp.down_proj" else 0)
            K = layer.qweight.shape[1] * 2
            x = torch.randn(6, K, generator=g).to(torch.bfloat16)
            y = layer.quant_method.apply(layer, x)
            with torch.no_grad():
                want = torch.cat([offline[f"model.layers.{i}.{p}"](x.float()) for p in parts], dim=-1)
            # same codes and scales; the offline product is float32, the plugin's is
            # the exact integer product rounded to bf16 (~50 dB on its own)
            assert sqnr(want, y.float()) > 35, f"layer {i} {vname}"


@pytest.mark.parametrize("preset, floor", [("W4A16KV16", 35), ("W4A4KV16", 12)])
def test_offline_checkpoint_for_tp4_served_by_four_ranks(tmp_path, vllm_ctx, tp_rank, tp_layers, sqnr,
                                                         preset, floor):
    """`--tensor-parallel-sizes 4` offline: R4 in blocks of 32 (intermediate 128 / 4), recorded with
    the degrees it fits. Four simulated ranks load their shards of the checkpoint, and their
    down_proj partial products (each rank's own R4 blocks) add up to what the offline fake-quant
    down_proj computes: to bf16 rounding with 16-bit activations; with 4-bit ones each rank
    quantizes its shard with its own scales (close, not equal)."""
    import json
    import pathlib

    from safetensors.torch import load_file

    from spinquant_offline import checkpoint, fake_quant, pipeline
    from spinquant_offline.model import tiny_llama
    from spinquant_vllm.config import SpinQuantVllmConfig

    model = tiny_llama(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, vocab=128,
                       dtype=torch.float32)
    cfg = fmt.SpinQuantConfig.from_preset(preset, rotation="hadamard", weight_method="rtn",
                                          tensor_parallel_sizes=(4,))
    model, cfg, meta = pipeline.build(model, None, cfg, pipeline.PipelineOptions(progress=False))
    out = pathlib.Path(checkpoint.save_checkpoint(tmp_path / "ckpt", model, cfg, _NoTokenizer(), meta))
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (written["r4_size"], written["tensor_parallel_sizes"]) == (32, [1, 2, 4])
    sd = load_file(str(out / "model.safetensors"))
    qc = SpinQuantVllmConfig(fmt.SpinQuantConfig.from_dict(written), backends=("reference",))

    g = torch.Generator().manual_seed(GEN_SEED)
    x = torch.randn(6, 128, generator=g).to(torch.bfloat16)
    partial = []
    for rank in range(4):
        tp_rank(rank, 4)
        layer = tp_layers(qc, sd)["mlp.down_proj"]
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.quant_method.had_size == 32
        partial.append(layer.quant_method.apply(layer, x[:, rank * 32:(rank + 1) * 32]).double())
    with torch.no_grad():
        want = fake_quant.quant_linears(model)["model.layers.0.mlp.down_proj"](x.float())
    assert sqnr(want, sum(partial)) > floor
