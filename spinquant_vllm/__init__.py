"""spinquant_vllm: the vLLM plugin that serves SpinQuant checkpoints.

vLLM finds :func:`register` through the entry point declared in
pyproject.toml (group ``vllm.general_plugins``, name ``spinquant``) and calls
it in every process it starts (the CLI front end, the engine core, each
worker). Registration is therefore idempotent and cheap: it imports vLLM's
quantization registry and :mod:`spinquant_vllm.config`, nothing else. The
linear method (and with it the Triton kernels) is imported when vLLM builds
the first quantized layer.

Usage: ``vllm serve CKPT`` or ``vllm serve CKPT --quantization spinquant``
(docs/PLUGIN.md).
"""

from __future__ import annotations

import importlib.util

from spinquant_kernels.format import QUANT_METHOD

# The KV4 attention backend (spinquant_vllm/attention.py), registered by class
# path so that registration does not import it (it imports the Triton kernels).
ATTENTION_BACKEND_CLASS = "spinquant_vllm.attention.SpinQuantKV4Backend"

_registered = False


def register() -> None:
    """Register the quantization method ``spinquant`` with vLLM (idempotent).

    After this call ``vllm.model_executor.layers.quantization.
    get_quantization_config("spinquant")`` returns
    :class:`spinquant_vllm.config.SpinQuantVllmConfig`, and, when
    :mod:`spinquant_vllm.attention` is installed, ``AttentionBackendEnum.CUSTOM``
    names its KV4 backend (by class path: the module is not imported here).
    """
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import SpinQuantVllmConfig

    register_quantization_config(QUANT_METHOD)(SpinQuantVllmConfig)
    if importlib.util.find_spec(ATTENTION_BACKEND_CLASS.rpartition(".")[0]) is not None:
        # for `--attention-backend CUSTOM --kv-cache-dtype int4_per_token_head`
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CUSTOM, ATTENTION_BACKEND_CLASS)
    _registered = True


__all__ = ["QUANT_METHOD", "register"]
