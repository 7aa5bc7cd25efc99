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
