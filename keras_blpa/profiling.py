"""Measured training-step memory: the per-sample slope of peak memory.

Peak memory of a training step grows linearly with the batch size; its slope
is the activation memory per sample (weights, optimizer slots and constant
working buffers drop out). Each configuration is measured in a fresh process:
`python -m keras_blpa.profiling --variant 4` prints one JSON line, and
`measure_in_subprocess` does that from Python.

Variants: "stock" (stock Keras layers), "none" (fused, bits=None), "8" and
"4" (BLPA), "naive8" / "naive4" (naive quantization).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = ("stock", "none", "8", "4", "naive8", "naive4")
MODELS = ("stack", "residual_stack", "projection_stack", "cifar")


def variant_options(variant: str) -> dict:
    """`bits`, `naive` and `stock` keyword arguments of a variant name."""
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}; received {variant!r}.")
    if variant == "stock":
        return dict(bits=None, naive=False, stock=True)
    if variant == "none":
        return dict(bits=None, naive=False, stock=False)
    naive = variant.startswith("naive")
    return dict(bits=int(variant.removeprefix("naive")), naive=naive, stock=False)


def conv_stack(
    variant: str,
    depth: int = 20,
    channels: int = 32,
    size: int = 32,
    classes: int = 10,
    shortcut: str | None = None,
):
    """A stack of `depth` BN -> ReLU -> 3x3 conv units plus a linear head.

    `shortcut`: None (plain stack), "identity" (`x + unit(x)`) or "projection"
    (`unit(x) + conv1x1(relu(bn(x)))`, the 1x1 conv reading the unit's own
    activation: the fused layer's projection head).
    """
    import keras

    from keras_blpa.layers import BNReLUConv2D

    options = variant_options(variant)
    inputs = keras.Input((size, size, channels))
    x = inputs
    for _ in range(depth):
        if options["stock"]:
            a = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
            out = keras.layers.Conv2D(channels, 3, padding="same")(a)
            if shortcut == "projection":
                short = keras.layers.Conv2D(channels, 1, use_bias=False)(a)
        else:
            layer = BNReLUConv2D(
                channels, 3, bits=options["bits"], naive=options["naive"],
                projection_filters=channels if shortcut == "projection" else None,
            )
            out = layer(x)
            if shortcut == "projection":
                out, short = out
        if shortcut == "identity":
            short = x
        x = out if shortcut is None else keras.layers.Add()([out, short])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, outputs)


def build_model(
    model: str = "stack",
    variant: str = "4",
    depth: int = 20,
    width: float = 1.0,
    channels: int = 32,
    size: int = 32,
    classes: int = 10,
):
    """The model of a measurement: a `conv_stack` ("stack", "residual_stack",
    "projection_stack") or "cifar" (`preact_resnet_cifar`)."""
    if model.endswith("stack"):
        shortcut = {"stack": None, "residual_stack": "identity",
                    "projection_stack": "projection"}[model]
        return conv_stack(variant, depth, channels, size, classes, shortcut)
    if model == "cifar":
        from keras_blpa.models import preact_resnet_cifar

        return preact_resnet_cifar(
            depth, width=width, classes=classes, input_shape=(size, size, channels),
            **variant_options(variant),
        )
    raise ValueError(f"`model` must be one of {MODELS}; received {model!r}.")


def memory_device() -> str:
    """The device whose memory a training step fills: the first TPU or GPU
    core when there is one, else "CPU:0"."""
    import tensorflow as tf

    for kind in ("TPU", "GPU"):
        if tf.config.list_logical_devices(kind):
            return f"{kind}:0"
    return "CPU:0"


def peak_step_memory(
    model, batch_size: int, jit_compile: bool = False, device: str | None = None
) -> int:
    """Peak memory (bytes) of `device` during one `train_on_batch` after warm-up steps.

    The model is compiled afresh, so the step is traced for this batch size
    with static shapes, as `model.fit` does for a fixed batch size (a
    function retraced for several sizes generalizes the batch dimension and
    can schedule differently). Under a distribution strategy `batch_size` is
    the global batch and `device` (default `memory_device()`) one replica's.
    """
    import numpy as np
    import tensorflow as tf

    device = device or memory_device()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    shape = (batch_size, *model.input_shape[1:])
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    y = np.zeros((batch_size,), "int32")
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    tf.config.experimental.reset_memory_stats(device)
    model.train_on_batch(x, y)
    return tf.config.experimental.get_memory_info(device)["peak"]


def per_sample_slope(
    batch_sizes=(8, 40), jit_compile: bool = False, xla_dump_dir: str | None = None,
    **model_kwargs,
) -> dict:
    """Peak memory at each batch size and the slope in MiB per sample.

    With `xla_dump_dir` (the process's `--xla_dump_to`), also XLA's own temp
    buffer per batch size and its slope (`xla_mib_per_sample`): under XLA the
    allocator peak rounds XLA's single temp buffer up to the chunk it got.
    """
    model = build_model(**model_kwargs)
    peaks = [peak_step_memory(model, b, jit_compile) for b in batch_sizes]
    span = batch_sizes[-1] - batch_sizes[0]
    result = {
        **model_kwargs,
        "batch_sizes": list(batch_sizes),
        "peak_bytes": peaks,
        "mib_per_sample": (peaks[-1] - peaks[0]) / span / 2**20,
        "jit_compile": jit_compile,
        "params": model.count_params(),
    }
    if jit_compile and xla_dump_dir:
        from keras_blpa import xla_dump

        temps = xla_dump.temp_bytes_by_batch(xla_dump_dir, batch_sizes, "one_step_on_data")
        result["xla_temp_bytes"] = temps
        result["xla_mib_per_sample"] = (temps[-1] - temps[0]) / span / 2**20
    return result


def measure_in_subprocess(batch_sizes=(8, 40), jit_compile: bool = False, **model_kwargs) -> dict:
    """`per_sample_slope` in a fresh Python process (allocator state matters)."""
    args = [sys.executable, "-m", "keras_blpa.profiling",
            "--batch-sizes", *map(str, batch_sizes)]
    for key, value in model_kwargs.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    with tempfile.TemporaryDirectory(prefix="blpa_xla_dump_") as dump_dir:
        if jit_compile:
            args += ["--jit-compile", "--xla-dump-dir", dump_dir]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="stack")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=(8, 40))
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument(
        "--xla-dump-dir", default=None,
        help="with --jit-compile: dump XLA's modules here (this process only) and "
        "report XLA's own temp-buffer slope too",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.xla_dump_dir:
        # This measuring process's own flags, set before TensorFlow loads.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.xla_dump_dir}"
            " --xla_dump_hlo_module_re=.*one_step_on_data.*"
        ).strip()
    result = per_sample_slope(
        tuple(args.batch_sizes), args.jit_compile, args.xla_dump_dir,
        model=args.model, variant=args.variant,
        depth=args.depth, width=args.width, channels=args.channels, size=args.size,
        classes=args.classes,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
