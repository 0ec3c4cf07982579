#!/usr/bin/env bash
# The GPU run of the cost benchmark: ResNet50 at 224 px under CUDA, fp32 and bf16 autocast, then
# the attention micro-benchmark. One call, about 5 minutes on an H100; tables go to $OUT_DIR.
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/benchmarks-gpu}}"
mkdir -p "$out"
python=${PYTHON:-python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
for amp in none bf16; do
  "$python" benchmarks/cost.py --device cuda --amp "$amp" --img-size 224 --batch-sizes 32 64 \
    --repeats 10 --warmup 3 | tee "$out/cost224-$amp.md"
done
"$python" benchmarks/attention.py --device cuda --batch 32 --repeats 15 | tee "$out/attention.md"
