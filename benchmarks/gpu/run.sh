#!/usr/bin/env bash
# One device call: stage the trips it carries, then (after --) run one command with the
# machine set up. The benchmarks need none of this on an H100 that has vLLM and the data
# packages installed; it only gets them onto the lent machine (no network, 64 MiB a call).
#
#   bash benchmarks/gpu/run.sh TRIP... [-- COMMAND...]
#
# Here first: bash ../shared/gpu/build-vllm-bundle.sh .gpu-bundle
#             python benchmarks/gpu/stage.py pack --group vllm     (.gpu-carry/vllm-1, vllm-2)
#             python benchmarks/gpu/stage.py pack --group data     (.gpu-carry/data-*: accuracy runs only)
#             python benchmarks/models.py --out .gpu-carry/models --only llama3-8b
# Then one call per trip, chained within the ~30 s the machine stays warm (/tmp survives), e.g.
#   carry [.gpu-carry/vllm-1]:                     bash benchmarks/gpu/run.sh .gpu-carry/vllm-1
#   carry [.gpu-carry/vllm-2, .gpu-carry/models]:  bash benchmarks/gpu/run.sh .gpu-carry/vllm-2 -- \
#       python3 benchmarks/serving_bench.py --models /tmp/models/llama3-8b --suite throughput --out $OUT
#   carry []:                                      bash benchmarks/gpu/run.sh -- pytest tests -m gpu -q
set -uo pipefail
cd "$(dirname "$0")/../.."
trips=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do trips+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
if [ ${#trips[@]} -gt 0 ]; then python3 benchmarks/gpu/stage.py unpack "${trips[@]}" || exit 1; fi
[ $# -gt 0 ] || exit 0
source benchmarks/gpu/setup.sh || exit 1
"$@"
