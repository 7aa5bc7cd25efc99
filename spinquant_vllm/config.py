"""The vLLM quantization config ``spinquant``: parses, checks and routes.

Settings come only from the checkpoint's ``config.json`` ``quantization_config``
(written by ``spinquant_offline.checkpoint``) and are parsed by
:meth:`spinquant_kernels.format.SpinQuantConfig.from_dict`, the single
source of truth for field names, defaults and allowed values. This module
adds what only the serving side knows: which vLLM layers are quantized,
which GPUs and activation dtypes are supported, how a mismatch between
``--quantization`` and the checkpoint is reported, and the serving-side
settings that are not in the checkpoint: the backend priority list (tests
pass one) and the operational :class:`spinquant_kernels.options.Options`
(read once, when vLLM builds the config).

Importing this module imports vLLM's quantization base classes only; the
linear method (and the Triton kernels behind it) is imported by
:meth:`SpinQuantVllmConfig.get_quant_method` when vLLM builds a layer.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from spinquant_kernels.format import QUANT_METHOD, QUANTIZED_PROJECTIONS, SpinQuantConfig
from spinquant_kernels.options import Options, options
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

# The fused layers of vLLM's Llama and the checkpoint names they are built from.
# Models set QuantizationConfig.packed_modules_mapping as they initialise; this
# is the fallback for a model that does not.
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}

# Triton's int8 tl.dot lowers to mma.sync with int8 operands, which Triton
# emits for sm_80 and newer; the W4A4 GEMM holds int4 values in int8, so
# Ampere is the floor. The target (and the only GPU tested) is H100, sm_90.
MIN_CAPABILITY = 80

_ATTENTION_MODULE = "spinquant_vllm.attention"


def module_matches(prefix: str, pattern: str) -> bool:
    """Whether ``pattern`` names the module ``prefix`` or one of its parents.

    Both are dotted module names; ``pattern`` matches when its components
    appear as a contiguous run in ``prefix``'s, so ``"lm_head"``,
    ``"down_proj"``, ``"layers.3"`` and ``"model.layers.3.mlp.down_proj"``
    all match ``"model.layers.3.mlp.down_proj"`` but ``"proj"`` does not.
    """
    parts, pat = prefix.split("."), pattern.split(".")
    n = len(pat)
    return any(parts[i:i + n] == pat for i in range(len(parts) - n + 1))


def _attention_module_available() -> bool:
    return importlib.util.find_spec(_ATTENTION_MODULE) is not None


class SpinQuantVllmConfig(QuantizationConfig):
    """vLLM's view of a :class:`spinquant_kernels.format.SpinQuantConfig`.

    Args:
        cfg: the parsed checkpoint config. vLLM calls the class with no
            argument when ``--quantization spinquant`` is given for a
            checkpoint whose config.json has no ``quantization_config``;
            that raises, naming the missing key.
        backends: the kernel backends each linear chooses from, in priority
            order (``spinquant_kernels.linear.can_implement`` names); None
            (what vLLM passes) is ``spinquant_kernels.linear.BACKENDS``.
            Tests pass ``("reference",)`` to run the plain-PyTorch path.
        opts: operational options; None (what vLLM passes) reads
            :func:`spinquant_kernels.options.options` once, here.
    """

    def __init__(self, cfg: SpinQuantConfig | None = None, backends: tuple[str, ...] | None = None,
                 opts: Options | None = None) -> None:
        super().__init__()
        if cfg is None:
            raise ValueError(
                "--quantization spinquant needs a checkpoint written by `spinquant quantize`: "
                "its config.json must hold quantization_config with quant_method "
                f"{QUANT_METHOD!r}, and this checkpoint has no quantization_config")
        if not isinstance(cfg, SpinQuantConfig):
            raise TypeError(f"SpinQuantVllmConfig expects a SpinQuantConfig, got {type(cfg).__name__}")
        if backends is not None and (isinstance(backends, str) or not backends
                                     or not all(isinstance(b, str) for b in backends)):
            raise ValueError(f"backends must be a non-empty sequence of backend names, got {backends!r}")
        self.cfg = cfg
        self.backends = None if backends is None else tuple(backends)
        self.options = options() if opts is None else opts
        self._check_supported(cfg)

    # ------------------------------------------------------------------
    # start-up checks
    # ------------------------------------------------------------------
    @staticmethod
    def _check_supported(cfg: SpinQuantConfig) -> None:
        """Refuse settings the serving path cannot run, naming field and value."""
        # A checkpoint holds the resolved online Hadamard block sizes (0: not
        # applied); None, "derive from the model", exists only at the offline
        # stage's input.
        for name in ("r4_size", "r3_size"):
            v = getattr(cfg, name)
            if type(v) is not int:
                raise ValueError(
                    f"quantization_config.{name}={v!r}: a checkpoint holds the online Hadamard "
                    "block size as an int (0 = not applied); write it with `spinquant quantize`")
        # The fused quantize kernel behind w4ax_linear quantizes with plain
        # min-max; a checkpoint calibrated with a clip ratio would be served
        # with different activation codes than it was evaluated with.
        if float(cfg.act_clip) != 1.0:
            raise ValueError(
                f"quantization_config.act_clip={cfg.act_clip!r} is not supported by the vLLM "
                "plugin (spinquant_kernels.linear.w4ax_linear quantizes activations with "
                "plain min-max, act_clip=1.0)")
        if cfg.quantize_kv and not _attention_module_available():
            raise ValueError(
                f"quantization_config.kv_bits={cfg.kv_bits} ({cfg.preset}) needs the SpinQuant "
                f"KV4 attention backend ({_ATTENTION_MODULE}), which this installation does "
                "not have; serve a W4A4KV16 / W4A16KV16 checkpoint, or re-quantize with kv_bits=16")

    # ------------------------------------------------------------------
    # QuantizationConfig interface
    # ------------------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return MIN_CAPABILITY

    @staticmethod
    def get_config_filenames() -> list[str]:
        # The settings live in config.json (quantization_config), which vLLM
        # reads itself; there is no side file. An empty list makes vLLM call
        # the class with no argument when config.json lacks the key, and
        # __init__ turns that into a message naming it.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SpinQuantVllmConfig":
        """Parse the checkpoint's ``quantization_config`` dict."""
        try:
            cfg = SpinQuantConfig.from_dict(dict(config))
        except (ValueError, TypeError) as e:
            raise ValueError(f"spinquant: the checkpoint's quantization_config is not valid: {e}") from e
        return cls(cfg)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """Claim SpinQuant checkpoints; report a ``--quantization spinquant`` mismatch.

        vLLM asks every registered method (custom ones first) whether it
        takes over a checkpoint. This returns ``"spinquant"`` for a
        checkpoint whose ``quant_method`` is ``"spinquant"`` when the user
        asked for nothing or for spinquant, ``None`` otherwise (so another
        ``--quantization`` on a SpinQuant checkpoint reaches vLLM's own
        mismatch error), and raises when the user asked for spinquant on a
        checkpoint of another method.
        """
        method = hf_quant_cfg.get("quant_method") if isinstance(hf_quant_cfg, dict) else None
        if method == QUANT_METHOD:
            return QUANT_METHOD if user_quant in (None, QUANT_METHOD) else None
        if user_quant == QUANT_METHOD:
            raise ValueError(
                f"--quantization {QUANT_METHOD} needs a checkpoint written by `spinquant quantize` "
                f"(config.json quantization_config.quant_method == {QUANT_METHOD!r}); this "
                f"checkpoint has quant_method={method!r}")
        return None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Check the model's sizes against the config before any weight is allocated."""
        if hf_config is None:
            return
        text = getattr(hf_config, "text_config", None) or hf_config
        inter = getattr(text, "intermediate_size", None)
        r4 = self.cfg.r4_size
        if r4 and isinstance(inter, int) and inter % r4:
            raise ValueError(
                f"quantization_config.r4_size={r4} must divide the model's intermediate_size "
                f"({inter}): the online Hadamard on the down_proj input is block-diagonal")
        if isinstance(inter, int):
            # tensor_parallel_sizes is derived from r4_size and intermediate_size; a
            # recorded set that disagrees names the wrong degrees in start-up errors
            self.cfg.check_intermediate_size(inter)
        head_dim = getattr(text, "head_dim", None)
        if head_dim is None and getattr(text, "num_attention_heads", None):
            head_dim = getattr(text, "hidden_size", 0) // text.num_attention_heads
        r3 = self.cfg.r3_size
        if r3 and self.cfg.quantize_kv and isinstance(head_dim, int) and head_dim % r3:
            raise ValueError(f"quantization_config.r3_size={r3} must divide head_dim ({head_dim})")

    # ------------------------------------------------------------------
    # routing
    # ------------------------------------------------------------------
    def is_layer_skipped(self, prefix: str) -> bool:
        """Whether ``cfg.modules_not_quantized`` names this layer (or, when fused, its parts).

        A fused layer (qkv_proj, gate_up_proj) is skipped when every part is;
        some but not all is an error, since one fused weight has one format.
        """
        patterns = self.cfg.modules_not_quantized
        if any(module_matches(prefix, p) for p in patterns):
            return True
        head, _, name = prefix.rpartition(".")
        mapping = self.packed_modules_mapping or DEFAULT_PACKED_MODULES
        parts = mapping.get(name)
        if not parts:
            return False
        part_prefixes = [f"{head}.{p}" if head else p for p in parts]
        skipped = [any(module_matches(pp, p) for p in patterns) for pp in part_prefixes]
        if any(skipped) and not all(skipped):
            raise ValueError(
                f"quantization_config.modules_not_quantized={list(patterns)} names some but not all "
                f"parts {parts} of the fused layer {prefix}; its parts must share one format")
        return all(skipped)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """Route a vLLM layer to its method.

        LinearBase layers named as a quantized projection get
        :class:`spinquant_vllm.linear.SpinQuantLinearMethod`; those listed in
        ``modules_not_quantized`` or not a known projection stay 16-bit
        (``UnquantizedLinearMethod``). Embeddings and lm_head are not
        LinearBase and get ``None`` (16-bit). Attention layers get the KV4
        method of :mod:`spinquant_vllm.attention` when ``kv_bits < 16``.
        """
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if isinstance(layer, LinearBase):
            name = prefix.rpartition(".")[2]
            if name not in QUANTIZED_PROJECTIONS or self.is_layer_skipped(prefix):
                return UnquantizedLinearMethod()
            from .linear import SpinQuantLinearMethod

            return SpinQuantLinearMethod(self, prefix)

        from vllm.model_executor.layers.attention import Attention

        if isinstance(layer, Attention) and self.cfg.quantize_kv:
            if not _attention_module_available():
                # from_config already refused this; kept for configs built by hand
                raise ValueError(
                    f"kv_bits={self.cfg.kv_bits} needs {_ATTENTION_MODULE}, which is not installed")
            hook = getattr(importlib.import_module(_ATTENTION_MODULE), "get_attention_quant_method", None)
            if hook is None:
                raise ValueError(f"kv_bits={self.cfg.kv_bits} needs {_ATTENTION_MODULE}."
                                 "get_attention_quant_method, which that module does not define")
            # The hook moves the layer onto the KV4 backend and returns the
            # layer's KV quant method (None: the backend itself quantizes).
            return hook(layer, prefix, self.cfg)
        return None

    def __repr__(self) -> str:
        # (not the options: they hold the server's API key)
        return f"SpinQuantVllmConfig({self.cfg!r}, backends={self.backends!r})"
