"""The linear method of ``spinquant``: 4-bit weights in GPU memory, W4A4 GEMMs.

Three jobs (STYLE.md section 6):

* :meth:`SpinQuantLinearMethod.create_weights` registers the checkpoint
  tensors with vLLM's tensor-parallel-aware parameter classes;
* :meth:`SpinQuantLinearMethod.process_weights_after_loading` prepares them
  through :func:`spinquant_kernels.linear.prepare_w4`, chooses the kernel
  backend once (:func:`spinquant_kernels.linear.select_backend` over the
  config's priority list) and tunes the GEMM autotuner for every M bucket of
  the layer's shape (:func:`spinquant_kernels.linear.warmup`, when the
  config's options ask for it);
* :meth:`SpinQuantLinearMethod.apply` is one call of
  ``torch.ops.spinquant.w4ax_linear`` with the chosen backend (fused block
  Hadamard for down_proj, per-token activation quantization, integer GEMM,
  scales, bias), which trusts that choice on every call.

Parameters per layer, on rank r of a tensor-parallel group of size t
(``N_r = sum(output_partition_sizes)``, ``K_r = input_size_per_partition``):

* ``qweight`` (N_r, K_r/2) uint8, :class:`PackedvLLMParameter` packed along
  the input dim (``format.PACK_FACTOR`` int4 codes per byte,
  ``format.pack_int4``). Column-parallel layers (qkv_proj with shard ids
  q/k/v, gate_up_proj with shard ids 0/1) take the rows of their shard;
  row-parallel layers (o_proj, down_proj) take bytes
  ``[r * K_r/2, (r + 1) * K_r/2)`` of every row, i.e. input columns
  ``[r * K_r, (r + 1) * K_r)``.
* ``weight_scale`` (N_r,) float32, :class:`ChannelQuantScaleParameter`
  (sliced like the rows of qweight; whole on row-parallel layers).
* after loading: ``weight_rowsum`` (N_r,) int32, the zero-point correction.

R4 and tensor parallelism: ``r4_size`` is the block size of the online
Hadamard on the down_proj input (0: no R4). The Hadamard is block-diagonal
over the intermediate dimension (the offline stage absorbs the same
block-diagonal matrix into W_down), so a rank holding ``intermediate / t``
consecutive columns applies the same blocks to its slice iff
``(intermediate / t) % r4_size == 0``. Otherwise the layer refuses to build,
naming the sizes.
"""

from __future__ import annotations

import functools
import time

import torch

from spinquant_kernels import format as fmt
from spinquant_kernels import linear as sq_kernels
from spinquant_kernels.linear import BACKENDS, can_implement, prepare_w4, select_backend
from spinquant_kernels.options import WARMUP_ENV
from vllm.config import get_current_vllm_config_or_none
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import ChannelQuantScaleParameter, PackedvLLMParameter
from vllm.model_executor.utils import set_weight_attrs

from . import ops  # noqa: F401  (registers torch.ops.spinquant.w4ax_linear)
from .config import SpinQuantVllmConfig

logger = init_logger(__name__)

QWEIGHT = fmt.QWEIGHT_SUFFIX
SCALE = fmt.SCALE_SUFFIX
ROWSUM = "weight_rowsum"
# Shapes warmed by this process and the seconds spent (for the log line).
_WARMUP_TOTAL = {"shapes": 0, "seconds": 0.0}


def _max_batched_tokens() -> int | None:
    """vLLM's ``max_num_batched_tokens`` (the largest M a linear sees), if a config is current."""
    vc = get_current_vllm_config_or_none()
    m = getattr(getattr(vc, "scheduler_config", None), "max_num_batched_tokens", None)
    return int(m) if isinstance(m, int) and m > 0 else None


def _applied_bias(layer: torch.nn.Module) -> torch.Tensor | None:
    """The bias vLLM's forward passes to apply() on this rank (None: added elsewhere or absent)."""
    bias = getattr(layer, "bias", None)
    if bias is None or getattr(layer, "skip_bias_add", False):
        return None
    if isinstance(layer, RowParallelLinear) and getattr(layer, "tp_rank", 0) > 0:
        return None  # row-parallel layers add the bias on rank 0 only
    return bias


def _expected_shards(layer: torch.nn.Module) -> tuple:
    """Shard ids the checkpoint feeds this layer one by one (``(None,)``: one whole tensor)."""
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)


def _checks_loaded_shards() -> bool:
    """False under ``--load-format dummy``, which fills weights without the loaders."""
    vc = get_current_vllm_config_or_none()
    load_format = getattr(getattr(vc, "load_config", None), "load_format", None)
    return str(getattr(load_format, "value", load_format)) != "dummy"


@register_weight_loader_v2_supported_method
class SpinQuantLinearMethod(LinearMethodBase):
    """W4A{act_bits} linear of one vLLM layer (one instance per layer).

    Args:
        quant_config: the parsed checkpoint config; its ``backends`` (None:
            ``spinquant_kernels.linear.BACKENDS``) is the priority list the
            backend is chosen from, its ``options.warmup`` whether the GEMM
            is tuned at load time.
        prefix: the layer's vLLM name (``model.layers.0.mlp.down_proj``);
            its last component decides whether the R4 Hadamard applies.
    """

    def __init__(self, quant_config: SpinQuantVllmConfig, prefix: str) -> None:
        self.quant_config = quant_config
        self.prefix = prefix
        cfg = quant_config.cfg
        self.act_bits = cfg.act_bits
        self.is_r4 = prefix.rpartition(".")[2] in fmt.R4_PROJECTIONS
        # r4_size 0: the checkpoint has no R4, and neither has any layer
        self.had_size = cfg.r4_size if self.is_r4 else 0
        self.backends: tuple[str, ...] = quant_config.backends or BACKENDS
        self.warmup = quant_config.options.warmup
        self.backend: str | None = None
        self._expected_shards: tuple = (None,)
        self._loaded: dict[str, set] | None = None
        self._check_loaded = False
        self._warmup_max_m: int | None = None

    # ------------------------------------------------------------------
    def _check_shapes(self, layer: torch.nn.Module, K: int, N: int, input_size: int) -> None:
        tp = getattr(layer, "tp_size", None) or get_tensor_model_parallel_world_size()
        if K % fmt.PACK_FACTOR:
            raise ValueError(
                f"spinquant: {self.prefix} holds K={K} input columns per rank (input_size "
                f"{input_size}, tensor parallel size {tp}); {fmt.PACK_FACTOR} int4 codes share a "
                f"byte, so K must be a multiple of {fmt.PACK_FACTOR}")
        if self.had_size and K % self.had_size:
            cfg = self.quant_config.cfg
            fits = (cfg.tensor_parallel_sizes if cfg.tensor_parallel_sizes is not None
                    else cfg.r4_tensor_parallel_sizes(input_size))
            raise ValueError(
                f"spinquant: {self.prefix}: the online Hadamard R4 is block-diagonal with "
                f"r4_size={self.had_size} over the intermediate dimension ({input_size}); with "
                f"tensor parallel size {tp} each rank holds {K} columns, which r4_size must "
                f"divide ({K} % {self.had_size} = {K % self.had_size}). This checkpoint serves "
                f"at tensor parallel sizes {list(fits)} (quantization_config."
                f"tensor_parallel_sizes); for {tp}, re-quantize with `spinquant quantize "
                f"--tensor-parallel-sizes {tp}` (an r4_size dividing {K}: the offline stage "
                f"absorbs the same blocks)")
        # Structural checks of the kernel package (act_bits, had_size order):
        # the reference backend accepts every shape the format allows.
        ok, why = can_implement("reference", torch.device("cpu"), self.act_bits, K, N, self.had_size)
        if not ok:
            raise ValueError(f"spinquant: {self.prefix}: {why}")

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        """Register ``qweight`` (N_r, K_r/2) uint8 and ``weight_scale`` (N_r,) float32 on ``layer``."""
        weight_loader = extra_weight_attrs.pop("weight_loader")
        K = input_size_per_partition
        N = sum(output_partition_sizes)
        self._check_shapes(layer, K, N, input_size)
        self._expected_shards = _expected_shards(layer)
        self._loaded = {QWEIGHT: set(), SCALE: set()}
        self._check_loaded = _checks_loaded_shards()
        self._warmup_max_m = _max_batched_tokens()  # the config is current while layers are built

        qweight = PackedvLLMParameter(
            data=torch.empty(N, K // fmt.PACK_FACTOR, dtype=fmt.PACKED_DTYPE),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=fmt.PACK_FACTOR,
            weight_loader=self._tracking(weight_loader, QWEIGHT),
        )
        weight_scale = ChannelQuantScaleParameter(
            data=torch.empty(N, dtype=fmt.SCALE_DTYPE),
            output_dim=0,
            weight_loader=self._tracking(weight_loader, SCALE),
        )
        layer.register_parameter(QWEIGHT, qweight)
        layer.register_parameter(SCALE, weight_scale)
        set_weight_attrs(qweight, extra_weight_attrs)
        set_weight_attrs(weight_scale, extra_weight_attrs)
        layer.spinquant_shape = (N, K)

    def _tracking(self, loader, name: str):
        """Wrap vLLM's loader to record which shards of ``name`` the checkpoint provided."""

        @functools.wraps(loader)
        def load(param, loaded_weight, *args, **kwargs):
            loader(param, loaded_weight, *args, **kwargs)
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            self._loaded[name].update(shard if isinstance(shard, tuple) else (shard,))

        return load

    def _check_all_loaded(self) -> None:
        # vLLM's loader checks for missing tensors only in unquantized models;
        # an unloaded shard here would be serving torch.empty() memory.
        for name, got in self._loaded.items():
            if None in got:  # fused on disk: one tensor for all shards
                continue
            missing = [s for s in self._expected_shards if s not in got]
            if missing:
                parts = missing if missing != [None] else ["(whole tensor)"]
                raise ValueError(f"spinquant: the checkpoint did not provide {self.prefix}.{name} "
                                 f"for shard(s) {parts}; got shards {sorted(map(str, got))}")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Prepare the loaded weight for the kernels, choose the backend, warm the GEMM up."""
        if self._check_loaded and self._loaded is not None:
            self._check_all_loaded()
            # later calls (weight reloads) replace whole tensors; check once
            self._loaded = None
        packed = prepare_w4(getattr(layer, QWEIGHT).data, getattr(layer, SCALE).data)
        N, K = layer.spinquant_shape
        if (packed.N, packed.K) != (N, K):
            raise ValueError(f"spinquant: {self.prefix}: prepared weight is {packed.N}x{packed.K}, "
                             f"expected {N}x{K}")
        # Plain parameters from here on: the tensors the op reads, with
        # fixed addresses for CUDA graphs.
        for name, t in ((QWEIGHT, packed.qweight), (SCALE, packed.scale), (ROWSUM, packed.rowsum)):
            if name in layer._parameters:
                del layer._parameters[name]
            layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

        self.backend = select_backend(packed.device, self.act_bits, K, N, self.had_size, self.backends)
        passed_over = self.backends[:self.backends.index(self.backend)]
        if passed_over:
            reasons = [can_implement(b, packed.device, self.act_bits, K, N, self.had_size)[1]
                       for b in passed_over]
            logger.warning("spinquant: %s (%dx%d, act_bits=%d, had_size=%d) runs on backend %r; "
                           "refused before it: %s", self.prefix, N, K, self.act_bits,
                           self.had_size, self.backend, "; ".join(reasons))
        if self.backend == "triton" and self.warmup:
            self._warmup(layer, packed)

    def _warmup(self, layer: torch.nn.Module, packed) -> None:
        """Tune the GEMM autotuner for every M bucket of this shape (once per shape and process).

        Without it, buckets that vLLM's start-up does not run (prefill chunks of
        1024-4096 tokens) are tuned inside the first requests that reach them.
        """
        dtype = getattr(layer, "params_dtype", None)
        if dtype not in (torch.bfloat16, torch.float16):
            dtype = torch.bfloat16
        max_m = self._warmup_max_m or _max_batched_tokens()
        t0 = time.perf_counter()
        try:
            ran = sq_kernels.warmup(packed, self.act_bits, self.had_size, dtype, _applied_bias(layer),
                                    max_m=max_m)
        except torch.OutOfMemoryError as e:
            # The warm-up's own buffers (up to max_m x K input, max_m x N output) are the
            # only allocation here that serving does not make; any other failure (a kernel
            # that does not compile or launch) would fail the first request the same way,
            # so it stops the load instead.
            logger.warning("spinquant: GEMM warm-up ran out of memory for %s (N=%d K=%d, up to "
                           "%s tokens): %s; the autotuner will tune on first use instead (%s=0 "
                           "skips the warm-up)", self.prefix, packed.N, packed.K, max_m, e,
                           WARMUP_ENV)
            return
        if not ran:
            return
        dt = time.perf_counter() - t0
        _WARMUP_TOTAL["shapes"] += 1
        _WARMUP_TOTAL["seconds"] += dt
        sizes = sq_kernels.warmup_sizes(max_m)
        logger.info("spinquant: GEMM warm-up: %d shape(s) tuned in %.1f s so far (this one: %s "
                    "N=%d K=%d act_bits=%d had_size=%d, %d token counts up to %d, %.1f s; %s=0 "
                    "skips it)", _WARMUP_TOTAL["shapes"], _WARMUP_TOTAL["seconds"], self.prefix,
                    packed.N, packed.K, self.act_bits, self.had_size, len(sizes), max(sizes), dt,
                    WARMUP_ENV)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x (..., K_r)`` bf16/fp16 -> ``(..., N_r)`` in x.dtype (bias added when given)."""
        return torch.ops.spinquant.w4ax_linear(
            x, getattr(layer, QWEIGHT), getattr(layer, SCALE), getattr(layer, ROWSUM),
            self.act_bits, self.had_size, bias, self.backend)
