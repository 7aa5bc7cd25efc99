#!/usr/bin/env bash
# Copy the files of carried folders into /tmp/stage (kept while the GPU machine stays warm).
# Usage: bash benchmarks/gpu/stage.sh DIR [DIR...]
set -euo pipefail
mkdir -p /tmp/stage
for d in "$@"; do cp -r "$d"/. /tmp/stage/; done
ls -la /tmp/stage
