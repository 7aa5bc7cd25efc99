import os
import sys

import pytest

# Triton kernels run on CPU machines through the interpreter; set before any
# test module imports triton.
try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # torch is a hard dependency; keep collection errors readable
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu marker: needs a CUDA GPU; runs on the H100 with the same command")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# Shared test helpers (spinquant_testutils) import by name under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(__file__))
