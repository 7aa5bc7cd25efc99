#!/usr/bin/env bash
# The main job on the embedded default, on a fresh CPU machine: install, quantize the
# bundled SmolLM2-135M (learned rotations, GPTQ, W4A4KV4) with short settings, serve it
# with the OpenAI-compatible server (CPU reference engine) and send one completion.
# Full paper settings on a GPU: spinquant quantize --device cuda --out ckpt (defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${OUT:-checkpoints/smollm2-w4a4kv4}
if [ ! -f "$OUT/config.json" ]; then
  spinquant quantize --out "$OUT" --rotation learned --weights gptq --bits W4A4KV4 \
    --steps 8 --calib-samples 8 --gptq-samples 8 --seqlen 256 --overwrite
fi
READY=$(mktemp -u)
spinquant serve "$OUT" --engine cpu --port 0 --ready-file "$READY" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -f "$READY"' EXIT
for _ in $(seq 1 300); do [ -s "$READY" ] && break; kill -0 $SERVER || exit 1; sleep 1; done
URL=$(cat "$READY")
python3 - "$URL" <<'PY'
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1].rstrip("/") + "/v1", api_key="none")
model = client.models.list().data[0].id
out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
print(f"model {model!r} answered: {out.choices[0].text!r}")
PY
