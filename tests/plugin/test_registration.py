"""The plugin is found through its entry point and registers idempotently and cheaply."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

GROUP = "vllm.general_plugins"


def test_entry_point_declared_and_resolves():
    eps = [ep for ep in entry_points(group=GROUP) if ep.name == "spinquant"]
    assert len(eps) == 1, f"expected one 'spinquant' entry point in {GROUP}, got {eps}"
    assert eps[0].value == "spinquant_vllm:register"
    import spinquant_vllm

    assert eps[0].load() is spinquant_vllm.register


def test_vllm_plugin_loader_registers_spinquant():
    """vLLM's own loader (vllm.plugins) finds the plugin and running it registers the method."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group(GROUP)
    assert "spinquant" in plugins
    plugins["spinquant"]()
    from spinquant_vllm.config import SpinQuantVllmConfig

    assert "spinquant" in QUANTIZATION_METHODS
    assert get_quantization_config("spinquant") is SpinQuantVllmConfig


def test_register_is_idempotent():
    import spinquant_vllm
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.platforms import current_platform

    for _ in range(3):
        spinquant_vllm.register()
    assert QUANTIZATION_METHODS.count("spinquant") == 1
    assert (current_platform.supported_quantization or ["spinquant"]).count("spinquant") == 1
    assert get_quantization_config("spinquant").get_name() == "spinquant"


_PROBE = r"""
import json, sys
import spinquant_vllm
after_import = sorted(m for m in sys.modules if m.startswith(("vllm", "triton", "spinquant_kernels.linear")))
spinquant_vllm.register()
spinquant_vllm.register()
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
print(json.dumps({
    "after_import": after_import,
    "after_register": sorted(m for m in sys.modules
                             if m.startswith(("spinquant_vllm.", "spinquant_kernels.", "triton"))),
    "count": QUANTIZATION_METHODS.count("spinquant"),
}))
"""


def test_import_and_register_are_cheap():
    """Importing the package pulls in neither vLLM nor Triton; register() adds only the config."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         timeout=300, cwd="/", check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["after_import"] == []
    assert probe["count"] == 1
    loaded = set(probe["after_register"])
    assert "spinquant_vllm.config" in loaded
    assert not loaded & {"spinquant_vllm.linear", "spinquant_vllm.ops", "spinquant_kernels.linear"}, loaded


def test_register_names_the_kv4_attention_backend():
    import spinquant_vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    spinquant_vllm.register()
    assert AttentionBackendEnum.CUSTOM.get_path() == spinquant_vllm.ATTENTION_BACKEND_CLASS
    from spinquant_vllm.attention import SpinQuantKV4Backend

    assert AttentionBackendEnum.CUSTOM.get_class() is SpinQuantKV4Backend
