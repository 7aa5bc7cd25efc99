"""SpinQuant KV4 attention for vLLM 0.26: a CUSTOM attention backend.

The cache is vLLM's own ``int4_per_token_head`` page layout (uint8,
``(blocks, kv_heads, block_size, 2 * (head_dim/2 + 4))``, sized by
``FullAttentionSpec`` with ``KVQuantMode.INT4_PER_TOKEN_HEAD``), so vLLM's
memory accounting gives the 4-bit capacity unchanged. What goes into it
differs from vLLM's mode (``spinquant_kernels.kv_cache``): the R3 Hadamard of
the checkpoint on K (none on V, which R2 already rotated), centred codes with
the zero point in the scale word, and our Triton kernels on both sides.

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

import json
import logging
import os
import time
from typing import ClassVar

import torch

from spinquant_kernels.attention import (
    UNPACK_MODES,
    kv4_decode_attention,
    kv4_mixed_attention,
    kv4_mixed_attention_dense,
    kv4_mixed_attention_flash,
    kv4_prefill_attention,
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
# Batches with prefill rows (SPINQUANT_KV4_PREFILL):
# * "flash_split" (default since session 8): sequences with no cached context (new prompts,
#   most of the prefill work) go through vLLM's FlashAttention (FA3 on the H100) over their
#   K/V read back from the 4-bit cache, one-row sequences (the decodes of a mixed batch) through
#   the decode kernel, chunks with cached context through the Triton prefill kernel
#   (kv4_mixed_attention_flash). Session 8, side by side with W4A4KV16 on the H100: 1.05x its
#   output tok/s at 1024/256 and 1.20x at 4096/512 (docs/KV_CACHE.md).
# * "flash": the same with the decode rows through the prefill kernel.
# * "triton": the whole batch through the Triton prefill kernel (the default before session 8:
#   0.92x and 0.85x of W4A4KV16 on those workloads); "triton_whole" is accepted for it.
# * "split": decodes to the decode kernel, the rest to the prefill kernel (kv4_mixed_attention).
# * "dense": dequantize each prefill sequence's whole context, then torch's varlen flash.
PREFILL_ENV = "SPINQUANT_KV4_PREFILL"
PREFILL_MODES = ("triton", "split", "dense", "flash", "flash_split")
PREFILL_DEFAULT = "flash_split"
_PREFILL_ALIASES = {"triton_whole": "triton"}
# How the attention kernels turn 4-bit codes into tensor-core operands: "sub", "fold" or
# "magic" (spinquant_kernels.attention.kv4_prefill_attention). "magic" (136 + c as bf16 bit
# patterns) is the default since session 8: the decode kernel at 440 sequences x 4608 tokens
# took 1.56 ms with it against 2.40 ms with "sub" (vLLM's FA3 over a bf16 cache: 2.72 ms).
UNPACK_ENV = "SPINQUANT_KV4_UNPACK"
UNPACK_DEFAULT = "magic"
# The prefill kernel's tiles, "BLOCK_M,TILE_N,WARPS[,STAGES]" (default: the kernel's own).
PREFILL_CFG_ENV = "SPINQUANT_KV4_PREFILL_CFG"


def prefill_cfg_from_env() -> dict:
    """kv4_prefill_attention keyword arguments from ``$SPINQUANT_KV4_PREFILL_CFG``."""
    text = os.environ.get(PREFILL_CFG_ENV, "").strip()
    if not text:
        return {}
    parts = text.split(",")
    try:
        vals = [int(x) for x in parts]
    except ValueError:
        vals = []
    if len(vals) not in (3, 4) or min(vals) < 1 or any(v & (v - 1) for v in vals[:3]):
        raise ValueError(f"{PREFILL_CFG_ENV} must be BLOCK_M,TILE_N,WARPS[,STAGES] (powers of two, "
                         f"stages >= 1), got {text!r}")
    kw = {"block_m": vals[0], "tile_n": vals[1], "num_warps": vals[2]}
    if len(vals) == 4:
        kw["num_stages"] = vals[3]
    return kw


# The decode kernel's settings, "TILE_N,WARPS[,SPLITS]" (default: the kernel's own, with the
# split count from the batch size). Applies to pure decode batches and to the decode rows of
# the split modes (which run unsplit unless SPLITS is given).
DECODE_CFG_ENV = "SPINQUANT_KV4_DECODE_CFG"


def decode_cfg_from_env() -> dict:
    """kv4_decode_attention keyword arguments from ``$SPINQUANT_KV4_DECODE_CFG``."""
    text = os.environ.get(DECODE_CFG_ENV, "").strip()
    if not text:
        return {}
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (2, 3) or min(vals) < 1 or any(v & (v - 1) for v in vals):
        raise ValueError(f"{DECODE_CFG_ENV} must be TILE_N,WARPS[,SPLITS] (powers of two), "
                         f"got {text!r}")
    kw = {"tile_n": vals[0], "num_warps": vals[1]}
    if len(vals) == 3:
        kw["num_splits"] = vals[2]
    return kw


# Diagnostics: a file path; the impl then times its attention calls with CUDA events (not
# while a CUDA graph is being captured) and on the host (wall time of the Python call: Triton
# compiling a kernel variant on first use shows up there as a stall), and rewrites that file
# with per-path totals every 512 timed calls. Off by default (the events and the periodic
# sync cost time).
TIMING_ENV = "SPINQUANT_KV4_TIMING"

_registered = False
_FLASH: tuple | None = None


def flash_varlen() -> tuple:
    """``(varlen, name)``: the causal varlen attention the ``flash`` modes run on fresh prompts.

    vLLM's own FlashAttention (``vllm.vllm_flash_attn``, the version vLLM picks for this GPU:
    FA3 on Hopper; GQA without repeating K/V), as its FLASH_ATTN backend runs for a 16-bit
    cache; where it does not load, torch's ``varlen_attn``
    (``spinquant_kernels.attention.torch_varlen_causal``)."""
    global _FLASH
    if _FLASH is None:
        try:
            from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
            from vllm.vllm_flash_attn import flash_attn_varlen_func
            ver = get_flash_attn_version()
        except Exception as e:  # no CUDA build of vLLM's FlashAttention here
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
    return _FLASH


_TIMERS: dict = {}


def _shared_timer(path: str) -> "_CallTimer":
    """One timer per process and path, shared by every layer's impl."""
    if path not in _TIMERS:
        _TIMERS[path] = _CallTimer(path)
    return _TIMERS[path]


class _CallTimer:
    """GPU time of the impl's attention calls, per path, flushed to a JSON file."""

    def __init__(self, path: str, flush_every: int = 512):
        self.path, self.flush_every = path, flush_every
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.pending: list = []
        self.totals: dict = {}

    # a host call slower than this is counted as a stall (a GPU-side attention call over a
    # whole chunked-prefill step takes a few ms)
    STALL_S = 0.1

    def start(self):
        if torch.cuda.is_current_stream_capturing():
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev, time.perf_counter()

    def stop(self, started, key: str, tokens: int, seqs: int) -> None:
        if started is None:
            return
        ev, t0 = started
        host_s = time.perf_counter() - t0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((key, tokens, seqs, ev, end, host_s))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        torch.cuda.synchronize()
        for key, tokens, seqs, a, b, host_s in self.pending:
            t = self.totals.setdefault(key, {"calls": 0, "ms": 0.0, "tokens": 0, "seqs": 0,
                                             "host_ms": 0.0, "host_max_ms": 0.0,
                                             "stalls": 0, "stall_ms": 0.0})
            t["calls"] += 1
            t["ms"] += a.elapsed_time(b)
            t["tokens"] += tokens
            t["seqs"] += seqs
            t["host_ms"] += 1e3 * host_s
            t["host_max_ms"] = max(t["host_max_ms"], 1e3 * host_s)
            if host_s > self.STALL_S:
                t["stalls"] += 1
                t["stall_ms"] += 1e3 * host_s
        self.pending.clear()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "totals": self.totals}, f, indent=1)
        os.replace(tmp, f"{self.path}.{os.getpid()}.json")


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
        mode = os.environ.get(PREFILL_ENV, PREFILL_DEFAULT)
        self.prefill_mode = _PREFILL_ALIASES.get(mode, mode)
        if self.prefill_mode not in PREFILL_MODES:
            raise ValueError(f"{PREFILL_ENV} must be one of {', '.join(PREFILL_MODES)}, "
                             f"got {self.prefill_mode!r}")
        self.unpack = os.environ.get(UNPACK_ENV, UNPACK_DEFAULT)
        if self.unpack not in UNPACK_MODES:
            raise ValueError(f"{UNPACK_ENV} must be one of {', '.join(UNPACK_MODES)}, "
                             f"got {self.unpack!r}")
        self.prefill_kw = {"unpack": self.unpack, **prefill_cfg_from_env()}
        self.decode_kw = {"unpack": self.unpack, **decode_cfg_from_env()}
        self._flash_logged = False
        timing = os.environ.get(TIMING_ENV, "")
        self.timer = _shared_timer(timing) if timing else None

    def _hadamard(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(halves for the write kernel, permuted matrix for the attention kernels,
        natural-order matrix for the dense prefill)."""
        dt = dot_dtype(dtype)
        h = self._had.get(dt)
        if h is None or h[1].device != device:
            h = (hadamard_halves(self.head_size, self.had_size, dt, device),
                 hadamard_perm(self.head_size, self.had_size, dt, device),
                 hadamard_full(self.head_size, self.had_size, dt, device))
            self._had[dt] = h
        return h

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # Build the Hadamard operands before any CUDA-graph capture.
        if torch.cuda.is_available():
            self._hadamard(act_dtype, torch.device("cuda", torch.cuda.current_device()))

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
        seq_lens = attn_metadata.seq_lens
        cu_q = attn_metadata.query_start_loc
        ev = self.timer.start() if self.timer is not None and q.is_cuda else None
        self._attend(q, kv_cache, attn_metadata, out, hads, seq_lens, cu_q)
        if ev is not None:
            key = "decode" if attn_metadata.max_query_len == 1 else self.prefill_mode
            self.timer.stop(ev, key, n, seq_lens.shape[0])
        return output

    def _attend(self, q, kv_cache, attn_metadata, out, hads, seq_lens, cu_q) -> None:
        had = hads[1]
        if attn_metadata.max_query_len == 1:
            # default splits depend on the batch size only: CUDA-graph safe
            kv4_decode_attention(
                q, kv_cache, attn_metadata.block_table, seq_lens, cu_q, self.scale,
                out=out, had_size=self.had_size, hadamard=had, **self.decode_kw)
        elif self.prefill_mode == "dense" and q.is_cuda:
            kv4_mixed_attention_dense(
                q, kv_cache, attn_metadata.block_table, seq_lens, cu_q, self.scale, out=out,
                had_size=self.had_size, hadamard_perm=had, hadamard_full=hads[2])
        elif self.prefill_mode in ("flash", "flash_split") and (
                not q.is_cuda or q.dtype in (torch.float16, torch.bfloat16)):
            # (flash kernels take fp16/bf16: an fp32 model on the GPU takes the Triton path)
            if q.is_cuda:
                varlen, name = flash_varlen()
                if not self._flash_logged:
                    logger.info("SpinQuant KV4 %s: fresh prompts through %s", self.prefill_mode, name)
                    self._flash_logged = True
            else:   # CPU (tests): the plain-PyTorch stand-in
                varlen = varlen_causal_ref
            kv4_mixed_attention_flash(
                q, kv_cache, attn_metadata.block_table, seq_lens, cu_q, self.scale,
                attn_metadata.max_query_len, out=out, had_size=self.had_size, hadamard_perm=had,
                hadamard_full=hads[2], varlen=varlen,
                split_decodes=self.prefill_mode == "flash_split", prefill_kw=self.prefill_kw,
                decode_kw=self.decode_kw)
        elif self.prefill_mode == "split":
            kv4_mixed_attention(
                q, kv_cache, attn_metadata.block_table, seq_lens, cu_q, self.scale,
                attn_metadata.max_query_len, out=out, had_size=self.had_size, hadamard=had,
                prefill_kw=self.prefill_kw, decode_kw=self.decode_kw)
        else:
            kv4_prefill_attention(
                q, kv_cache, attn_metadata.block_table, seq_lens, cu_q, self.scale,
                attn_metadata.max_query_len, out=out, had_size=self.had_size, hadamard=had,
                **self.prefill_kw)


__all__ = [
    "BACKEND_CLASS_PATH",
    "DECODE_CFG_ENV",
    "PREFILL_CFG_ENV",
    "TIMING_ENV",
    "KV_CACHE_DTYPE",
    "flash_varlen",
    "SpinQuantKV4Backend",
    "SpinQuantKV4Impl",
    "SpinQuantKV4MetadataBuilder",
    "get_attention_quant_method",
    "decode_cfg_from_env",
    "prefill_cfg_from_env",
    "register_attention_backend",
]
