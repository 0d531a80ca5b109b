"""Measured training-step memory: the per-sample slope of peak memory.

Peak memory of a training step grows linearly with the batch size; its slope
is the activation memory per sample (weights, optimizer slots and constant
working buffers drop out). Each configuration is measured in a fresh process:
`python -m keras_blpa.profiling --variant 4` prints one JSON line, and
`measure_in_subprocess` does that from Python.

Variants: "stock" (stock Keras layers), "none" (fused, bits=None), "8" and
"4" (BLPA), "naive8" / "naive4" (naive quantization).

The slope is the saved activations plus the working memory of one unit's
backward pass (decoded activation, gradients); only the first grows with
depth. `saved_bytes_per_sample` computes the first exactly from a model's
fused layers.

Stable figures on a CPU: `measure_in_subprocess(repeats=3, steps=5,
inter_op_threads=-1, cpu_bfc=True, aggregate="min")`. Inter-op threads can
overlap two units' working sets (-1 runs every op in the calling thread);
the default CPU allocator does not count tensors under 256 KiB (BFC does,
but counts whole chunks, up to twice a request); and TensorFlow orders
independent ops by measured timings, so a step may keep one more
activation tensor alive at its peak. The lowest of several steps and
processes is the order that needs least; runs then agree to a few percent
(ResNet-29 4-bit: 0.644 MiB/sample, single runs up to 0.78).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from keras_blpa import validation

VARIANTS = ("stock", "none", "8", "4", "naive8", "naive4")
MODELS = ("stack", "residual_stack", "projection_stack", "cifar")
# Bytes a fused unit keeps per element of its input: packed codes, or the
# float32 normalized input with bits=None (outside XLA; XLA's word layout pads
# each row to whole uint32 words).
SAVED_BYTES_PER_ELEMENT = {4: 0.5, 8: 1.0, None: 4.0}


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; received {name}={value!r}.")


def _check_model_kwargs(
    model, variant, depth, width, channels, size, classes, negative_slope=0.0
) -> None:
    """ValueErrors naming the argument, before any model is built."""
    if model not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}; received {model!r}.")
    variant_options(variant)
    for name, value in (("depth", depth), ("channels", channels), ("size", size),
                        ("classes", classes)):
        _check_positive_int(name, value)
    if model == "cifar" and (depth < 11 or (depth - 2) % 9):
        raise ValueError(
            f"`depth` of model='cifar' must be 9n + 2 with n >= 1 (11, 20, 29, ..., 164); "
            f"received depth={depth}."
        )
    is_number = isinstance(width, numbers.Real) and not isinstance(width, bool)
    if not (is_number and math.isfinite(width) and width > 0):
        raise ValueError(
            f"`width` (channel multiplier) must be a finite positive number; "
            f"received width={width!r}."
        )
    if validation.real("negative_slope", negative_slope, low=0.0) and model == "cifar":
        raise ValueError(
            "`negative_slope` (leaky ReLU units) applies to the stack models; "
            f"model='cifar' builds ReLU ResNets. Received negative_slope={negative_slope!r}."
        )


def _check_inter_op_threads(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value == 0:
        raise ValueError(
            "`inter_op_threads` must be a positive integer (a pool of that many threads) or "
            f"-1 (every op in the calling thread), or None; received {value!r}."
        )


def _check_batch_sizes(batch_sizes) -> tuple[int, ...]:
    sizes = tuple(batch_sizes) if isinstance(batch_sizes, Sequence) else ()
    if len(sizes) < 2 or any(isinstance(b, bool) or not isinstance(b, numbers.Integral)
                             or b < 1 for b in sizes) or list(sizes) != sorted(set(sizes)):
        raise ValueError(
            "`batch_sizes` must be at least two increasing positive integers (the slope "
            f"runs from the first to the last), e.g. (8, 40); received {batch_sizes!r}."
        )
    return sizes


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
    negative_slope: float = 0.0,
):
    """A stack of `depth` BN -> ReLU -> 3x3 conv units plus a linear head.

    `shortcut`: None (plain stack), "identity" (`x + unit(x)`) or "projection"
    (`unit(x) + conv1x1(relu(bn(x)))`, the 1x1 conv reading the unit's own
    activation: the fused layer's projection head). `negative_slope`: leaky
    ReLU units (stock: `keras.layers.LeakyReLU`).
    """
    import keras

    from keras_blpa.layers import BNReLUConv2D

    if shortcut not in (None, "identity", "projection"):
        raise ValueError(
            f"`shortcut` must be None, 'identity' or 'projection'; received {shortcut!r}."
        )
    _check_model_kwargs("stack", variant, depth, 1.0, channels, size, classes,
                        negative_slope)
    options = variant_options(variant)
    inputs = keras.Input((size, size, channels))
    x = inputs
    for _ in range(depth):
        if options["stock"]:
            activation = (keras.layers.LeakyReLU(negative_slope=negative_slope)
                          if negative_slope else keras.layers.ReLU())
            a = activation(keras.layers.BatchNormalization()(x))
            out = keras.layers.Conv2D(channels, 3, padding="same")(a)
            if shortcut == "projection":
                short = keras.layers.Conv2D(channels, 1, use_bias=False)(a)
        else:
            layer = BNReLUConv2D(
                channels, 3, bits=options["bits"], naive=options["naive"],
                projection_filters=channels if shortcut == "projection" else None,
                negative_slope=negative_slope,
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
    negative_slope: float = 0.0,
):
    """The model of a measurement: a `conv_stack` ("stack", "residual_stack",
    "projection_stack") or "cifar" (`preact_resnet_cifar`). `negative_slope`
    (leaky ReLU units) applies to the stacks."""
    _check_model_kwargs(model, variant, depth, width, channels, size, classes,
                        negative_slope)
    if model.endswith("stack"):
        shortcut = {"stack": None, "residual_stack": "identity",
                    "projection_stack": "projection"}[model]
        return conv_stack(variant, depth, channels, size, classes, shortcut,
                          negative_slope)
    if model == "cifar":
        from keras_blpa.models import preact_resnet_cifar

        return preact_resnet_cifar(
            depth, width=width, classes=classes, input_shape=(size, size, channels),
            **variant_options(variant),
        )
    raise AssertionError(model)  # unreachable: checked above


def saved_bytes_per_sample(model) -> float:
    """Bytes per sample that `model`'s fused layers keep for the backward pass.

    Exact, from each fused layer's input shape and `bits`
    (`SAVED_BYTES_PER_ELEMENT`), `ApproxBatchNormalization` included; a
    projection head shares its unit's code.
    Stock Keras layers are not counted: what they keep depends on
    TensorFlow's gradient functions, so measure them instead.

    Raises:
      ValueError: if `model` has no fused BLPA layers.
    """
    import keras

    from keras_blpa.layers import ApproxBatchNormalization
    from keras_blpa.layers.base import BNReLUBase

    def layers_of(model):
        for layer in model.layers:
            if isinstance(layer, keras.Model):  # a nested model (a KerasHub backbone)
                yield from layers_of(layer)
            else:
                yield layer

    fused = [layer for layer in layers_of(model)
             if isinstance(layer, (BNReLUBase, ApproxBatchNormalization))]
    if not fused:
        raise ValueError(
            f"`model` ({model.name}) has no fused BLPA layers (BNReLUConv2D, BNReLUDense) "
            "whose saved bytes could be computed; measure it with `measure_in_subprocess`."
        )
    return float(sum(
        math.prod(layer.input.shape[1:]) * SAVED_BYTES_PER_ELEMENT[layer.bits]
        for layer in fused
    ))


def input_bytes_per_sample(model) -> float:
    """Bytes of one sample of the model's (float32) input batch.

    The input batch is held during the whole training step, so it is part of
    every measured peak and of its slope; it is data, not activation memory.
    """
    return float(math.prod(model.input_shape[1:]) * 4)


def _tensorflow_backend(what: str) -> None:
    """A clear error for TensorFlow's memory tools on another Keras backend."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"{what} measures TensorFlow's allocator and needs KERAS_BACKEND=tensorflow; "
            f"Keras runs on {keras.backend.backend()!r}. On JAX use "
            "keras_blpa.profiling.jax_temp_slope / jax_step_temp_bytes (the compiled "
            "step's memory), or benchmarks/jax_memory.py."
        )


def memory_device() -> str:
    """The device whose memory a training step fills: the first TPU or GPU
    core when there is one, else "CPU:0"."""
    _tensorflow_backend("memory_device")
    import tensorflow as tf

    for kind in ("TPU", "GPU"):
        if tf.config.list_logical_devices(kind):
            return f"{kind}:0"
    return "CPU:0"


def peak_step_memory(
    model, batch_size: int, jit_compile: bool = False, device: str | None = None,
    steps: int = 1,
) -> int:
    """Peak memory (bytes) of `device` during a `train_on_batch` after warm-up steps.

    The model is compiled afresh, so the step is traced for this batch size
    with static shapes, as `model.fit` does for a fixed batch size (a
    function retraced for several sizes generalizes the batch dimension and
    can schedule differently). Under a distribution strategy `batch_size` is
    the global batch and `device` (default `memory_device()`) one replica's.

    With `steps` > 1, the lowest of that many steps' peaks: a BFC allocator
    counts whole chunks, up to twice a request, and which chunks a step gets
    depends on what earlier steps left free, so single steps vary by up to
    10%; the lowest is the closest to what the tensors need. On CPU the
    default (oneDNN) allocator counts no allocation under 256 KiB; set
    `TF_CPU_ALLOCATOR_USE_BFC=true` before TensorFlow starts to count all
    (`measure_in_subprocess(cpu_bfc=True)`).
    """
    _tensorflow_backend("peak_step_memory")
    import numpy as np

    _check_positive_int("batch_size", batch_size)
    _check_positive_int("steps", steps)
    device = device or memory_device()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    shape = (batch_size, *model.input_shape[1:])
    # `batch_peak_bytes` makes the batch tensors before the measured steps and
    # holds them: the input then counts exactly once in every peak
    # (`input_bytes_per_sample`), whereas a NumPy batch is converted per step
    # and its copy may or may not outlive the forward pass.
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    return batch_peak_bytes(model, x, np.zeros((batch_size,), "int32"), steps, device)


def per_sample_slope(
    batch_sizes=(8, 40), jit_compile: bool = False, xla_dump_dir: str | None = None,
    steps: int = 1, **model_kwargs,
) -> dict:
    """Peak memory at each batch size and the slope in MiB per sample.

    `steps`: measured steps per batch size; the lowest peak counts
    (`peak_step_memory`).

    With `xla_dump_dir` (the process's `--xla_dump_to`), also XLA's own temp
    buffer per batch size and its slope (`xla_mib_per_sample`): under XLA the
    allocator peak rounds XLA's single temp buffer up to the chunk it got.
    """
    batch_sizes = _check_batch_sizes(batch_sizes)
    model = build_model(**model_kwargs)
    peaks = [peak_step_memory(model, b, jit_compile, steps=steps) for b in batch_sizes]
    span = batch_sizes[-1] - batch_sizes[0]
    result = {
        **model_kwargs,
        "batch_sizes": list(batch_sizes),
        "peak_bytes": peaks,
        "mib_per_sample": (peaks[-1] - peaks[0]) / span / 2**20,
        "input_mib_per_sample": input_bytes_per_sample(model) / 2**20,
        "jit_compile": jit_compile,
        "steps": steps,
        "params": model.count_params(),
    }
    if jit_compile and xla_dump_dir:
        from keras_blpa import xla_dump

        temps = xla_dump.temp_bytes_by_batch(xla_dump_dir, batch_sizes, "one_step_on_data")
        result["xla_temp_bytes"] = temps
        result["xla_mib_per_sample"] = (temps[-1] - temps[0]) / span / 2**20
    return result


def jax_compiled_step(model, batch_size: int):
    """Keras's own `train_step` of `model` (forward, loss, gradients, SGD
    update, BN statistics) on the JAX backend, lowered and compiled with
    `jax.jit` for `batch_size` (the global batch under a
    `keras.distribution`, sharded as `model.fit` shards it). Nothing runs."""
    import jax
    import jax.numpy as jnp
    import keras

    _check_positive_int("batch_size", batch_size)
    if keras.backend.backend() != "jax":
        raise RuntimeError("jax_compiled_step needs KERAS_BACKEND=jax.")
    if not model.compiled:
        model.compile(optimizer="sgd",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    x_shape, y_shape = (batch_size, *model.input_shape[1:]), (batch_size,)
    shardings = [None, None]
    distribution = keras.distribution.distribution()
    if distribution is not None:
        # The variables' arrays carry their own layouts.
        shardings = [distribution.get_data_layout(s).backend_layout for s in (x_shape, y_shape)]
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=shardings[0])
    y = jax.ShapeDtypeStruct(y_shape, jnp.int32, sharding=shardings[1])
    step = jax.jit(model.train_step, donate_argnums=0)
    return step.lower(state, (x, y)).compile()


def jax_step_temp_bytes(model, batch_size: int) -> int:
    """XLA's temp buffer (bytes) of `jax_compiled_step(model, batch_size)`,
    from `memory_analysis()`: one device's under a `keras.distribution`.

    The temp buffer holds every intermediate of the step (parameters,
    optimizer state and the batch are arguments, not temps), so its slope
    against the batch size is the activation memory per sample.
    """
    compiled = jax_compiled_step(model, batch_size)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def jax_temp_slope(batch_sizes=(8, 24), **model_kwargs) -> dict:
    """`jax_step_temp_bytes` at each batch size and its slope in MiB per sample
    (XLA's own account, free of allocator rounding), for `build_model(**model_kwargs)`."""
    batch_sizes = _check_batch_sizes(batch_sizes)
    model = build_model(**model_kwargs)
    temps = [jax_step_temp_bytes(model, b) for b in batch_sizes]
    span = batch_sizes[-1] - batch_sizes[0]
    return {
        **_model_kwargs(**model_kwargs),
        "backend": "jax",
        "batch_sizes": list(batch_sizes),
        "temp_bytes": temps,
        "mib_per_sample": (temps[-1] - temps[0]) / span / 2**20,
        "params": model.count_params(),
    }


def batch_temp_bytes(model, x, y) -> int:
    """XLA's temp buffer (bytes) of `model.train_step` on the batch `(x, y)`
    (any structure of arrays), compiled with `jax.jit`; nothing runs. A
    compiled model (Keras's JAX backend)."""
    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError("batch_temp_bytes needs KERAS_BACKEND=jax.")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (x, y))
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, spec).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def batch_peak_bytes(model, x, y, steps: int = 3, device: str | None = None) -> int:
    """Peak memory (bytes) of `device` over a `train_on_batch(x, y)` of a
    compiled model, after two warm-up steps; the lowest of `steps` steps
    (see `peak_step_memory`). The batch is made into tensors on `device` first
    and held throughout, so it counts once in every peak. TensorFlow; count
    every allocation on CPU with `TF_CPU_ALLOCATOR_USE_BFC=true` set before
    TensorFlow starts."""
    _tensorflow_backend("batch_peak_bytes")
    import tensorflow as tf

    device = device or memory_device()
    with tf.device(device):
        x, y = tf.nest.map_structure(tf.constant, (x, y))
    for _ in range(2):
        model.train_on_batch(x, y)
    if device.startswith("CPU") and not cpu_allocator_keeps_stats():
        raise RuntimeError(
            "TensorFlow's default CPU allocator keeps no memory statistics on this "
            "machine (oneDNN is off, as on AMD CPUs). Set TF_CPU_ALLOCATOR_USE_BFC=true "
            "before TensorFlow starts, or use measure_in_subprocess, which does."
        )
    peaks = []
    for _ in range(steps):
        tf.config.experimental.reset_memory_stats(device)
        model.train_on_batch(x, y)
        peaks.append(tf.config.experimental.get_memory_info(device)["peak"])
    return min(peaks)


def _model_kwargs(**given) -> dict:
    """`build_model`'s keyword arguments with its defaults filled in."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(build_model).parameters.items()}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown model arguments {unknown}; known: {sorted(defaults)}.")
    return {**defaults, **given}


def measure_in_subprocess(
    batch_sizes=(8, 40),
    jit_compile: bool = False,
    repeats: int = 1,
    inter_op_threads: int | None = None,
    intra_op_threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    steps: int = 1,
    cpu_bfc: bool | None = None,
    aggregate: str = "median",
    **model_kwargs,
) -> dict:
    """`per_sample_slope` in a fresh Python process (allocator state matters).

    Args:
      batch_sizes, jit_compile, steps, model_kwargs: as in `per_sample_slope`.
      repeats: fresh processes to run; the result is the run `aggregate`
        picks, with every run's slope in `mib_per_sample_runs`.
      inter_op_threads: the measuring process's inter-op threads (None:
        TensorFlow's default). -1 runs every op in the calling thread, one at
        a time in a fixed order, so the peak no longer depends on how ops
        interleave under load (a pool of 1 thread still runs two at once).
      intra_op_threads: the measuring process's threads per op (None:
        TensorFlow's default). With 1, kernels allocate in a fixed order and
        no per-thread buffers: the figure then depends neither on load nor
        on the number of cores.
      progress: called with a line after each run (e.g. `print`).
      cpu_bfc: on CPU, measure with TensorFlow's BFC allocator
        (`TF_CPU_ALLOCATOR_USE_BFC=true`), which counts every tensor; the
        default (oneDNN) CPU allocator leaves allocations under 256 KiB out of
        its statistics, such as most of a small batch's codes. Its pool is
        then reserved up front (`reserve_cpu_pool`). Combine with `steps`
        > 1: BFC counts whole chunks, so single steps vary by up to 10%.
        None (the default): BFC only where the default CPU allocator keeps
        no statistics at all (`cpu_allocator_keeps_stats`).
      aggregate: "median" or "min" (the lowest run). TensorFlow orders
        independent ops by measured timings, and an order can keep one more
        activation tensor alive at the peak; "min" reports the order that
        needs least, as `steps` does within a process.

    Raises:
      ValueError: for a bad argument (checked before any process starts).
      RuntimeError: if the measuring process fails, or Keras runs on JAX.
    """
    _tensorflow_backend("measure_in_subprocess")
    batch_sizes = _check_batch_sizes(batch_sizes)
    _check_positive_int("repeats", repeats)
    _check_positive_int("steps", steps)
    if aggregate not in ("median", "min"):
        raise ValueError(f"`aggregate` must be 'median' or 'min'; received {aggregate!r}.")
    if inter_op_threads is not None:
        _check_inter_op_threads(inter_op_threads)
    if intra_op_threads is not None:
        _check_positive_int("intra_op_threads", intra_op_threads)
    kwargs = _model_kwargs(**model_kwargs)
    _check_model_kwargs(**kwargs)
    args = [sys.executable, "-m", "keras_blpa.profiling",
            "--batch-sizes", *map(str, batch_sizes)]
    for key, value in model_kwargs.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    if inter_op_threads is not None:
        args += ["--inter-op-threads", str(inter_op_threads)]
    if intra_op_threads is not None:
        args += ["--intra-op-threads", str(intra_op_threads)]
    if steps != 1:
        args += ["--steps", str(steps)]
    if cpu_bfc is None:
        cpu_bfc = not cpu_allocator_keeps_stats()
    env = {"TF_CPU_ALLOCATOR_USE_BFC": "true"} if cpu_bfc else {}
    runs = []
    for run in range(1, repeats + 1):
        start = time.time()
        runs.append(_run_once(args, jit_compile, env))
        if progress is not None:
            progress(
                f"memory, variant {kwargs['variant']}, run {run}/{repeats}: "
                f"{runs[-1]['mib_per_sample']:.3f} MiB/sample "
                f"(batch {batch_sizes[0]} -> {batch_sizes[-1]}, {time.time() - start:.0f} s)"
            )
    slopes = [r["mib_per_sample"] for r in runs]
    ordered = sorted(runs, key=lambda r: r["mib_per_sample"])
    # The median run (the lower middle one for an even count), or the lowest.
    chosen = ordered[(repeats - 1) // 2 if aggregate == "median" else 0]
    return {**chosen, "mib_per_sample_runs": slopes, "aggregate": aggregate,
            "inter_op_threads": inter_op_threads, "intra_op_threads": intra_op_threads,
            "cpu_bfc": cpu_bfc}


def _run_once(args: list[str], jit_compile: bool, env: dict[str, str]) -> dict:
    """One measuring process: its JSON result."""
    with tempfile.TemporaryDirectory(prefix="blpa_xla_dump_") as dump_dir:
        if jit_compile:
            args = [*args, "--jit-compile", "--xla-dump-dir", dump_dir]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
        result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_bfc() -> bool:
    """True when TensorFlow's CPU allocator is BFC (`TF_CPU_ALLOCATOR_USE_BFC`)."""
    return os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true")


def cpu_allocator_keeps_stats() -> bool:
    """True when this process's TensorFlow CPU allocator keeps the statistics
    `peak_step_memory` reads.

    The default CPU allocator keeps them only with oneDNN, which TensorFlow
    turns on for some x86 CPUs and not others (it is off on AMD EPYC); BFC
    (`TF_CPU_ALLOCATOR_USE_BFC=true`) always keeps them. Starts TensorFlow's
    context: call it after any threading settings.
    """
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return False
    return True


def reserve_cpu_pool(limit_mib: int = 2048) -> None:
    """Gives TensorFlow's CPU BFC pool one region for the whole run, up front.

    BFC hands a request the smallest free chunk that fits (up to twice its
    size, all of it counted), ties broken by address. Regions added as the
    pool grows land at random addresses, so which chunk a tensor gets, and
    the peak, would vary from process to process. Never written, the block
    reserves address space, not memory.
    """
    import tensorflow as tf

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    with tf.device("CPU:0"):
        block = tf.raw_ops.Empty(
            shape=[min(limit_mib, physical // 4), 2**20], dtype=tf.uint8, init=False
        )
    del block


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="stack")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--negative-slope", type=float, default=0.0,
                        help="leaky ReLU units (stack models)")
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=(8, 40))
    parser.add_argument("--steps", type=int, default=1,
                        help="measured steps per batch size; the lowest peak counts")
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument(
        "--inter-op-threads", type=int, default=None,
        help="TensorFlow inter-op threads; -1: every op in the calling thread, in a fixed "
        "order (a peak that does not depend on load)",
    )
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="TensorFlow threads per op (1: a peak that depends neither on "
                        "load nor on the number of cores)")
    parser.add_argument(
        "--xla-dump-dir", default=None,
        help="with --jit-compile: dump XLA's modules here (this process only) and "
        "report XLA's own temp-buffer slope too",
    )
    args = parser.parse_args(argv)
    try:
        _check_model_kwargs(args.model, args.variant, args.depth, args.width,
                            args.channels, args.size, args.classes, args.negative_slope)
        _check_batch_sizes(args.batch_sizes)
        _check_positive_int("steps", args.steps)
        if args.inter_op_threads is not None:
            _check_inter_op_threads(args.inter_op_threads)
        if args.intra_op_threads is not None:
            _check_positive_int("intra_op_threads", args.intra_op_threads)
    except ValueError as err:
        # The functions name `python_arguments`; the command line has --flags.
        parser.error(re.sub(r"`(\w+)`", lambda m: "--" + m[1].replace("_", "-"), str(err)))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.xla_dump_dir:
        # This measuring process's own flags, set before TensorFlow loads.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.xla_dump_dir}"
            " --xla_dump_hlo_module_re=.*one_step_on_data.*"
        ).strip()
    import tensorflow as tf

    # Before the first op: these settings only apply to a fresh context.
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    if memory_device() == "CPU:0" and cpu_bfc():
        reserve_cpu_pool()
    result = per_sample_slope(
        tuple(args.batch_sizes), args.jit_compile, args.xla_dump_dir, steps=args.steps,
        model=args.model, variant=args.variant,
        depth=args.depth, width=args.width, channels=args.channels, size=args.size,
        classes=args.classes, negative_slope=args.negative_slope,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
