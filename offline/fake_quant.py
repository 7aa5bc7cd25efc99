"""Fake-quantized forward with straight-through gradients.

* ``QuantLinear`` replaces an ``nn.Linear`` (same parameter names, so
  ``torch.func.functional_call`` with rotated weights works): optional online
  Hadamard on its input (R4 for down_proj), per-token asymmetric activation
  fake quant, and either 16-bit weights, quantized weights (codes + scales,
  set once by RTN/GPTQ) or on-the-fly weight fake quant (rotation learning).
* KV cache: a registered attention function applies R3 to Q and K after RoPE
  and fake-quantizes K and V per (token, kv head) before SDPA.

All quantizers come from ``spinquant_kernels.format`` so the simulated
numerics are the ones the kernels implement.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from spinquant_kernels import format as fmt
from spinquant_kernels.hadamard import hadamard_transform_ref

ATTN_IMPL = "spinquant_sdpa"


def quantized_projections(parent: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the children of ``parent`` (a layer's self_attn or mlp) that
    ``format.QUANTIZED_PROJECTIONS`` names, in definition order (Hugging Face Llama:
    q/k/v/o_proj, gate/up/down_proj; the fused vLLM names do not occur there)."""
    return [(n, m) for n, m in parent.named_children() if n in fmt.QUANTIZED_PROJECTIONS]


# ----------------------------------------------------------------------------
# straight-through quantizers
# ----------------------------------------------------------------------------
def ste_act(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Per-row (last dim) asymmetric fake quant; identity gradient."""
    if bits >= 16:
        return x
    return x + (fmt.fake_quant_asym(x.detach(), bits, clip) - x).detach()


def ste_weight(w: torch.Tensor, bits: int, clip_search: bool = True) -> torch.Tensor:
    """Per-output-channel symmetric fake quant; identity gradient.

    Scales as the final RTN picks them: the MSE clip search
    (``format.weight_scale_mse``) or plain absmax. Rotations must be learned
    against the quantizer they are deployed with: on SmolLM2 a rotation learned
    with absmax scales gave ppl 57.7 with absmax RTN but 147 with MSE-clipped
    RTN (benchmarks/results/accuracy/rotation_ablation_cpu.json).
    """
    wd = w.detach()
    s = fmt.weight_scale_mse(wd, bits) if clip_search else fmt.sym_scale(wd, bits)
    return w + (fmt.dequantize_sym(fmt.quantize_sym(wd, s, bits), s).to(w.dtype) - wd)


class QuantLinear(nn.Module):
    """A linear layer with SpinQuant's simulated runtime numerics.

    ``forward(x (..., K)) -> (..., N)``: ``x -> Hadamard(had_size) -> act fake
    quant (act_bits) -> x @ W.T + b`` where ``W`` is the stored weight (the
    dequantized codes once :meth:`set_quantized_weight` ran) or, when
    ``weight_fake_bits`` is set, its on-the-fly fake quant.
    """

    def __init__(self, linear: nn.Linear, act_bits: int = 16, act_clip: float = 1.0,
                 had_size: int = 0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.act_bits, self.act_clip, self.had_size = act_bits, act_clip, had_size
        self.weight_fake_bits: int | None = None
        self.weight_clip_search = True
        self.register_buffer("weight_codes", None, persistent=False)
        self.register_buffer("weight_scale", None, persistent=False)
        # Set by GPTQ calibration: called with the layer input as the GEMM sees it.
        self.input_hook = None

    @torch.no_grad()
    def set_quantized_weight(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Store codes ``q (N, K) int8`` and ``scale (N,) f32``; weight = dequantized."""
        N, K = self.out_features, self.in_features
        if tuple(q.shape) != (N, K) or q.dtype != fmt.CODE_DTYPE:
            raise ValueError(f"codes must be ({N}, {K}) int8, got {tuple(q.shape)} {q.dtype}")
        if tuple(scale.shape) != (N,):
            raise ValueError(f"scale must be ({N},), got {tuple(scale.shape)}")
        self.weight_codes = q.to(self.weight.device)
        self.weight_scale = scale.to(device=self.weight.device, dtype=fmt.SCALE_DTYPE)
        self.weight.copy_(fmt.dequantize_weight(self.weight_codes, self.weight_scale).to(self.weight.dtype))

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the GEMM sees it before activation quantization."""
        if self.had_size:
            x = hadamard_transform_ref(x, self.had_size)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        if self.input_hook is not None:
            self.input_hook(x)
        x = ste_act(x, self.act_bits, self.act_clip)
        w = self.weight
        if self.weight_fake_bits is not None:
            w = ste_weight(w, self.weight_fake_bits, self.weight_clip_search)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}, "
                f"had_size={self.had_size}, quantized={self.weight_codes is not None}")


# ----------------------------------------------------------------------------
# KV cache: R3 + per (token, head) fake quant inside attention
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class KVQuant:
    bits: int
    clip: float
    r3_size: int


def _spinquant_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with R3 on Q/K and KV fake quant; tensors are (batch, heads, seq, head_dim).

    Per-(token, head) quantization depends on that vector alone, so quantizing
    the cached full-precision K/V again at each decode step gives exactly the
    values a cache that stored the codes would return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kvq: KVQuant | None = getattr(module, "spinquant_kv", None)
    if kvq is not None:
        if kvq.r3_size:
            query = hadamard_transform_ref(query, kvq.r3_size)
            key = hadamard_transform_ref(key, kvq.r3_size)
        if kvq.bits < 16:
            key = ste_act(key, kvq.bits, kvq.clip)
            value = ste_act(value, kvq.bits, kvq.clip)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, _spinquant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)


# ----------------------------------------------------------------------------
# installing the simulation into a model
# ----------------------------------------------------------------------------
def install(model: nn.Module, cfg: fmt.SpinQuantConfig) -> nn.Module:
    """Wrap the quantized projections in :class:`QuantLinear` and set up KV quant (in place).

    ``cfg`` must be resolved (``pipeline.resolve_config``) and fit the model
    (``SpinQuantConfig.check_intermediate_size``). The projections of
    ``format.R4_PROJECTIONS`` (down_proj) get the online Hadamard ``cfg.r4_size``
    (block-diagonal: the blocks a tensor-parallel checkpoint is served with);
    Q/K get ``cfg.r3_size`` after RoPE; K/V are fake-quantized when
    ``cfg.kv_bits < 16``. Idempotent: an installed model is updated to ``cfg``.
    """
    cfg.require_resolved("fake_quant.install")
    # the blocks the runtime applies are the checkpoint's; they must tile this model
    cfg.check_intermediate_size(model.config.intermediate_size)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in quantized_projections(parent):
                had = cfg.r4_size if name in fmt.R4_PROJECTIONS else 0
                if isinstance(lin, QuantLinear):
                    lin.act_bits, lin.act_clip, lin.had_size = cfg.act_bits, cfg.act_clip, had
                else:
                    setattr(parent, name, QuantLinear(lin, cfg.act_bits, cfg.act_clip, had))
        layer.self_attn.spinquant_kv = KVQuant(cfg.kv_bits, cfg.kv_clip, cfg.r3_size)
    _register_attention()
    model.config._attn_implementation = ATTN_IMPL
    for sub in model.modules():
        if hasattr(sub, "config") and sub.config is not model.config:
            sub.config._attn_implementation = ATTN_IMPL
    model.spinquant_config = cfg
    return model


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """All :class:`QuantLinear` modules keyed by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_weight_fake_bits(model: nn.Module, bits: int | None, clip_search: bool = True) -> None:
    """Turn on (``bits``) or off (None) on-the-fly weight fake quant for all QuantLinears.

    ``clip_search``: MSE clip search (as the final RTN) or plain absmax scales.
    """
    for m in quant_linears(model).values():
        m.weight_fake_bits = bits
        m.weight_clip_search = clip_search
