#!/usr/bin/env bash
# Everything that needs a GPU, in one call (about 5 minutes on an H100 before the compiled steps
# of 4 and 5 were added; those are not timed yet. Each step has its own
# time limit, and a failing step does not stop the rest):
#   1. tests/test_cuda.py: float32 against the CPU, float16/bfloat16 autocast, the deferred
#      finite check, no host sync in a training step, channels-last, inductor, early exit;
#   2. benchmarks/cost.py: ResNet50 at 224 px, batch 32 and 64, float32 and bf16 autocast;
#   3. benchmarks/early_exit.py: each head option's exit cost on ResNet50 and ResNet-18 at 224 px;
#   4. benchmarks/attention.py: ACAM against SE and CBAM, eager and compiled, float32 and bf16;
#   5. benchmarks/cost.py --compile: the attention variants in ResNet50, compiled;
#   6. benchmarks/spatial_max.py: the kernels that could find ACAM's argmax, float32 and bf16;
#   7. benchmarks/cost.py --channels-last: the attention variants in ResNet50, bf16 autocast,
#      in the layout mixed-precision CNN training uses.
# Tables go to OUT_DIR, one file per step; the exit status is 1 if any step failed.
# The steps' time limits add up to about 32 minutes, more than one 10-minute device call: the
# optional second argument, a bash regular expression, runs only the steps whose names match
# (the names are printed as "== NAME"), so the work can be split across calls.
#   bash benchmarks/gpu.sh [OUT_DIR] [STEPS]
#   bash benchmarks/gpu.sh "$OUT" 'machine|cuda-tests|^attention|spatial-max'
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/benchmarks-gpu}}"
only="${2:-}"
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to OUT_DIR/NAME.md
  local name=$1 limit=$2
  shift 2
  if [ -n "$only" ] && ! [[ $name =~ $only ]]; then
    return
  fi
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.md"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    echo "== $name FAILED (exit status $rc)"
    failed+=("$name")
  fi
}

step machine 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv &&
  $python -c 'import torch, timm; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"timm\", timm.__version__)'"
step cuda-tests 150 "$python" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider
for amp in none bf16; do
  step "cost224-$amp" 120 "$python" benchmarks/cost.py --device cuda --amp "$amp" --img-size 224 \
    --batch-sizes 32 64 --repeats 10 --warmup 3
done
step early-exit-heads 100 "$python" benchmarks/early_exit.py --device cuda --skip-trained \
  --head-cost-models resnet50:224 resnet18:224 --repeats 10
for amp in none bf16; do
  step "attention-$amp" 90 "$python" benchmarks/attention.py --device cuda --amp "$amp" --batch 32 --repeats 15 --min-ms 20
  step "attention-$amp-compiled" 240 "$python" benchmarks/attention.py --device cuda --amp "$amp" --compile --batch 32 --repeats 15 --min-ms 20
  step "cost224-$amp-compiled" 240 "$python" benchmarks/cost.py --device cuda --amp "$amp" --compile --img-size 224 \
    --batch-sizes 64 --variants plain acam-blocks se-blocks cbam-blocks --repeats 10 --warmup 3 --skip-inference
done
for dtype in float32 bfloat16; do
  step "spatial-max-$dtype" 60 "$python" benchmarks/spatial_max.py --device cuda --dtype "$dtype"
done
step cost224-bf16-channels-last 120 "$python" benchmarks/cost.py --device cuda --amp bf16 --channels-last \
  --img-size 224 --batch-sizes 64 --variants plain acam-blocks se-blocks cbam-blocks --repeats 10 --warmup 3 \
  --skip-inference
if [ ${#failed[@]} != 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
