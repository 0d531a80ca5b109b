#!/usr/bin/env bash
# One prepared run for a GPU machine WITH TensorFlow installed (not yet run:
# the GPU machines lent to us so far reach no package registry, so TensorFlow
# cannot be installed there; they ran only custom_ops/cuda/gpu_selftest.cu).
#
#   OUT=/some/dir bash benchmarks/device_check.sh
#
# In one go, each step with its own time limit, results under $OUT:
#   1. the op build (g++ and nvcc)                       -> build_ops.txt
#   2. the CUDA kernels' standalone self-test            -> gpu_selftest.txt
#   3. the op and layer tests, with the GPU visible       -> tests_gpu.txt
#   4. the XLA structure tests (XLA:GPU dumps)            -> tests_xla_structure.txt
#   5. max batch of ResNet-164, stock / bits=None / 4-bit,
#      with and without XLA, measured on GPU:0             -> max_batch/
#   6. activation memory per sample under XLA (stack)     -> activation_memory_xla.txt
# A failing step is recorded in summary.txt and the next one still runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2
summary="$OUT/summary.txt"
: > "$summary"

. benchmarks/device_steps.sh  # step NAME SECONDS COMMAND...

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import tensorflow as tf; print(tf.__version__, tf.config.list_physical_devices())" \
  > "$OUT/devices.txt" 2>&1

step build_ops 300 python -m keras_blpa.build_ops
step gpu_selftest 300 bash -c \
  "nvcc -std=c++17 -O3 --fmad=false -Xcompiler -ffp-contract=off -arch=native -Icustom_ops -o /tmp/blpa_gpu_selftest custom_ops/cuda/gpu_selftest.cu && /tmp/blpa_gpu_selftest"
step tests_gpu 900 python -m pytest -q -p no:cacheprovider \
  tests/test_custom_op.py tests/test_layers.py tests/test_quantizer.py
step tests_xla_structure 600 python -m pytest -q -p no:cacheprovider tests/test_xla_structure.py
step max_batch 2400 python benchmarks/max_batch.py --depths 164 --variants stock none 4 \
  --jit both --budget-mib 8192 --repeats 1 --out "$OUT/max_batch"
step activation_memory_xla 900 python benchmarks/activation_memory.py --jit-compile
cat "$summary"
