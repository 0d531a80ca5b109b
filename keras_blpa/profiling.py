"""Measured training-step memory: the per-sample slope of peak memory.

Peak memory of a training step grows linearly with the batch size; its slope
is the activation memory per sample (weights, optimizer slots and constant
working buffers drop out). Each variant must be measured in a fresh process:
`python -m keras_blpa.profiling --variant 4` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

VARIANTS = ("stock", "none", "8", "4")


def conv_stack(
    variant: str, depth: int = 20, channels: int = 32, size: int = 32, classes: int = 10
):
    """A plain stack of `depth` BN -> ReLU -> 3x3 conv units plus a linear head.

    `variant` is "stock" (keras BatchNormalization, ReLU, Conv2D layers) or
    "none" / "8" / "4" (BNReLUConv2D with bits=None / 8 / 4).
    """
    import keras

    from keras_blpa.layers import BNReLUConv2D

    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}; received {variant!r}.")
    inputs = keras.Input((size, size, channels))
    x = inputs
    for _ in range(depth):
        if variant == "stock":
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
            x = keras.layers.Conv2D(channels, 3, padding="same")(x)
        else:
            bits = None if variant == "none" else int(variant)
            x = BNReLUConv2D(channels, 3, bits=bits)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, outputs)


def peak_step_memory(model, batch_size: int, jit_compile: bool = False) -> int:
    """Peak CPU memory (bytes) of one `train_on_batch` after a warm-up step."""
    import numpy as np
    import tensorflow as tf

    if not model.compiled:
        model.compile(
            optimizer="sgd",
            loss="sparse_categorical_crossentropy",
            jit_compile=jit_compile,
        )
    shape = (batch_size, *model.input_shape[1:])
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    y = np.zeros((batch_size,), "int32")
    model.train_on_batch(x, y)
    tf.config.experimental.reset_memory_stats("CPU:0")
    model.train_on_batch(x, y)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"]


def per_sample_slope(
    variant: str, batch_sizes=(8, 24), jit_compile: bool = False, **stack_kwargs
) -> dict:
    """Peak memory at each batch size and the slope in MiB per sample."""
    model = conv_stack(variant, **stack_kwargs)
    peaks = [peak_step_memory(model, b, jit_compile) for b in batch_sizes]
    slope = (peaks[-1] - peaks[0]) / (batch_sizes[-1] - batch_sizes[0])
    return {
        "variant": variant,
        "batch_sizes": list(batch_sizes),
        "peak_bytes": peaks,
        "mib_per_sample": slope / 2**20,
        "jit_compile": jit_compile,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=(8, 24))
    parser.add_argument("--jit-compile", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = per_sample_slope(
        args.variant,
        tuple(args.batch_sizes),
        args.jit_compile,
        depth=args.depth,
        channels=args.channels,
        size=args.size,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
