"""Process for tests/jax_backend/test_jax_distribution.py: a `fit` (two steps
of global batch 16) of a ResNet-11 (fused, or `--bits stock`) on `--devices`
CPU devices under `keras.distribution.DataParallel` (1: no distribution),
then the compiled step's per-device temp buffer at two global batch sizes,
the collectives in that program and the rows each BLPA custom call in it
reads. Writes JSON and the weights (.npz) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import re


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--bits", default="4")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import keras
    import numpy as np

    from keras_blpa import profiling
    from keras_blpa.models import preact_resnet_cifar

    assert len(jax.devices()) == args.devices
    if args.devices > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()))
    keras.utils.set_random_seed(0)
    if args.bits == "converted":
        model = _converted_post_activation_net()
    else:
        bits = None if args.bits in ("none", "stock") else int(args.bits)
        model = preact_resnet_cifar(11, classes=3, input_shape=(8, 8, 3), bits=bits,
                                    stock=args.bits == "stock")
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 32)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    np.savez(args.out + ".npz", *[np.asarray(w) for w in model.get_weights()])
    compiled = {b: profiling.jax_compiled_step(model, b) for b in (64, 128)}
    temps = {b: int(c.memory_analysis().temp_size_in_bytes) for b, c in compiled.items()}
    # The collectives of the compiled step at global batch 128, with their
    # sizes, against one activation of the first stage (per device).
    hlo = compiled[128].as_text()
    collectives = []
    for m in re.finditer(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|all-to-all|"
                         r"collective-permute)(?:-start)?\(", hlo):
        elements = int(np.prod([int(d) for d in m.group(2).split(",") if d] or [1]))
        collectives.append([m.group(3), elements])
    # The rows (leading dimension of the first operand) each BLPA custom call
    # reads: a call the partitioner could not split would read all 128.
    custom_call_rows = [[m.group(1), int(m.group(2))] for m in re.finditer(
        r'custom_call_target="(blpa_\w+)", operand_layout_constraints=\{\w+\[(\d+)', hlo)]
    with open(args.out + ".json", "w") as f:
        json.dump({"loss": history.history["loss"], "temp_bytes": temps,
                   "collectives": collectives, "custom_call_rows": custom_call_rows}, f)


def _converted_post_activation_net():
    """A small post-activation ResNet, converted at 4 bits with bn_bits=8: BN
    units, ReLU-only units, ApproxBatchNormalization and PaddedMaxPooling2D."""
    import keras

    import keras_blpa

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(inputs)))
    x = layers.MaxPooling2D(3, strides=1)(layers.ZeroPadding2D(1)(x))
    for _ in range(2):
        y = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(x)))
        y = layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(y))
        x = layers.ReLU()(layers.Add()([x, y]))
    outputs = layers.Dense(3)(layers.GlobalAveragePooling2D()(x))
    model, report = keras_blpa.convert(keras.Model(inputs, outputs), bits=4, bn_bits=8,
                                       return_report=True)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"BNReLUConv2D", "ReLUConv2D", "ReLUDense", "ApproxBatchNormalization",
            "PaddedMaxPooling2D"} <= kinds, kinds
    return model


if __name__ == "__main__":
    main()
