"""Compiles one BLPA training step with XLA and dumps what XLA made of it.

Run in a fresh process (XLA reads `XLA_FLAGS` once per process):

    python tests/xla_program.py DUMP_DIR --bits 4

The step is `tape.gradient(outputs, weights, output_gradients=seed)` on a small
pre-activation network (plain units, an identity residual, a projection head,
a pooled dense head). `seed` is the step's second argument, so the first
instruction that reads it marks where the backward pass begins in XLA's
schedule. `spec.json` in DUMP_DIR describes the network for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

BATCH, SIZE, CHANNELS, CLASSES = 4, 16, 8, 10


def build(bits, naive=False, negative_slope=0.0):
    import keras

    from keras_blpa.layers import BNReLUConv2D, BNReLUDense

    options = dict(bits=bits, naive=naive, negative_slope=negative_slope)
    inputs = keras.Input((SIZE, SIZE, CHANNELS), batch_size=BATCH)
    x = BNReLUConv2D(CHANNELS, 3, **options)(inputs)
    x = keras.layers.Add()([x, BNReLUConv2D(CHANNELS, 3, **options)(x)])
    out, short = BNReLUConv2D(CHANNELS, 3, projection_filters=CHANNELS, **options)(x)
    x = keras.layers.Add()([out, short])
    x = BNReLUConv2D(CHANNELS, 3, **options)(x)
    outputs = BNReLUDense(CLASSES, pooling="avg", **options)(x)
    return keras.Model(inputs, outputs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dump_dir")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--negative-slope", type=float, default=0.0)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump_dir}"
        " --xla_dump_hlo_module_re=.*blpa_step.*"
    ).strip()
    import numpy as np
    import tensorflow as tf

    model = build(args.bits, args.naive, args.negative_slope)
    weights = model.trainable_weights

    def blpa_step(x, seed):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
        return tape.gradient(outputs, weights, output_gradients=seed)

    step = tf.function(blpa_step, jit_compile=True)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, SIZE, SIZE, CHANNELS)), tf.float32)
    seed = tf.constant(rng.normal(size=(BATCH, CLASSES)), tf.float32)
    grads = step(x, seed)
    assert all(bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads)
    units = [
        {"name": layer.name, "input_shape": list(layer.input.shape)}
        for layer in model.layers
        if type(layer).__name__.startswith("BNReLU")
    ]
    with open(os.path.join(args.dump_dir, "spec.json"), "w") as f:
        json.dump({"bits": args.bits, "units": units, "batch": BATCH}, f)


if __name__ == "__main__":
    sys.exit(main())
