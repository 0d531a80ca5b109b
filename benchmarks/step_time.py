"""Training-step time of a pre-activation ResNet: variants side by side.

All variants live in one process and their steps are interleaved (round
robin), so machine noise hits them alike; the table gives the median time per
step and the ratio to the exact fused model (bits=None) at the same batch.

  stock       stock Keras layers
  none        fused, bits=None
  8, 4        BLPA with the compiled op
  4-puretf    BLPA 4-bit with the pure-TF quantizer (the op's fallback)
  V-xla       variant V under jit_compile=True (BLPA: pure-TF quantizer, XLA)

The last column compares each variant with stock Keras layers under the same
compiler (stock for plain variants, stock-xla for -xla ones).

With `KERAS_BACKEND=jax` the variants are stock, none, 8, 4 and 4-jnp: every
step is jitted, stock layers on JAX alike; the fused ones run the XLA custom
calls where they run by default (CPU), 4-jnp the jnp quantizer (TPU's path),
4-whole the custom calls with the weight gradient over the whole batch at
once instead of four batch slices (`KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS=1`).

    python benchmarks/step_time.py --depth 29 --batch-size 64 --rounds 5
    python benchmarks/step_time.py --depth 56 --batch-size 32 \
        --variants stock-xla none-xla 8-xla 4-xla stock 4
    KERAS_BACKEND=jax python benchmarks/step_time.py --depth 56 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_blpa.models import preact_resnet_cifar  # noqa: E402

JAX = keras.backend.backend() == "jax"
VARIANTS = ("stock", "none", "8", "4") + (
    ("4-jnp", "4-whole") if JAX else ("4-puretf", "stock-xla", "none-xla", "8-xla", "4-xla"))


def implementation() -> str:
    if JAX:
        import jax

        from keras_blpa.backend.jax import kernels

        kernels = "custom calls" if kernels.usable((2, 2), 4) else "jnp quantizer"
        return f"JAX {jax.__version__} ({kernels}, jitted) on {jax.devices()[0].platform}"
    from keras_blpa import ops

    return ops.implementation()


def make(variant: str, depth: int, x, y):
    name = variant.split("-")[0]
    bits = None if name in ("stock", "none") else int(name)
    model = preact_resnet_cifar(depth, bits=bits, stock=name == "stock",
                                input_shape=x.shape[1:])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True if JAX else variant.endswith("xla"))
    # The path is fixed when the step is traced: trace the fallback variants
    # with the compiled kernels switched off.
    switch = {"puretf": ("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1"),
              "jnp": ("KERAS_BLPA_JAX_CUSTOM_CALLS", "0"),
              "whole": ("KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS", "1")}.get(variant.split("-")[-1])
    saved = os.environ.get(switch[0]) if switch else None
    if switch:
        os.environ[switch[0]] = switch[1]
    try:
        model.train_on_batch(x, y)
    finally:
        if switch and saved is None:
            os.environ.pop(switch[0], None)
        elif switch:
            os.environ[switch[0]] = saved
    model.train_on_batch(x, y)
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=29)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    models = {v: make(v, args.depth, x, y) for v in args.variants}
    times = {v: [] for v in models}
    for _ in range(args.rounds):
        for v, model in models.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(x, y)
            times[v].append((time.perf_counter() - start) / args.steps)
    median = {v: statistics.median(t) for v, t in times.items()}
    base = median.get("none")
    print(f"Pre-activation ResNet-{args.depth}, batch {args.batch_size}, "
          f"{args.size}x{args.size}; op: {implementation()}\n")
    print("| variant | ms / step (median) | vs bits=None | vs stock, same compiler |")
    print("|---|---|---|---|")
    for v, m in median.items():
        ratio = f"{m / base:.2f}x" if base else "-"
        stock = median.get("stock-xla" if v.endswith("xla") else "stock")
        vs_stock = f"{m / stock:.2f}x" if stock else "-"
        print(f"| {v} | {1e3 * m:.1f} | {ratio} | {vs_stock} |")
    result = {"depth": args.depth, "batch_size": args.batch_size, "median_s": median,
              "all_s": times, "implementation": implementation()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
