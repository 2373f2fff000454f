#!/usr/bin/env bash
# One prepared device check of the ImageNet rehearsal's model-running stages (fp32 and
# bf16 throughput, FLOPs, bf16-vs-fp32 and GPU-vs-CPU accuracy, FAISS KNN); see
# benchmarks/README.md, "GPU check", and benchmarks/gpu_check.py --help.
#
#   bash benchmarks/gpu_check.sh                      # CUDA, about 7 minutes (--budget-s 420)
#   bash benchmarks/gpu_check.sh --device cpu --quick # CPU smoke run, about 2 minutes on 2 cores
#
# Arguments are passed through to gpu_check.py; --device defaults to cuda.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
if [[ -x "$repo/.venv/bin/python" ]]; then
    py="$repo/.venv/bin/python"
else
    py="$(command -v python3)"
fi
device_given=0
for arg in "$@"; do
    case "$arg" in
        --device|--device=*) device_given=1 ;;
    esac
done
extra=()
if [[ $device_given -eq 0 ]]; then
    extra=(--device cuda)
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/gpu_check.py" "${extra[@]}" "$@"
