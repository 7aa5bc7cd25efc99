"""The SpinQuant-vLLM quantization format: the single source of truth.

Everything that quantizes, packs, stores or reads 4-bit data (the offline
pipeline, the Triton kernels, the vLLM plugin, the KV cache) takes its
conventions from this module. It imports only torch.

Conventions
-----------
* Integer codes are *centred*: a ``b``-bit code ``q`` lies in
  ``[qmin(b), qmax(b)] = [-2**(b-1), 2**(b-1) - 1]`` (int4: [-8, 7]).
  Asymmetric quantizers use the same code range with a zero point ``z``
  (float, in code units):  ``x ~= scale * (q - z)``.  Symmetric ones have
  ``z = 0``.  Centred codes keep partial sums of integer GEMMs small, which
  matters for fp8 tensor-core accumulation (see DESIGN.md).
* Weights: per output channel, symmetric, ``W (N, K) ~= scale[:, None] * q``.
* Activations: per token (row), asymmetric min-max, dynamic.
* KV cache: per (token, kv head), asymmetric min-max.
* Packing (``pack_int4``): two codes per uint8 along the last (reduction)
  dimension; element ``2j`` in the low nibble, ``2j + 1`` in the high nibble,
  each as a 4-bit two's complement pattern.  ``(..., K) int8 -> (..., K/2) uint8``.
* Scales are float32 on disk and in the reference path.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

import torch

FORMAT_VERSION = 1
QUANT_METHOD = "spinquant"
SCALE_DTYPE = torch.float32
PACKED_DTYPE = torch.uint8
CODE_DTYPE = torch.int8
# Smallest scale: keeps all-zero rows (padding tokens, dead channels) finite.
MIN_SCALE = 1e-8

# ----------------------------------------------------------------------------
# what a checkpoint quantizes, and the tensor names it stores
# ----------------------------------------------------------------------------
WEIGHT_BITS = 4
# int4 codes per packed byte
PACK_FACTOR = 8 // WEIGHT_BITS
# The projections whose weights are 4-bit (vLLM names, unfused and fused: Llama/Qwen2/Mistral
# families). Every other linear (lm_head) stays 16-bit.
QUANTIZED_PROJECTIONS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",
})
# The projections whose input gets the online Hadamard R4 (block size ``r4_size``).
R4_PROJECTIONS = frozenset({"down_proj"})
# Tensor names of a quantized linear ``<module>``: ``<module>.qweight`` (N, K/2) uint8
# (``pack_int4`` of the codes) and ``<module>.weight_scale`` (N,) float32.
QWEIGHT_SUFFIX = "qweight"
SCALE_SUFFIX = "weight_scale"


# ----------------------------------------------------------------------------
# bit widths
# ----------------------------------------------------------------------------
def qmin(bits: int) -> int:
    """Smallest centred code of a ``bits``-bit integer (int4: -8)."""
    _check_bits(bits)
    return -(1 << (bits - 1))


def qmax(bits: int) -> int:
    """Largest centred code of a ``bits``-bit integer (int4: 7)."""
    _check_bits(bits)
    return (1 << (bits - 1)) - 1


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bit width must be an int in [2, 8], got {bits!r}")


# ----------------------------------------------------------------------------
# the config type
# ----------------------------------------------------------------------------
class Rotation(str, enum.Enum):
    LEARNED = "learned"
    HADAMARD = "hadamard"
    NONE = "none"


class WeightMethod(str, enum.Enum):
    GPTQ = "gptq"
    RTN = "rtn"


class Preset(str, enum.Enum):
    W4A4KV4 = "W4A4KV4"
    W4A4KV16 = "W4A4KV16"
    W4A16KV16 = "W4A16KV16"
    W4A8KV4 = "W4A8KV4"

    @property
    def bits(self) -> tuple[int, int, int]:
        """(weight_bits, act_bits, kv_bits)."""
        w, rest = self.value[1:].split("A")
        a, kv = rest.split("KV")
        return int(w), int(a), int(kv)


_SUPPORTED_WEIGHT_BITS = (4,)
_SUPPORTED_ACT_BITS = (4, 8, 16)
_SUPPORTED_KV_BITS = (4, 16)


@dataclasses.dataclass(frozen=True)
class SpinQuantConfig:
    """How a checkpoint is quantized; written as ``quantization_config``.

    The offline stage writes it into config.json, the vLLM plugin reads only
    it. CLI flags are generated from the fields so each default exists once.

    The online Hadamard sizes ``r4_size`` and ``r3_size`` are block sizes: 0 is
    "not applied", ``None`` is "derive from the model". ``None`` exists only on
    the offline stage's input: ``spinquant_offline.pipeline.resolve_config``
    replaces it by the model's size, and :meth:`to_dict` / :meth:`from_dict`
    (the checkpoint's form) refuse it. What needs no model is derived here:
    rotation ``none`` has neither R4 nor R3 (both 0), a 16-bit KV cache has no
    R3 (0). ``tensor_parallel_sizes`` follows ``r4_size``: the tensor-parallel
    degrees whose intermediate shard holds whole R4 blocks (asked for at the
    offline input, every one that fits in a checkpoint; see
    :meth:`r4_tensor_parallel_sizes`).
    """

    weight_bits: int = 4
    act_bits: int = 4
    kv_bits: int = 4
    rotation: Rotation = Rotation.LEARNED
    weight_method: WeightMethod = WeightMethod.GPTQ
    # Online Hadamard R4 on the input of R4_PROJECTIONS: its block size, a Hadamard
    # order dividing the intermediate size (the whole of it, or smaller blocks that
    # tensor-parallel shards can hold). > 0 with a rotation, 0 with rotation "none".
    r4_size: int | None = None
    # Online Hadamard R3 on Q and K after RoPE: its block size (head_dim, or a
    # divisor). > 0 with a rotation and a quantized KV cache; 0 = not applied.
    r3_size: int | None = None
    # Tensor-parallel degrees t whose shard of the intermediate dimension
    # (intermediate / t consecutive columns of down_proj's input) holds whole R4
    # blocks, sorted. At the offline stage's input: the degrees asked for (None:
    # none asked), which ``spinquant_offline.pipeline.resolve_config`` fits R4 to
    # and replaces by every degree that fits (the divisors of intermediate /
    # r4_size; of intermediate without R4). A checkpoint records that set;
    # checkpoints written before the field existed omit it (None: derive it).
    tensor_parallel_sizes: tuple[int, ...] | None = None
    # Activation clipping ratio (1.0 = plain min-max) and KV clipping ratio.
    act_clip: float = 1.0
    kv_clip: float = 1.0
    weight_granularity: str = "per_channel"
    act_granularity: str = "per_token"
    kv_granularity: str = "per_token_head"
    weight_symmetric: bool = True
    act_symmetric: bool = False
    kv_symmetric: bool = False
    pack_order: str = "low_nibble_first"
    modules_not_quantized: tuple[str, ...] = ("embed_tokens", "lm_head")
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, enum_cls in (("rotation", Rotation), ("weight_method", WeightMethod)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_cls(value))
            except ValueError:
                raise ValueError(f"SpinQuantConfig.{name} must be one of "
                                 f"{[e.value for e in enum_cls]}, got {value!r}") from None
        if isinstance(self.modules_not_quantized, str):
            raise ValueError("SpinQuantConfig.modules_not_quantized must be a list of names, "
                             f"got the string {self.modules_not_quantized!r}")
        object.__setattr__(self, "modules_not_quantized", tuple(self.modules_not_quantized))
        self._check_tensor_parallel_sizes()
        for name in ("weight_bits", "act_bits", "kv_bits", "version"):
            v = getattr(self, name)
            if type(v) is not int:
                raise ValueError(f"SpinQuantConfig.{name} must be an int, got {v!r}")
        for name in ("act_clip", "kv_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"SpinQuantConfig.{name} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
        checks = [
            ("weight_bits", self.weight_bits, _SUPPORTED_WEIGHT_BITS),
            ("act_bits", self.act_bits, _SUPPORTED_ACT_BITS),
            ("kv_bits", self.kv_bits, _SUPPORTED_KV_BITS),
            ("version", self.version, (FORMAT_VERSION,)),
            ("weight_granularity", self.weight_granularity, ("per_channel",)),
            ("act_granularity", self.act_granularity, ("per_token",)),
            ("kv_granularity", self.kv_granularity, ("per_token_head",)),
            ("weight_symmetric", self.weight_symmetric, (True,)),
            ("act_symmetric", self.act_symmetric, (False,)),
            ("kv_symmetric", self.kv_symmetric, (False,)),
            ("pack_order", self.pack_order, ("low_nibble_first",)),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(
                    f"SpinQuantConfig.{name} must be one of {list(allowed)}, got {value!r}")
        for name in ("act_clip", "kv_clip"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"SpinQuantConfig.{name} must be in (0, 1], got {v!r}")
        self._check_hadamard_sizes()

    def _check_hadamard_sizes(self) -> None:
        for name in ("r3_size", "r4_size"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 0):
                raise ValueError(f"SpinQuantConfig.{name} must be an int >= 0 or None "
                                 f"(derive from the model), got {v!r}")
        rotated = self.rotation != Rotation.NONE
        if not rotated:
            for name in ("r4_size", "r3_size"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, 0)
                elif getattr(self, name):
                    raise ValueError(f"SpinQuantConfig.{name} must be 0 with rotation 'none' "
                                     f"(no online Hadamard), got {getattr(self, name)!r}")
        if not self.quantize_kv and self.r3_size is None:
            object.__setattr__(self, "r3_size", 0)
        if rotated and self.r4_size == 0:
            raise ValueError(f"SpinQuantConfig.r4_size must be > 0 with rotation "
                             f"{self.rotation.value!r} (the R4 block size; None derives it "
                             f"from the model), got 0")
        if rotated and self.quantize_kv and self.r3_size == 0:
            raise ValueError(f"SpinQuantConfig.r3_size must be > 0 with rotation "
                             f"{self.rotation.value!r} and kv_bits={self.kv_bits} (the R3 block "
                             f"size; None derives it from the model), got 0")

    def _check_tensor_parallel_sizes(self) -> None:
        v = self.tensor_parallel_sizes
        if v is None:
            return
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            raise ValueError("SpinQuantConfig.tensor_parallel_sizes must be a list of ints >= 1 "
                             f"or None, got {v!r}")
        sizes = tuple(v)
        bad = [t for t in sizes if type(t) is not int or t < 1]
        if bad or not sizes:
            raise ValueError("SpinQuantConfig.tensor_parallel_sizes must be a non-empty list of "
                             f"ints >= 1 or None, got {list(sizes)!r}")
        object.__setattr__(self, "tensor_parallel_sizes", tuple(sorted(set(sizes))))

    def r4_tensor_parallel_sizes(self, intermediate_size: int) -> tuple[int, ...]:
        """The tensor-parallel degrees whose intermediate shard holds whole R4 blocks.

        ``t`` fits when it divides ``intermediate_size`` and ``r4_size`` divides
        ``intermediate_size / t``: the divisors of ``intermediate_size / r4_size``
        (of ``intermediate_size`` when ``r4_size`` is 0). Needs a resolved ``r4_size``
        that divides ``intermediate_size``.
        """
        if self.r4_size is None:
            raise ValueError("r4_tensor_parallel_sizes needs a resolved r4_size, got None")
        if type(intermediate_size) is not int or intermediate_size < 1:
            raise ValueError(f"intermediate_size must be an int >= 1, got {intermediate_size!r}")
        if self.r4_size and intermediate_size % self.r4_size:
            raise ValueError(f"r4_size {self.r4_size} must divide intermediate_size {intermediate_size}")
        n = intermediate_size // self.r4_size if self.r4_size else intermediate_size
        return tuple(t for t in range(1, n + 1) if n % t == 0)

    def check_intermediate_size(self, intermediate_size: int) -> None:
        """Raise ``ValueError`` unless this checkpoint config fits a model of ``intermediate_size``.

        ``r4_size`` must divide it, and a recorded ``tensor_parallel_sizes`` must be
        :meth:`r4_tensor_parallel_sizes` (the field is derived; a mismatch means the
        config was edited or belongs to another model).
        """
        derived = self.r4_tensor_parallel_sizes(intermediate_size)
        if self.tensor_parallel_sizes is not None and self.tensor_parallel_sizes != derived:
            raise ValueError(
                f"quantization_config.tensor_parallel_sizes={list(self.tensor_parallel_sizes)} does "
                f"not match r4_size={self.r4_size} and intermediate_size {intermediate_size}: the "
                f"degrees whose shard ({intermediate_size} / t columns) holds whole R4 blocks are "
                f"{list(derived)}")

    @property
    def resolved(self) -> bool:
        """Whether the config is in checkpoint form: both online Hadamard sizes known (no
        ``None`` left) and ``tensor_parallel_sizes`` absent or a recorded set (every divisor
        of its largest degree, as :meth:`r4_tensor_parallel_sizes` gives), not a request."""
        return (self.r4_size is not None and self.r3_size is not None
                and self._tp_sizes_recorded())

    def _tp_sizes_recorded(self) -> bool:
        v = self.tensor_parallel_sizes
        return v is None or v == tuple(t for t in range(1, v[-1] + 1) if v[-1] % t == 0)

    def require_resolved(self, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` and the unresolved field unless :attr:`resolved`."""
        for name in ("r4_size", "r3_size"):
            if getattr(self, name) is None:
                raise ValueError(
                    f"{where} needs SpinQuantConfig.{name} as an int (the resolved block size, "
                    f"0 = not applied), got None (\"derive from the model\"): resolve it with "
                    f"spinquant_offline.pipeline.resolve_config(model, cfg)")
        if not self._tp_sizes_recorded():
            raise ValueError(
                f"{where} needs SpinQuantConfig.tensor_parallel_sizes as recorded (every divisor "
                f"of the largest degree: the degrees the R4 blocks fit), got the request "
                f"{list(self.tensor_parallel_sizes)}: resolve it with "
                f"spinquant_offline.pipeline.resolve_config(model, cfg)")

    # -- presets --------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str | Preset, **kw: Any) -> "SpinQuantConfig":
        w, a, kv = Preset(preset).bits
        return cls(weight_bits=w, act_bits=a, kv_bits=kv, **kw)

    @property
    def preset(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}KV{self.kv_bits}"

    @property
    def quantize_acts(self) -> bool:
        return self.act_bits < 16

    @property
    def quantize_kv(self) -> bool:
        return self.kv_bits < 16

    # -- (de)serialisation: the checkpoint's form, resolved sizes only -------
    def to_dict(self) -> dict[str, Any]:
        self.require_resolved("quantization_config")
        d: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, tuple):
                v = list(v)
            if f.name == "tensor_parallel_sizes" and v is None:
                continue  # not recorded: the form of checkpoints from before the field
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpinQuantConfig":
        if not isinstance(d, dict):
            raise ValueError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(
                f"quantization_config.quant_method must be {QUANT_METHOD!r}, got {method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"quant_method"})
        if unknown:
            raise ValueError(f"quantization_config has unknown keys {unknown}; "
                             f"format version {FORMAT_VERSION} knows {sorted(names)}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.require_resolved("quantization_config")
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------
# reference quantizers (plain PyTorch)
# ----------------------------------------------------------------------------
def asym_params(x: torch.Tensor, bits: int, clip: float = 1.0, dim: int = -1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max asymmetric parameters over ``dim`` (kept as size 1).

    Returns ``(scale, zero)`` in float32 with ``x ~= scale * (q - zero)`` and
    ``q`` in ``[qmin, qmax]``. The range always includes 0 so that exact zeros
    stay exact up to rounding of the zero point. ``zero`` is an integer-valued
    float in ``[qmin, qmax]``.
    """
    xf = x.float()
    lo = torch.clamp(xf.amin(dim=dim, keepdim=True), max=0.0) * clip
    hi = torch.clamp(xf.amax(dim=dim, keepdim=True), min=0.0) * clip
    levels = (1 << bits) - 1
    scale = torch.clamp((hi - lo) / levels, min=MIN_SCALE)
    # code qmin corresponds to value lo:  lo = scale * (qmin - zero)
    zero = torch.clamp(torch.round(qmin(bits) - lo / scale), qmin(bits), qmax(bits))
    return scale, zero


def quantize_asym(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                  ) -> torch.Tensor:
    """Codes ``q = clamp(round(x / scale) + zero, qmin, qmax)`` as int8."""
    q = torch.round(x.float() / scale) + zero
    return torch.clamp(q, qmin(bits), qmax(bits)).to(CODE_DTYPE)


def dequantize_asym(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` in float32."""
    return scale * (q.float() - zero)


def sym_scale(x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0, dim: int = -1
              ) -> torch.Tensor:
    """Symmetric scale ``clip * absmax / qmax`` over ``dim`` (kept), float32."""
    amax = x.float().abs().amax(dim=dim, keepdim=True) * clip
    return torch.clamp(amax / qmax(bits), min=MIN_SCALE)


def quantize_sym(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``q = clamp(round(x / scale), qmin, qmax)`` as int8."""
    return torch.clamp(torch.round(x.float() / scale), qmin(bits), qmax(bits)).to(CODE_DTYPE)


def dequantize_sym(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return scale * q.float()


def fake_quant_asym(x: torch.Tensor, bits: int, clip: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Quantize-dequantize ``x`` (asymmetric min-max over ``dim``) in x's dtype."""
    scale, zero = asym_params(x, bits, clip, dim)
    return dequantize_asym(quantize_asym(x, scale, zero, bits), scale, zero).to(x.dtype)


# ----------------------------------------------------------------------------
# weights: per output channel, symmetric, MSE clip search
# ----------------------------------------------------------------------------
def weight_scale_mse(w: torch.Tensor, bits: int, grid: int = 100, max_shrink: float = 0.8,
                     norm: float = 2.4) -> torch.Tensor:
    """Per-row symmetric scale (N, 1) float32 chosen by a linear clip search.

    For each output channel, tries clip ratios ``1, 1 - 1/grid, ...`` down to
    ``1 - max_shrink`` and keeps the one with the smallest ``|w - wq|^norm``
    error (the GPTQ / SpinQuant reference setting: grid 100, shrink 0.8, p 2.4).
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    wf = w.float()
    N, K = wf.shape
    amax = wf.abs().amax(dim=1, keepdim=True)  # (N, 1)
    clips = 1.0 - torch.arange(int(max_shrink * grid) + 1, dtype=torch.float64) / grid
    # Several clip ratios per pass (a (c, N, K) block of at most ~16M elements):
    # the per-ratio loop cost ~800 small kernel launches per weight, which
    # dominated rotation learning where this runs at every step.
    chunk = max(1, (1 << 24) // max(1, N * K))
    best_err = torch.full((N, 1), float("inf"), device=w.device)
    best = torch.clamp(amax / qmax(bits), min=MIN_SCALE)
    for c0 in range(0, len(clips), chunk):
        c = clips[c0:c0 + chunk].to(device=w.device, dtype=torch.float32)[:, None, None]  # (c, 1, 1)
        sc = torch.clamp(amax[None] * c / qmax(bits), min=MIN_SCALE)  # (c, N, 1)
        q = torch.clamp(torch.round(wf[None] / sc), qmin(bits), qmax(bits))
        err = (q * sc - wf[None]).abs().pow(norm).sum(-1, keepdim=True)  # (c, N, 1)
        e_min, idx = err.min(dim=0)  # first minimum: the largest clip among ties
        better = e_min < best_err
        best_err = torch.where(better, e_min, best_err)
        best = torch.where(better, sc.gather(0, idx[None]).squeeze(0), best)
    return best


def quantize_weight(w: torch.Tensor, bits: int = 4, mse: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN: ``(q (N, K) int8, scale (N,) float32)`` with ``w ~= scale[:, None] * q``."""
    s = weight_scale_mse(w, bits) if mse else sym_scale(w, bits)
    return quantize_sym(w, s, bits), s.squeeze(1).to(SCALE_DTYPE)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(N, K) int8, (N,) float32 -> (N, K) float32``."""
    return q.float() * scale.float()[:, None]


# ----------------------------------------------------------------------------
# int4 packing
# ----------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes along the last dim: ``(..., K) int8 -> (..., K/2) uint8``.

    Element ``2j`` goes to the low nibble, ``2j + 1`` to the high nibble, each
    as a 4-bit two's complement pattern. The input is not modified.
    """
    if q.dtype != CODE_DTYPE:
        raise ValueError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < qmin(4) or int(q.max()) > qmax(4)):
        raise ValueError(f"int4 codes must lie in [{qmin(4)}, {qmax(4)}], "
                         f"got range [{int(q.min())}, {int(q.max())}]")
    u = q.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(PACKED_DTYPE)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(..., K/2) uint8 -> (..., K) int8``."""
    if p.dtype != PACKED_DTYPE:
        raise ValueError(f"unpack_int4 expects uint8, got {p.dtype}")
    u = p.to(torch.int16)
    lo = u & 0xF
    hi = (u >> 4) & 0xF
    q = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(q >= 8, q - 16, q).to(CODE_DTYPE)


# ----------------------------------------------------------------------------
# KV cache scale word: the float32 scale with the zero point in its mantissa
# ----------------------------------------------------------------------------
KV_BITS = 4
# Bytes of the scale word stored after the codes of each (token, kv head) vector.
KV_SCALE_BYTES = 4
# The low mantissa bits of the float32 scale that carry the zero point (one code's worth).
KV_ZERO_MASK = (1 << KV_BITS) - 1


def kv_truncate_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 scale with its :data:`KV_BITS` low mantissa bits cleared (positive scales shrink)."""
    bits = scale.to(torch.float32).contiguous().view(torch.int32)
    return (bits & ~KV_ZERO_MASK).view(torch.float32)


def kv_pack_scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(scale f32, integer zero f32 in [qmin, qmax] of KV_BITS) -> int32 word`` (same shape).

    The scale is truncated (:func:`kv_truncate_scale`); the zero's two's complement
    pattern fills the cleared bits.
    """
    bits = kv_truncate_scale(scale).view(torch.int32)
    return bits | (zero.to(torch.int32) & KV_ZERO_MASK)


def kv_unpack_scale_zero(word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`kv_pack_scale_zero`: ``int32 -> (scale f32, zero f32)``."""
    w = word.to(torch.int32)
    scale = (w & ~KV_ZERO_MASK).contiguous().view(torch.float32)
    zn = w & KV_ZERO_MASK
    zero = torch.where(zn > qmax(KV_BITS), zn - (1 << KV_BITS), zn).to(torch.float32)
    return scale, zero


# ----------------------------------------------------------------------------
# activations: per token, asymmetric
# ----------------------------------------------------------------------------
def quantize_act(x: torch.Tensor, bits: int = 4, clip: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric quantization of ``x (M, K)``.

    Returns ``(q (M, K) int8, scale (M, 1) float32, zero (M, 1) float32)``
    with ``x ~= scale * (q - zero)``.
    """
    scale, zero = asym_params(x, bits, clip, dim=-1)
    return quantize_asym(x, scale, zero, bits), scale, zero


# ----------------------------------------------------------------------------
# KV cache: per (token, kv head), asymmetric
# ----------------------------------------------------------------------------
def quantize_kv(x: torch.Tensor, bits: int = 4, clip: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (..., head_dim)`` -> codes int8 (same shape), scale and zero (..., 1) float32."""
    scale, zero = asym_params(x, bits, clip, dim=-1)
    return quantize_asym(x, scale, zero, bits), scale, zero


# ----------------------------------------------------------------------------
# the integer GEMM identity the kernels implement
# ----------------------------------------------------------------------------
def w4a4_matmul_ref(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor,
                    qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """Reference of the W4A4 linear on codes, float32 result ``(M, N)``.

    ``y = sx * sw * (qx @ qw.T - zx * colsum(qw))`` with ``qx (M, K)``,
    ``qw (N, K)`` int8 codes, ``sx, zx (M, 1)``, ``sw (N,)``. The integer
    product is exact in int64.
    """
    acc = qx.to(torch.int64) @ qw.to(torch.int64).T
    colsum = qw.to(torch.int64).sum(dim=1)
    return sx * sw.float()[None, :] * (acc.float() - zx * colsum.float()[None, :])
