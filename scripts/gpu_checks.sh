#!/usr/bin/env bash
# The checks that need a CUDA GPU, in the order of their worth, each bounded in time: the CUDA-marked tests,
# then benchmarks/gpu_train.py and benchmarks/gpu_inference.py. Logs go to $OUT (default ./gpu-out).
# Runs with the python3 that has torch (the package is taken from src/, nothing is installed).
#   scripts/gpu_checks.sh [tests] [train] [inference]   (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 KERAS_BACKEND=torch RESFORGE_CACHE=${RESFORGE_CACHE:-/tmp/resforge-cache}
parts=${*:-tests train inference}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision, onnxruntime, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" \
  | tee -a "$OUT/gpu.txt"
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests) timeout 210 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra --durations=15" \
             tests/training/test_cuda_training.py tests/deploy/test_cuda_inference.py tests/data/test_gpu_decode.py 2>&1 \
             | tee "$OUT/tests.log" | grep -v "Warning\|warnings.warn" ;;
    train) timeout 240 python3 benchmarks/gpu_train.py --images 12000 --steps 20 2>&1 | tee "$OUT/train.log" \
             | grep -v "^W1\|Warning" ;;
    inference) timeout 120 python3 benchmarks/gpu_inference.py 2>&1 | tee "$OUT/inference.log" \
             | grep -v "^W1\|Warning" ;;
  esac
  echo "== $part: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
done
