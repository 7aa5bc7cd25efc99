"""SpinQuant KV4 attention for vLLM 0.26: a CUSTOM attention backend.

The cache is vLLM's own ``int4_per_token_head`` page layout (uint8,
``(blocks, kv_heads, block_size, 2 * (head_dim/2 + 4))``, sized by
``FullAttentionSpec`` with ``KVQuantMode.INT4_PER_TOKEN_HEAD``), so vLLM's
memory accounting gives the 4-bit capacity unchanged. What goes into it
differs from vLLM's mode (``spinquant_kernels.kv_cache``): the R3 Hadamard of
the checkpoint on K (none on V, which R2 already rotated), centred codes with
the zero point in the scale word, and our Triton kernels on both sides.

Which kernel answers which rows (``SpinQuantKV4Impl.forward``): a pure decode
batch goes to the decode kernel (CUDA-graph safe); a batch with prefill rows
goes to ``kv4_mixed_attention_flash``: fresh prompts through vLLM's
FlashAttention over their K/V read back from the 4-bit cache, one-row
sequences through the decode kernel, chunks with cached context through the
Triton prefill kernel. Where FlashAttention cannot run (fp32 activations on the
GPU) the prefill kernel answers fresh prompts too; that choice is made once per
activation dtype.

Two ways in (docs/KV_CACHE.md):

* automatic: the SpinQuant quantization config calls
  :func:`get_attention_quant_method` for each ``Attention`` layer when the
  checkpoint has ``kv_bits < 16`` and ``--kv-cache-dtype`` is ``auto``; the
  hook switches the layer to this backend and to the 4-bit page spec;
* explicit: ``--attention-backend CUSTOM --kv-cache-dtype int4_per_token_head``
  once :func:`register_attention_backend` has run (the plugin does it).

An explicit ``--kv-cache-dtype`` (bfloat16, fp8, or ``int4_per_token_head``
without ``--attention-backend CUSTOM``) wins over the checkpoint: the layer is
left to vLLM (that is how vLLM's own int4 mode is compared on the same
checkpoint; the R3 Hadamard is then not applied, which leaves Q K^T unchanged).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from spinquant_kernels.attention import (
    kv4_decode_attention,
    kv4_mixed_attention_flash,
    torch_varlen_causal,
    varlen_causal_ref,
)
from spinquant_kernels.kv_cache import (
    dot_dtype,
    hadamard_full,
    hadamard_halves,
    hadamard_perm,
    kv4_cache_shape,
    kv4_cache_write,
    supported_had_size,
)

from vllm.v1.attention.backend import AttentionCGSupport, AttentionImpl, AttentionType
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

logger = logging.getLogger(__name__)

# vLLM's name for the 4-bit per-(token, head) page layout that we reuse.
KV_CACHE_DTYPE = "int4_per_token_head"
BACKEND_CLASS_PATH = "spinquant_vllm.attention.SpinQuantKV4Backend"

_registered = False
_FLASH: tuple | None = None


def flash_varlen() -> tuple:
    """``(varlen, name)``: the causal varlen attention fresh prompts run through on the GPU.

    vLLM's own FlashAttention (``vllm.vllm_flash_attn``, the version vLLM picks for this GPU:
    FA3 on Hopper; GQA without repeating K/V), as its FLASH_ATTN backend runs for a 16-bit
    cache; where it does not load, torch's ``varlen_attn``
    (``spinquant_kernels.attention.torch_varlen_causal``). Resolved once per process."""
    global _FLASH
    if _FLASH is None:
        try:
            from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
            from vllm.vllm_flash_attn import flash_attn_varlen_func
            ver = get_flash_attn_version()
        # a vLLM build without its FlashAttention extension fails to import it (ImportError)
        # or to load its CUDA library (OSError / RuntimeError)
        except (ImportError, OSError, RuntimeError) as e:
            logger.info("vLLM FlashAttention unavailable (%s); torch varlen_attn instead", e)
            ver = None
        if ver is None:
            _FLASH = (torch_varlen_causal, "torch varlen_attn")
        else:
            def fa(q, k, v, cu, max_q, scale, out):
                return flash_attn_varlen_func(q, k, v, max_q, cu, max_q, cu_seqlens_k=cu,
                                              softmax_scale=scale, causal=True, out=out,
                                              fa_version=ver)
            _FLASH = (fa, f"vllm_flash_attn FA{ver}")
        logger.info("SpinQuant KV4: fresh prompts through %s", _FLASH[1])
    return _FLASH


def fresh_prompt_varlen(device: torch.device, dtype: torch.dtype):
    """The varlen attention ``kv4_mixed_attention_flash`` runs fresh prompts through for
    activations of ``dtype`` on ``device``, or None where no flash kernel runs (fp32 on the
    GPU: the Triton prefill kernel answers them). On the CPU (tests) the plain-PyTorch
    stand-in ``varlen_causal_ref``."""
    if device.type != "cuda":
        return varlen_causal_ref
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    return flash_varlen()[0]


# ----------------------------------------------------------------------------
# registration and the hook called by the quantization config
# ----------------------------------------------------------------------------
def register_attention_backend() -> None:
    """Register :class:`SpinQuantKV4Backend` as ``AttentionBackendEnum.CUSTOM`` (idempotent)."""
    global _registered
    if _registered:
        return
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    _registered = True


def _refusal(layer: torch.nn.Module) -> str | None:
    """Why the layer cannot use the KV4 backend, or None."""
    impl = layer.impl
    if getattr(layer, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
        return f"attn_type={layer.attn_type!r} (decoder self-attention only)"
    if getattr(layer, "sliding_window", None) is not None:
        return f"sliding_window={layer.sliding_window} (not supported)"
    if getattr(layer, "kv_sharing_target_layer_name", None) is not None:
        return "KV sharing between layers (not supported)"
    if getattr(layer, "has_sink", False):
        return "attention sinks (not supported)"
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi (not supported)"
    if getattr(impl, "logits_soft_cap", 0) not in (None, 0, 0.0):
        return f"logits_soft_cap={impl.logits_soft_cap} (not supported)"
    if layer.head_size_v != layer.head_size:
        return f"head_size_v={layer.head_size_v} != head_size={layer.head_size}"
    if not SpinQuantKV4Backend.supports_head_size(layer.head_size):
        return f"head_size={layer.head_size} (needs a multiple of 8, >= 16)"
    return None


def get_attention_quant_method(layer: torch.nn.Module, prefix: str, cfg) -> None:
    """Put one vLLM ``Attention`` layer on the SpinQuant KV4 backend; returns None.

    ``cfg`` is the checkpoint's ``spinquant_kernels.format.SpinQuantConfig``
    (``kv_bits``, ``r3_size``, ``kv_clip`` are read). Called from
    ``get_quant_method`` after vLLM built the layer with the backend it chose
    for ``--kv-cache-dtype``; when that is ``auto`` this replaces the layer's
    backend, impl and KV page spec (``kv_cache_dtype`` becomes
    ``int4_per_token_head``, which sizes pages at 4 bits). Idempotent. Raises
    ValueError when the checkpoint asks for 4-bit KV on a layer the backend
    cannot serve (the message names the feature).
    """
    if cfg.kv_bits >= 16:
        return None
    if cfg.kv_bits != 4:
        raise ValueError(f"SpinQuant KV cache supports kv_bits 4 or 16, got {cfg.kv_bits}")
    register_attention_backend()
    if isinstance(layer.impl, SpinQuantKV4Impl):
        return None
    if layer.kv_cache_dtype != "auto":
        logger.warning(
            "%s: --kv-cache-dtype %s was given explicitly; it wins over the checkpoint's "
            "kv_bits=%d and vLLM's own %s path is used (pass --kv-cache-dtype auto for the "
            "SpinQuant KV4 backend)", prefix, layer.kv_cache_dtype, cfg.kv_bits,
            layer.attn_backend.get_name())
        return None
    why = _refusal(layer)
    if why is not None:
        raise ValueError(f"{prefix}: the SpinQuant KV4 cache cannot serve this layer: {why}; "
                         f"use a kv_bits=16 checkpoint or pass --kv-cache-dtype bfloat16")
    had = int(cfg.r3_size)
    if not supported_had_size(layer.head_size, had):
        raise ValueError(f"{prefix}: r3_size={had} must be 0 or a Hadamard order dividing "
                         f"head_size={layer.head_size}")
    old = layer.impl
    layer.impl = SpinQuantKV4Impl(
        old.num_heads, old.head_size, old.scale, old.num_kv_heads, None, None,
        KV_CACHE_DTYPE, None, AttentionType.DECODER, None,
        had_size=had, kv_clip=float(cfg.kv_clip))
    layer.attn_backend = SpinQuantKV4Backend
    layer.backend = AttentionBackendEnum.CUSTOM
    layer.kv_cache_dtype = KV_CACHE_DTYPE
    layer.kv_cache_torch_dtype = torch.uint8
    return None


# ----------------------------------------------------------------------------
# backend, metadata builder, impl
# ----------------------------------------------------------------------------
class SpinQuantKV4MetadataBuilder(TritonAttentionMetadataBuilder):
    """vLLM's Triton metadata (query_start_loc, seq_lens, block_table, slot_mapping).

    Full CUDA graphs only for pure decode batches: the prefill kernel's grid
    depends on ``max_query_len``; the decode kernel's grid only on the batch size.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


class SpinQuantKV4Backend(TritonAttentionBackend):
    """The 4-bit R3 KV cache backend (registered as ``CUSTOM``)."""

    supported_kv_cache_dtypes: ClassVar[list] = [KV_CACHE_DTYPE]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["SpinQuantKV4Impl"]:
        return SpinQuantKV4Impl

    @staticmethod
    def get_builder_cls() -> type[SpinQuantKV4MetadataBuilder]:
        return SpinQuantKV4MetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # Always the 4-bit layout: layers reach this backend only with
        # kv_cache_dtype int4_per_token_head, though the runner may pass the
        # engine-wide "auto" when the hook switched the layer.
        if block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {block_size}")
        return kv4_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size >= 16 and head_size % 8 == 0

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False


class SpinQuantKV4Impl(AttentionImpl):
    """Write: fused R3 + int4 into the paged cache. Read: decode / varlen Triton kernels."""

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = KV_CACHE_DTYPE,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, *,
                 had_size: int | None = None, kv_clip: float = 1.0, **unsupported) -> None:
        checks = [
            ("alibi_slopes", alibi_slopes is None),
            ("sliding_window", sliding_window is None),
            ("logits_soft_cap", logits_soft_cap in (None, 0, 0.0)),
            ("attn_type", attn_type == AttentionType.DECODER),
            ("kv_sharing_target_layer_name", kv_sharing_target_layer_name is None),
            ("kv_cache_dtype", kv_cache_dtype == KV_CACHE_DTYPE),
            ("sinks", unsupported.get("sinks") is None),
            ("use_alibi_sqrt", not unsupported.get("use_alibi_sqrt", False)),
            ("chunk_lookback", unsupported.get("chunk_lookback", -1) == -1),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"SpinQuant KV4 attention does not support {bad} "
                             f"(kv_cache_dtype={kv_cache_dtype!r}, attn_type={attn_type!r})")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.alibi_slopes = None
        self.logits_soft_cap = 0
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sinks = None
        # Selected through --attention-backend CUSTOM the impl has no checkpoint
        # config: R3 of head_size (what SpinQuant checkpoints use) by default.
        self.had_size = head_size if had_size is None else int(had_size)
        self.kv_clip = float(kv_clip)
        if not supported_had_size(head_size, self.had_size):
            raise ValueError(f"had_size={self.had_size} must be 0 or a Hadamard order "
                             f"dividing head_size={head_size}")
        self._had: dict[torch.dtype, tuple] = {}
        # fresh-prompt attention per (device type, activation dtype), see fresh_prompt_varlen
        self._varlen: dict[tuple[str, torch.dtype], object] = {}

    def _hadamard(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(halves for the write kernel, permuted matrix for the attention kernels,
        natural-order matrix for the flash kernel's queries)."""
        dt = dot_dtype(dtype)
        h = self._had.get(dt)
        if h is None or h[1].device != device:
            h = (hadamard_halves(self.head_size, self.had_size, dt, device),
                 hadamard_perm(self.head_size, self.had_size, dt, device),
                 hadamard_full(self.head_size, self.had_size, dt, device))
            self._had[dt] = h
        return h

    def _fresh_varlen(self, device: torch.device, dtype: torch.dtype):
        key = (device.type, dtype)
        if key not in self._varlen:
            self._varlen[key] = fresh_prompt_varlen(device, dtype)
        return self._varlen[key]

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # Build the Hadamard operands before any CUDA-graph capture and pick the
        # fresh-prompt attention at load time.
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            self._hadamard(act_dtype, device)
            self._fresh_varlen(device, act_dtype)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        kv4_cache_write(key[:n], value[:n], kv_cache, slot_mapping, clip=self.kv_clip,
                        had_size=self.had_size, hadamard=self._hadamard(key.dtype, key.device)[0])

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: TritonAttentionMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by "
                                      "SpinQuant KV4 attention")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        q = query[:n]
        out = output[:n]
        hads = self._hadamard(query.dtype, query.device)
        if attn_metadata.max_query_len == 1:
            # default splits depend on the batch size only: CUDA-graph safe
            kv4_decode_attention(
                q, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                attn_metadata.query_start_loc, self.scale, out=out, had_size=self.had_size,
                hadamard=hads[1])
        else:
            kv4_mixed_attention_flash(
                q, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                attn_metadata.query_start_loc, self.scale, attn_metadata.max_query_len, out=out,
                had_size=self.had_size, hadamard_perm=hads[1], hadamard_full=hads[2],
                varlen=self._fresh_varlen(q.device, q.dtype))
        return output


__all__ = [
    "BACKEND_CLASS_PATH",
    "KV_CACHE_DTYPE",
    "SpinQuantKV4Backend",
    "SpinQuantKV4Impl",
    "SpinQuantKV4MetadataBuilder",
    "flash_varlen",
    "fresh_prompt_varlen",
    "get_attention_quant_method",
    "register_attention_backend",
]
