"""Capped ReLU (`max_value`) units against plain ReLU units on Keras's JAX
backend: XLA's temp slope of the compiled training step (MiB per sample), a
stack of BN -> ReLU[6] -> 3x3 conv units, bits=None and 4 bits, side by side.

Both run the XLA custom calls where they run by default (CPU; the cap is an
operand of the custom calls), the jnp quantizer elsewhere.

    KERAS_BACKEND=jax python benchmarks/jax_capped_memory.py --depth 20 --channels 32
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

import keras_blpa  # noqa: E402
from keras_blpa import profiling  # noqa: E402


def stack(depth: int, channels: int, size: int, bits, cap) -> keras.Model:
    inputs = keras.Input((size, size, channels))
    x = inputs
    for _ in range(depth):
        x = keras_blpa.BNReLUConv2D(channels, 3, bits=bits, max_value=cap)(x)
    outputs = keras_blpa.BNReLUDense(10, bits=bits, pooling="avg")(x)
    model = keras.Model(inputs, outputs)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--max-value", type=float, default=6.0)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=(8, 24))
    args = p.parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit("Run with KERAS_BACKEND=jax.")
    rows = []
    small, large = args.batch_sizes
    for cap in (None, args.max_value):
        for bits in (None, 4):
            model = stack(args.depth, args.channels, args.size, bits, cap)
            temps = [profiling.jax_step_temp_bytes(model, b) for b in (small, large)]
            rows.append({"max_value": cap, "bits": bits,
                         "mib_per_sample": (temps[1] - temps[0]) / (large - small) / 2**20})
    print(f"{args.depth} units, {args.channels} channels, {args.size}x{args.size}, "
          f"batch {small} -> {large}: MiB/sample (XLA temp slope)\n")
    print("| max_value | bits | MiB / sample |\n|---|---|---|")
    for r in rows:
        print(f"| {r['max_value']} | {r['bits']} | {r['mib_per_sample']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
