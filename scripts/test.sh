#!/usr/bin/env bash
# The test command: install what is missing, then run the whole suite.
# On a CPU machine the GPU tests (marker `gpu`) are skipped; on the H100 the same
# command runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# pytest through its console script: `python -m pytest` would put the repo root on
# sys.path, where the folder triton_kernels/ would shadow vLLM's module of that name.
exec pytest tests -q "$@"
