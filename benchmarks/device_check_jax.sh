#!/usr/bin/env bash
# One prepared run of the JAX backend on a GPU machine (sized for one H200 and a
# 10-minute call; not yet run: no device was lent when it was written). The
# lent machine has JAX with CUDA but neither TensorFlow nor Keras, and reaches
# no package registry: carry Keras and what it needs as wheels. Here, first:
#
#   echo /.whl/ >> .git/info/exclude     # (.gitignore already has /.whl/)
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     keras==3.15.1 namex optree
#
# then run it there with `.whl` carried:
#
#   OUT=/some/dir bash benchmarks/device_check_jax.sh
#
# Each step has its own time limit; a failing step is recorded in summary.txt
# and the next one still runs. Results in $OUT/device_results.tar.gz (and
# summary.txt, tests_jax_gpu.txt beside it):
#   0. the XLA custom calls built against the installed
#      jaxlib, CUDA kernels included (nvcc)                -> build_jax.txt
#   1. devices                                              -> devices.txt
#   2. the JAX suite on the GPU (tests/jax_backend; the
#      two-device test runs on host devices)               -> tests_jax_gpu.txt
#   3. ResNet-164 memory: XLA temp slope of the compiled
#      step, stock / bits=None / 4-bit                       -> memory_resnet164.{txt,json,md}
#   3b. the device's peak_bytes_in_use, fresh process per
#      variant and batch, ResNet-56 stock / 4-bit           -> peak_resnet56.{txt,json,md}
#   3c. ResNet-164 4-bit on the jnp path (a GPU's default
#      until the CUDA custom calls have run)                -> memory_resnet164_jnp.{txt,json}
#   4. step time, ResNet-56, the variants interleaved       -> step_time_resnet56.{txt,json}
#   5. the custom calls and the jnp quantizer against a
#      device-to-device copy                                -> pack_bench.{txt,json}
set -u
cd "$(dirname "$0")/.."
# The device tool returns at most 8 files from $OUT: the steps write into a
# work folder, which ends up as one archive beside the summary and the tests' log.
FINAL=${OUT:-device_out}
mkdir -p "$FINAL"
OUT=$(mktemp -d)
# The CUDA custom calls are off by default until they have run on a GPU: on here.
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 KERAS_BLPA_JAX_CUSTOM_CALLS=1
summary="$OUT/summary.txt"
: > "$summary"

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

. benchmarks/device_steps.sh  # step NAME SECONDS COMMAND...

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Limits: guessed from this project's CPU timings (compilation dominates and
# XLA compiles on one core); a step that runs out is recorded, the next runs.
step build_jax 60 python3 -m keras_blpa.build_ops --only jax
step devices 15 python3 -c \
  "import jax, keras; print(jax.__version__, keras.__version__, jax.devices())"
step tests_jax_gpu 140 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/jax_backend
step memory_resnet164 140 python3 benchmarks/jax_memory.py --model cifar --depth 164 \
  --channels 3 --variants stock none 4 --batch-sizes 64 128 \
  --out "$OUT/memory_resnet164.json"
# Run-time peaks need a fresh process per variant and batch: ResNet-56 fits.
step peak_resnet56 90 python3 benchmarks/jax_memory.py --model cifar --depth 56 \
  --channels 3 --variants stock 4 --batch-sizes 64 128 --peak \
  --out "$OUT/peak_resnet56.json"
step memory_resnet164_jnp 45 python3 benchmarks/jax_memory.py --model cifar --depth 164 \
  --channels 3 --variants 4 --batch-sizes 64 128 --jnp --out "$OUT/memory_resnet164_jnp.json"
step step_time_resnet56 55 python3 benchmarks/step_time.py --depth 56 --batch-size 128 \
  --rounds 3 --steps 3 --variants stock none 4 4-jnp --out "$OUT/step_time_resnet56.json"
step pack_bench 30 python3 benchmarks/jax_pack_bench.py --sizes-mib 64 256 1024 \
  --out "$OUT/pack_bench.json"
cp "$summary" "$OUT/tests_jax_gpu.txt" "$FINAL/"
tar czf "$FINAL/device_results.tar.gz" -C "$OUT" .
cat "$summary"
