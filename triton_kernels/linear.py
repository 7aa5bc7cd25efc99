"""The quantized linear the vLLM plugin calls: weight preparation and backend choice.

One call computes the runtime math of ARCHITECTURE.md::

    x (..., K) --(block Hadamard of had_size over K, optional)--> per-token
    asymmetric quantization (act_bits) -> qx, sx, zx
    y = sx * sw * (qx @ qw.T - zx * rowsum(qw)) (+ bias)  -> (..., N) in x.dtype

``act_bits == 16`` is weight-only (W4A16): the activations are not quantized.

The backend is chosen once per layer, when its weight is prepared:
:func:`select_backend` tries :data:`BACKENDS` in priority order, each
answering :func:`can_implement` with ``(ok, reason)``; the last one,
``"reference"`` (plain PyTorch), accepts everything the format allows, and
the choice raises with every refusal reason when nothing fits. A caller that
passes the chosen ``backend`` to :func:`w4ax_linear` skips the choice (and
the argument checks) on every call; without one the call chooses itself.
"""

from __future__ import annotations

import dataclasses

import torch

from . import format as fmt
from ._common import interpreting
from .hadamard import decompose, hadamard_transform_ref
from .hadamard_quant import hadamard_only, hadamard_quant, hadamard_quant_supported
from .w4a4_gemm import _m_bucket, w4a4_gemm, w4a4_matmul_exact, w4a16_gemm, w4a16_supported

# Priority order; the reference path is last and accepts every input.
BACKENDS: tuple[str, ...] = ("triton", "reference")
_ACT_BITS = (4, 8, 16)


# ----------------------------------------------------------------------------
# the prepared weight
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class PackedW4:
    """A 4-bit weight prepared for the kernels.

    qweight: (N, K/2) uint8 (``format.PACK_FACTOR`` codes per byte), contiguous,
        ``format.pack_int4`` layout (element 2j in the low nibble, 2j+1 in the
        high nibble, centred codes in [-8, 7]).
        The GEMM reads this layout directly (no repack is needed).
    scale: (N,) float32 per-output-channel symmetric scale.
    rowsum: (N,) int32, sum over K of the int4 codes (the zero-point correction).
    N, K: the logical shape of the weight.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    rowsum: torch.Tensor
    N: int
    K: int

    def __post_init__(self) -> None:
        packed_k = self.K // fmt.PACK_FACTOR
        if self.qweight.dtype != fmt.PACKED_DTYPE or tuple(self.qweight.shape) != (self.N, packed_k):
            raise ValueError(f"PackedW4.qweight must be ({self.N}, {packed_k}) uint8, got "
                             f"{tuple(self.qweight.shape)} {self.qweight.dtype}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (self.N,):
            raise ValueError(f"PackedW4.scale must be ({self.N},) float32, got "
                             f"{tuple(self.scale.shape)} {self.scale.dtype}")
        if self.rowsum.dtype != torch.int32 or tuple(self.rowsum.shape) != (self.N,):
            raise ValueError(f"PackedW4.rowsum must be ({self.N},) int32, got "
                             f"{tuple(self.rowsum.shape)} {self.rowsum.dtype}")

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> torch.Tensor:
        """The int4 codes unpacked: (N, K) int8."""
        return fmt.unpack_int4(self.qweight)


def _check_weight(qweight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[int, int]:
    if qweight.dim() != 2 or qweight.dtype != fmt.PACKED_DTYPE:
        raise ValueError(f"qweight must be (N, K/2) uint8, got {tuple(qweight.shape)} {qweight.dtype}")
    N, KH = qweight.shape
    if tuple(weight_scale.shape) not in ((N,), (N, 1)):
        raise ValueError(f"weight_scale must be ({N},) to match qweight, got {tuple(weight_scale.shape)}")
    return N, fmt.PACK_FACTOR * KH


def prepare_w4_ref(qweight: torch.Tensor, weight_scale: torch.Tensor) -> PackedW4:
    """Reference of :func:`prepare_w4` (unpacks with ``format.unpack_int4``)."""
    N, K = _check_weight(qweight, weight_scale)
    rowsum = fmt.unpack_int4(qweight).to(torch.int32).sum(dim=1, dtype=torch.int32)
    return PackedW4(qweight.contiguous(), weight_scale.reshape(N).to(torch.float32).contiguous(),
                    rowsum.contiguous(), N, K)


def prepare_w4(qweight: torch.Tensor, weight_scale: torch.Tensor) -> PackedW4:
    """Prepare a checkpoint weight for the kernels (equivalent to :func:`prepare_w4_ref`).

    qweight: (N, K/2) uint8 from ``format.pack_int4``; weight_scale: (N,) float32.
    The GEMM reads the checkpoint layout, so this only makes the tensors
    contiguous and computes ``rowsum`` (N,) int32 on the weight's device.
    """
    N, K = _check_weight(qweight, weight_scale)
    u = qweight.to(torch.int32)
    # sign-extend each nibble: (v ^ 8) - 8 maps the 4-bit two's complement pattern to [-8, 7]
    lo = ((u & 0xF) ^ 8) - 8
    hi = (((u >> 4) & 0xF) ^ 8) - 8
    rowsum = (lo.sum(dim=1) + hi.sum(dim=1)).to(torch.int32)
    return PackedW4(qweight.contiguous(), weight_scale.reshape(N).to(torch.float32).contiguous(),
                    rowsum.contiguous(), N, K)


# ----------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------
def _triton_usable(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreting():
        return True, ""
    return False, (f"triton: needs a CUDA device (or TRITON_INTERPRET=1 on CPU), "
                   f"got device {device}")


def can_implement(backend: str, device: torch.device | str, act_bits: int, K: int, N: int,
                  had_size: int = 0) -> tuple[bool, str]:
    """Whether ``backend`` can run this linear; ``(ok, reason)`` (reason empty when ok)."""
    device = torch.device(device)
    if act_bits not in _ACT_BITS:
        return False, f"{backend}: act_bits must be one of {list(_ACT_BITS)}, got {act_bits}"
    if K % fmt.PACK_FACTOR:
        return False, (f"{backend}: K must be a multiple of {fmt.PACK_FACTOR} "
                       f"({fmt.PACK_FACTOR} int4 codes per byte), got K={K}")
    if had_size and K % had_size:
        return False, f"{backend}: had_size {had_size} must divide K={K}"
    if had_size:
        try:
            decompose(had_size)
        except ValueError as e:
            return False, f"{backend}: {e}"
    if backend == "reference":
        return True, ""
    if backend == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            return ok, why
        if act_bits == 16:
            return w4a16_supported(K, N)
        ok, why = hadamard_quant_supported(K, had_size, act_bits)
        if not ok:
            return False, f"triton: {why}"
        return True, ""
    return False, f"unknown backend {backend!r}; known: {list(BACKENDS)}"


def select_backend(device: torch.device | str, act_bits: int, K: int, N: int, had_size: int = 0,
                   backends: tuple[str, ...] = BACKENDS) -> str:
    """First backend of ``backends`` that can implement the linear; raises with every reason.

    Runs once per layer (the vLLM plugin calls it when the weight is loaded);
    pass its answer to :func:`w4ax_linear` as ``backend``.
    """
    reasons = []
    for b in backends:
        ok, why = can_implement(b, device, act_bits, K, N, had_size)
        if ok:
            return b
        reasons.append(why)
    raise ValueError("no backend can run this W4 linear "
                     f"(act_bits={act_bits}, K={K}, N={N}, had_size={had_size}): " + "; ".join(reasons))


# ----------------------------------------------------------------------------
# the linear
# ----------------------------------------------------------------------------
def _check_linear(x: torch.Tensor, w: PackedW4, act_bits: int, had_size: int,
                  bias: torch.Tensor | None) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.shape[-1] != w.K:
        raise ValueError(f"x's last dimension must equal the weight's K={w.K}, got {x.shape[-1]}")
    if act_bits not in _ACT_BITS:
        raise ValueError(f"act_bits must be one of {list(_ACT_BITS)}, got {act_bits}")
    if had_size < 0 or (had_size and w.K % had_size):
        raise ValueError(f"had_size must be 0 or divide K={w.K}, got {had_size}")
    if bias is not None and tuple(bias.shape) != (w.N,):
        raise ValueError(f"bias must be ({w.N},), got {tuple(bias.shape)}")


def w4ax_linear_ref(x: torch.Tensor, w: PackedW4, act_bits: int, had_size: int = 0,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch W4A{act_bits} linear: ``x (..., K)`` -> ``(..., N)`` in x.dtype.

    The Hadamard is computed in float32 (``hadamard_transform_ref`` on x.float()),
    then ``format.quantize_act`` and ``format.w4a4_matmul_ref``. With
    ``act_bits == 16`` the (transformed) activations meet the dequantized weight
    in a float32 matmul.
    """
    _check_linear(x, w, act_bits, had_size, bias)
    lead = x.shape[:-1]
    xf = x.reshape(-1, w.K).float()
    if had_size:
        xf = hadamard_transform_ref(xf, had_size)
    qw = w.codes()
    if act_bits == 16:
        y = xf @ fmt.dequantize_weight(qw, w.scale).T
    else:
        qx, sx, zx = fmt.quantize_act(xf, act_bits)
        # format.w4a4_matmul_ref on CPU; the same arithmetic with a float64 product on CUDA
        y = w4a4_matmul_exact(qx, sx, zx, qw, w.scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, w.N)


def w4ax_linear(x: torch.Tensor, w: PackedW4, act_bits: int, had_size: int = 0,
                bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """W4A{act_bits} linear, equivalent to :func:`w4ax_linear_ref`.

    x: (..., K) bf16/fp16 (fp32 accepted); w: :class:`PackedW4`; act_bits 4, 8
    or 16 (16 = weight-only); had_size 0 (none) or the block Hadamard size over
    K; bias (N,) or None. Returns (..., N) in x.dtype.

    ``backend``: the answer of :func:`select_backend` for this layer, trusted
    as given (the per-call path checks only K); None checks the arguments and
    chooses from :data:`BACKENDS` on this call.
    """
    if backend is None:
        _check_linear(x, w, act_bits, had_size, bias)
        backend = select_backend(x.device, act_bits, w.K, w.N, had_size)
    elif x.shape[-1] != w.K:
        raise ValueError(f"x's last dimension must equal the weight's K={w.K}, got {x.shape[-1]}")
    if backend == "reference" or (act_bits == 16 and x.dtype == torch.float32):
        # (the W4A16 kernel takes 16-bit activations only)
        return w4ax_linear_ref(x, w, act_bits, had_size, bias)
    if backend != "triton":
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.K)
    if act_bits == 16:
        xin = hadamard_only(x2, had_size) if had_size else x2
        y = w4a16_gemm(xin, w, out_dtype=x.dtype, bias=bias)
    else:
        q, s, z = hadamard_quant(x2, had_size, act_bits)
        y = w4a4_gemm(q, s, z, w, out_dtype=x.dtype, bias=bias)
    return y.reshape(*lead, w.N)


# ----------------------------------------------------------------------------
# autotuner warm-up
# ----------------------------------------------------------------------------
# The GEMM autotuner (w4a4_gemm._tuned_kernel) keys on the M bucket
# (w4a4_gemm._m_bucket: next power of two, capped at 8192), N, K/2, the
# activation bits and the dtypes of its tensor arguments (output, bias). A key
# seen for the first time costs ~6-8 compilations and timing runs. vLLM's
# start-up only runs M = max_num_batched_tokens and its CUDA-graph sizes
# (<= 512), so without a warm-up the prefill buckets 1024-4096 are tuned inside
# the first requests (on the H100, `vllm bench throughput` took 25.7 s instead
# of 13.0 s). Triton also compiles one binary per specialisation of the integer
# argument M (M == 1, M % 16 == 0, other): the warm-up runs both alignments of
# every bucket so prefill chunks of any length find a compiled kernel.
WARMUP_MAX_M = 8192  # w4a4_gemm._m_bucket's cap: larger M share the 8192 bucket
_WARMED: set = set()


def warmup_buckets(max_m: int | None = None) -> list[int]:
    """The M buckets the GEMM autotuner keys on for M in ``1..max_m`` (default 8192), ascending.

    Equal to ``sorted({_m_bucket(m) for m in range(1, max_m + 1)})`` (powers of
    two up to ``_m_bucket(max_m)``), computed without the loop.
    """
    max_m = WARMUP_MAX_M if max_m is None else int(max_m)
    if max_m < 1:
        raise ValueError(f"max_m must be >= 1, got {max_m}")
    top = _m_bucket(max_m)
    out, b = [], 1
    while b <= top:
        out.append(b)
        b *= 2
    return out


def warmup_sizes(max_m: int | None = None, both_alignments: bool = True) -> list[int]:
    """Token counts the warm-up runs: per bucket of :func:`warmup_buckets`, its largest M <= max_m.

    With ``both_alignments`` also the largest M of the bucket with the other
    ``M % 16 == 0`` answer, where one exists (Triton compiles each separately).
    M above 8192 share the 8192 bucket, so sizes never exceed 8192.
    """
    max_m = WARMUP_MAX_M if max_m is None else int(max_m)
    sizes = []
    for b in warmup_buckets(max_m):
        lo, hi = b // 2 + 1, min(b, max_m)
        sizes.append(hi)
        if both_alignments:
            other = hi - 1 if hi % 16 == 0 else hi - hi % 16
            if other >= max(lo, 2):  # M == 1 is its own specialisation (bucket 1)
                sizes.append(other)
    return sizes


def _warmup_applies(device: torch.device) -> bool:
    """Only compiled kernels on a GPU are tuned: not on CPU, not under the interpreter."""
    return torch.device(device).type == "cuda" and not interpreting()


def warmup_key(w: PackedW4, act_bits: int, had_size: int = 0, dtype: torch.dtype = torch.bfloat16,
               bias: torch.Tensor | None = None) -> tuple:
    """What makes two linears' autotuner keys (and compiled kernels) differ."""
    return (w.N, w.K, act_bits, had_size, dtype, None if bias is None else bias.dtype, str(w.device))


def warmup(w: PackedW4, act_bits: int = 4, had_size: int = 0, dtype: torch.dtype = torch.bfloat16,
           bias: torch.Tensor | None = None, max_m: int | None = None,
           sizes: list[int] | None = None) -> bool:
    """Tune (and compile) the Triton path of ``w4ax_linear`` for this weight at every M bucket.

    Runs :func:`w4ax_linear` once at each of :func:`warmup_sizes` (``max_m``:
    the largest token count the caller will pass, e.g. vLLM's
    max_num_batched_tokens; default 8192) on random (M, K) activations of
    ``dtype``, with ``bias`` when the layer adds one (its dtype is part of the
    autotuner's key), so the autotuner caches its choice for every key before
    serving starts. One (max M, K) input buffer is allocated and freed
    (8192 x 14336 bf16: 235 MB; the largest output, e.g. 8192 x 28672 bf16,
    470 MB, lives for one call).

    Returns True when it ran; False (at once, launching nothing) on a CPU
    weight, under ``TRITON_INTERPRET=1``, when the Triton backend cannot run
    the layer, or when the same shape (:func:`warmup_key`) was warmed before
    in this process.
    """
    if not _warmup_applies(w.device):
        return False
    key = warmup_key(w, act_bits, had_size, dtype, bias)
    if key in _WARMED:
        return False
    ok, _ = can_implement("triton", w.device, act_bits, w.K, w.N, had_size)
    if not ok:
        _WARMED.add(key)
        return False
    sizes = warmup_sizes(max_m) if sizes is None else [int(m) for m in sizes]
    if sizes:
        x = torch.randn(max(sizes), w.K, dtype=dtype, device=w.device)
        with torch.no_grad():
            for m in sizes:
                w4ax_linear(x[:m], w, act_bits, had_size, bias, backend="triton")
        del x
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)
            torch.cuda.empty_cache()
    _WARMED.add(key)
    return True

