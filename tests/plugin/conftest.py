"""Fixtures for the vLLM plugin tests: a CPU vLLM context and tiny checkpoints.

vLLM runs here without an engine: a ``VllmConfig`` on device "cpu", its
distributed state initialised with world size 1 over gloo (as vLLM's own
layer tests do), and models built by vLLM's ``DefaultModelLoader``. The CPU
wheel context has no attention backend, so model-building tests substitute
the Triton one (the attention layers are built, never run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import types

import pytest
import torch

from spinquant_kernels import format as fmt


# ----------------------------------------------------------------------------
# a checkpoint in the layout of docs/ARCHITECTURE.md
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TinyShape:
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 1
    vocab: int = 96

    def linears(self) -> dict[str, tuple[int, int]]:
        """Checkpoint linear name (within a layer) -> (N, K)."""
        H, I = self.hidden, self.intermediate
        return {
            "self_attn.q_proj": (self.heads * self.head_dim, H),
            "self_attn.k_proj": (self.kv_heads * self.head_dim, H),
            "self_attn.v_proj": (self.kv_heads * self.head_dim, H),
            "self_attn.o_proj": (H, self.heads * self.head_dim),
            "mlp.gate_proj": (I, H),
            "mlp.up_proj": (I, H),
            "mlp.down_proj": (H, I),
        }


def write_checkpoint(out_dir: str, cfg: fmt.SpinQuantConfig, shape: TinyShape = TinyShape(),
                     seed: int = 0, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Write config.json + model.safetensors for a random Llama of ``shape``.

    Weights are random, quantized with ``format.quantize_weight`` and packed
    with ``format.pack_int4``. Returns the tensors written (names as on disk);
    tensor names in ``drop`` are left out (to test the loader's checks).
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    H, V = shape.hidden, shape.vocab
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H,
        intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        num_hidden_layers=shape.layers, vocab_size=V, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
        quantization_config=cfg.to_dict())
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(V, H, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(V, H, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
    }
    for i in range(shape.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{norm}.weight"] = torch.ones(H, dtype=torch.bfloat16)
        for name, (N, K) in shape.linears().items():
            q, s = fmt.quantize_weight(torch.randn(N, K, generator=g), cfg.weight_bits, mse=False)
            sd[f"model.layers.{i}.{name}.qweight"] = fmt.pack_int4(q)
            sd[f"model.layers.{i}.{name}.weight_scale"] = s
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v for k, v in sd.items() if k not in drop}, os.path.join(out_dir, "model.safetensors"))
    return sd


# ----------------------------------------------------------------------------
# vLLM context
# ----------------------------------------------------------------------------
def _cpu_vllm_config(model_config=None, quant_config=None):
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig

    kw = {} if model_config is None else {"model_config": model_config}
    if quant_config is not None:
        kw["quant_config"] = quant_config
    return VllmConfig(device_config=DeviceConfig(device="cpu"), load_config=LoadConfig(), **kw)


@pytest.fixture(scope="module")
def vllm_dist():
    """vLLM's distributed state with world size 1 (gloo, CPU), for one test module.

    Module scope, and no vLLM config left current between tests, so that
    other test folders run in the same process see vLLM as they left it.
    """
    import spinquant_vllm
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    spinquant_vllm.register()
    owned = not ps.model_parallel_is_initialized()
    if owned:
        # the rendezvous file must outlive the process group (the store keeps it open)
        d = tempfile.mkdtemp(prefix="spinquant_plugin_dist_")
        with set_current_vllm_config(_cpu_vllm_config()):
            ps.init_distributed_environment(
                world_size=1, rank=0, distributed_init_method=f"file://{d}/dist_init",
                local_rank=0, backend="gloo")
            ps.initialize_model_parallel(1, 1)
    yield
    if owned:
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vllm_ctx(vllm_dist):
    """A current VllmConfig (device cpu, no model) for building single layers."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(_cpu_vllm_config()):
        yield


@pytest.fixture
def cpu_attention(monkeypatch):
    """Let vLLM build attention layers on a CPU machine (the Triton backend's classes)."""
    import vllm.model_executor.layers.attention.attention as attention_mod
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    monkeypatch.setattr(attention_mod, "get_attn_backend", lambda *a, **k: TritonAttentionBackend)


@pytest.fixture
def load_vllm_model(vllm_dist, cpu_attention):
    """``load(ckpt_dir, backends=None, **model_config_kw) -> (model, vllm_config)`` through DefaultModelLoader.

    ``backends``: the priority list the linears choose from (None: the
    kernels' default), given to the quantization config vLLM parsed.
    """
    from vllm.config import ModelConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    from spinquant_vllm.config import SpinQuantVllmConfig

    def load(ckpt_dir: str, backends: tuple[str, ...] | None = None, **kw):
        mc = ModelConfig(model=ckpt_dir, dtype="bfloat16", skip_tokenizer_init=True, **kw)
        vc = _cpu_vllm_config(mc)
        if backends is not None:
            vc = _cpu_vllm_config(mc, SpinQuantVllmConfig(vc.quant_config.cfg, backends=backends))
        # vLLM's set_default_torch_dtype does not restore the default dtype when
        # loading raises; tests that expect a refusal would leave bf16 behind
        default_dtype = torch.get_default_dtype()
        try:
            with set_current_vllm_config(vc):
                model = get_model_loader(vc.load_config).load_model(vllm_config=vc, model_config=mc)
        finally:
            torch.set_default_dtype(default_dtype)
        return model, vc

    return load


@pytest.fixture
def tp_rank(monkeypatch):
    """``set(rank, size)``: make vLLM's layers and parameters believe they are TP rank ``rank`` of ``size``.

    Only weight loading and ``quant_method.apply`` are exercised under it (no
    collective runs), so patching the rank/size getters the layer and
    parameter modules imported is enough.
    """
    import vllm.model_executor.layers.linear as linear_mod
    import vllm.model_executor.parameter as param_mod

    import spinquant_vllm.linear as sq_linear

    def set_(rank: int, size: int) -> None:
        for mod in (linear_mod, param_mod):
            monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)
            monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: size)
        monkeypatch.setattr(sq_linear, "get_tensor_model_parallel_world_size", lambda: size)

    return set_


def build_tp_layers(qc, sd: dict[str, torch.Tensor], shape: TinyShape = TinyShape(),
                    layer_idx: int = 0) -> dict[str, torch.nn.Module]:
    """qkv / o / gate_up / down of layer ``layer_idx`` built as vLLM's Llama builds them (on the
    tensor-parallel rank vLLM currently believes in, see ``tp_rank``) and fed the checkpoint
    tensors ``sd`` through their loaders (shard ids q/k/v and 0/1 on the fused layers).
    Keyed by the vLLM name within the layer (``self_attn.qkv_proj``)."""
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    p = f"model.layers.{layer_idx}"
    H, I, hd = shape.hidden, shape.intermediate, shape.head_dim
    kw = dict(quant_config=qc, params_dtype=torch.bfloat16, bias=False)
    layers = {
        "self_attn.qkv_proj": QKVParallelLinear(H, hd, shape.heads, shape.kv_heads,
                                                prefix=f"{p}.self_attn.qkv_proj", **kw),
        "self_attn.o_proj": RowParallelLinear(shape.heads * hd, H, prefix=f"{p}.self_attn.o_proj", **kw),
        "mlp.gate_up_proj": MergedColumnParallelLinear(H, [I, I], prefix=f"{p}.mlp.gate_up_proj", **kw),
        "mlp.down_proj": RowParallelLinear(I, H, prefix=f"{p}.mlp.down_proj", **kw),
    }
    parts = {"self_attn.qkv_proj": (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"),
                                    ("self_attn.v_proj", "v")),
             "self_attn.o_proj": (("self_attn.o_proj", None),),
             "mlp.gate_up_proj": (("mlp.gate_proj", 0), ("mlp.up_proj", 1)),
             "mlp.down_proj": (("mlp.down_proj", None),)}
    for vname, layer in layers.items():
        for part, shard in parts[vname]:
            for suffix in (fmt.QWEIGHT_SUFFIX, fmt.SCALE_SUFFIX):
                param = getattr(layer, suffix)
                t = sd[f"{p}.{part}.{suffix}"]
                if shard is None:
                    param.weight_loader(param, t)
                else:
                    param.weight_loader(param, t, shard)
    return layers


@pytest.fixture
def tp_layers():
    """:func:`build_tp_layers`."""
    return build_tp_layers


@pytest.fixture
def ckpt():
    """Checkpoint helpers: ``ckpt.write(out_dir, cfg, shape, seed, drop)``, ``ckpt.Shape``."""
    return types.SimpleNamespace(write=write_checkpoint, Shape=TinyShape)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` in dB (float64)."""
    ref, x = ref.double(), x.double()
    noise = (ref - x).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


@pytest.fixture
def sqnr():
    return sqnr_db
