"""What every raw result file records about its run: command, date (UTC), device, versions.

Benchmark scripts import this as a sibling module (``python benchmarks/X.py`` puts
benchmarks/ first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import platform
import sys


def device_name(device: str | None = None) -> str:
    """The GPU's name for a CUDA device (default: CUDA when available), else ``cpu (ARCH)``."""
    try:
        import torch
    except ImportError:
        return "unknown (torch not importable)"
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    return torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "vllm"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing or broken package is recorded as such
            out[name] = None
    return out


def invocation(device: str | None = None) -> dict:
    """``{"command", "date", "device", "versions"}`` of this process."""
    return {"command": " ".join([sys.executable, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "device": device_name(device), "versions": versions()}


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then a rename): a run killed
    mid-write (a device call's time limit) leaves the previous file, never half of one."""
    import os

    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj, indent: int = 1, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_text`)."""
    import json

    write_text(path, json.dumps(obj, indent=indent, **dump_kwargs))


def resume_doc(resume: str | None, empty: dict, device: str | None = None) -> dict:
    """The raw document of an earlier invocation (``resume``, when it exists) or ``empty``,
    with this invocation appended to its ``invocations`` list."""
    import json
    import os

    doc = empty
    if resume and os.path.exists(resume):
        with open(resume) as f:
            doc = json.load(f)
    doc.setdefault("invocations", []).append(invocation(device))
    return doc
