"""Convert a keras.applications network to BLPA in one call, measure, fine-tune.

Builds a `keras.applications` model (weights=None: offline), converts it with
`keras_blpa.convert`, prints the conversion report and the activation memory
of the original and the converted model (each measured in a fresh process:
the per-sample slope of the peak memory of a forward + backward pass between
two batch sizes, see `backward_peak`), then fine-tunes
the converted model for a few steps on Fashion-MNIST (offline: the Debian
package when installed, else the subset shipped with keras_blpa), resized to
the input size and repeated to 3 channels.

    python examples/convert_applications.py                  # ResNet50V2, 64x64, 4-bit
    python examples/convert_applications.py --model DenseNet121 --bits 8
    python examples/convert_applications.py --table ResNet50V2 DenseNet121 ResNet50 MobileNetV2
    python examples/convert_applications.py --model ResNet50 --bn-bits 8

`--table` measures every listed model (stock, bits=None, 4-bit; with
`--bn-bits`, also 4-bit with the BNs outside the chains approximated) and
prints the README's table instead of training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_blpa  # noqa: E402
from keras_blpa import datasets, profiling, training  # noqa: E402

APPLICATIONS = (
    "ResNet50V2", "ResNet101V2", "ResNet152V2", "ResNet50", "ResNet101", "ResNet152",
    "DenseNet121", "DenseNet169", "DenseNet201", "MobileNetV2", "MobileNet",
)
_RESNET50 = dict(input_conv_filters=[64], input_conv_kernel_sizes=[7],
                 stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[3, 4, 6, 3],
                 stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
                 use_pre_activation=False)
_CSP = dict(stem_filters=32, stem_kernel_size=3, stem_strides=1,
            stackwise_depth=[1, 2, 8, 8, 4], stackwise_num_filters=[64, 128, 256, 512, 1024],
            stackwise_strides=[2, 2, 2, 2, 2], bottle_ratio=[0.5, 1.0], block_ratio=[1.0, 0.5],
            expand_ratio=[2.0, 1.0], stage_type="csp", block_type="dark_block",
            activation="leaky_relu", stem_padding="same", down_growth=True)
# KerasHub vision backbones with the layouts of their presets (random weights:
# the presets need the internet); each gets a GlobalAveragePooling2D -> Dense head.
HUB = {
    "hub:ResNet50": ("ResNetBackbone", _RESNET50),
    "hub:ResNet50V2": ("ResNetBackbone", {**_RESNET50, "use_pre_activation": True}),
    "hub:ResNet50vd": ("ResNetBackbone", {
        **_RESNET50, "input_conv_filters": [32, 32, 64], "input_conv_kernel_sizes": [3, 3, 3],
        "block_type": "bottleneck_block_vd"}),
    "hub:DenseNet121": ("DenseNetBackbone", dict(stackwise_num_repeats=[6, 12, 24, 16])),
    "hub:MobileNetV3Small": ("MobileNetBackbone", dict(
        stackwise_num_blocks=[2, 3, 2, 3],
        stackwise_expansion=[[72, 88], [96, 240, 240], [120, 144], [288, 576, 576]],
        stackwise_num_filters=[[24, 24], [40, 40, 40], [48, 48], [96, 96, 96]],
        stackwise_kernel_size=[[3, 3], [5, 5, 5], [5, 5], [5, 5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1, 1], [1, 1], [2, 1, 1]],
        stackwise_se_ratio=[[None, None], [0.25] * 3, [0.25] * 2, [0.25] * 3],
        stackwise_activation=[["relu", "relu"], ["hard_swish"] * 3, ["hard_swish"] * 2,
                              ["hard_swish"] * 3],
        stackwise_padding=[[1, 1], [2, 2, 2], [2, 2], [2, 2, 2]],
        output_num_filters=1024, depthwise_filters=16, depthwise_stride=2,
        depthwise_residual=False, squeeze_and_excite=0.5, last_layer_filter=576)),
    "hub:CSPDarkNet53": ("CSPNetBackbone", _CSP),
    "hub:VGG16": ("VGGBackbone", dict(stackwise_num_repeats=[2, 2, 3, 3, 3],
                                      stackwise_num_filters=[64, 128, 256, 512, 512])),
    "hub:HGNetV2B4": ("HGNetV2Backbone", dict(
        depths=[1, 1, 3, 1], embedding_size=48, hidden_sizes=[128, 512, 1024, 2048],
        stem_channels=[3, 32, 48], hidden_act="relu", use_learnable_affine_block=False,
        stackwise_stage_filters=[[48, 48, 128, 1, 6, 3], [128, 96, 512, 1, 6, 3],
                                 [512, 192, 1024, 3, 6, 5], [1024, 384, 2048, 1, 6, 5]],
        apply_downsample=[False, True, True, True],
        use_lightweight_conv_block=[False, False, True, True])),
    "hub:Xception41": ("XceptionBackbone", dict(
        stackwise_conv_filters=[[32, 64], [128, 128], [256, 256], [728, 728]]
        + [[728, 728, 728]] * 8 + [[728, 1024], [1536, 2048]],
        stackwise_pooling=[False, True, True, True] + [False] * 8 + [True, False])),
}
MODELS = APPLICATIONS + tuple(HUB)
VARIANTS = ("stock", "none", "8", "4", "4+bn8", "4+bn4", "8+bn8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="ResNet50V2")
    p.add_argument("--size", type=training.positive_int, default=64,
                   help="input height and width (default 64; at least 32)")
    p.add_argument("--bits", choices=["4", "8", "none"], default="4",
                   help="fused layers' bits (none: exact)")
    p.add_argument("--bn-bits", choices=["4", "8", "none"], default="none",
                   help="code width of the BatchNormalization layers outside the chains "
                        "(ApproxBatchNormalization; beyond the paper), none: stock")
    p.add_argument("--steps", type=training.positive_int, default=20,
                   help="fine-tuning steps (default 20)")
    p.add_argument("--batch-size", type=training.positive_int, default=32)
    p.add_argument("--lr", type=training.positive_float, default=1e-3,
                   help="Adam learning rate (default 0.001)")
    p.add_argument("--dataset", choices=["fashion_mnist", "fashion_mnist_subset"],
                   default="fashion_mnist",
                   help="fashion_mnist: the Debian package if installed, else the subset")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--memory-batch-sizes", type=training.positive_int, nargs="+",
                   default=(40, 64, 88),
                   help="slope from the first to the last (default 40 64 88; each step's "
                   "slope goes to the JSON too)")
    p.add_argument("--memory-steps", type=training.positive_int, default=5,
                   help="measured steps per batch size; the lowest peak counts")
    p.add_argument("--memory-repeats", type=training.positive_int, default=1,
                   help="fresh processes per figure; the lowest is reported")
    p.add_argument("--full-report", action="store_true",
                   help="list every fused chain, not only those left stock")
    p.add_argument("--table", nargs="+", choices=MODELS, metavar="MODEL",
                   help="measure these models (stock, bits=None, 4-bit) and print a table")
    p.add_argument("--out", default=None, help="with --table: also write the figures here (JSON)")
    p.add_argument("--measure-child", nargs=1, metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size < 32:
        p.error(f"argument --size: at least 32 (keras.applications); received {args.size}")
    sizes = args.memory_batch_sizes
    if len(sizes) < 2 or list(sizes) != sorted(set(sizes)):
        p.error(f"argument --memory-batch-sizes: two or more increasing sizes; received {sizes}")
    return args


def build(name: str, size: int, classes: int = 10) -> keras.Model:
    """The application, or the KerasHub backbone with a head, with random
    weights (no download)."""
    if name not in HUB:
        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=classes
        )
    import keras_hub

    cls, config = HUB[name]
    backbone = getattr(keras_hub.models, cls)(**config, image_shape=(size, size, 3))
    inputs = keras.Input((size, size, 3))
    features = backbone(inputs)
    if isinstance(features, dict):  # HGNetV2: one output per stage
        features = features[list(features)[-1]]
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(pooled),
                       name=name.removeprefix("hub:"))


def variant_model(name: str, size: int, variant: str):
    """The stock model, or its conversion with the variant's bits, and the report."""
    model = build(name, size)
    if variant == "stock":
        return model, None
    bits, _, bn_bits = variant.partition("+bn")
    bits = None if bits == "none" else int(bits)
    return keras_blpa.convert(model, bits=bits, bn_bits=int(bn_bits) if bn_bits else None,
                              return_report=True)


def backward_peak(model, batch_size: int, steps: int = 3) -> int:
    """Peak memory (bytes) of a compiled forward + backward pass, the lowest of
    `steps` after two warm-up calls.

    `profiling.peak_step_memory` without the optimizer: each weight gradient
    is reduced to a number as soon as it exists, so the gradients of all
    weights (4 bytes a parameter; 100 MB for ResNet50V2) are never alive
    together. In a full training step they are, at the end of the backward
    pass, and with 25M-parameter nets on 64x64 inputs that, not the
    activations, sets the peak at small batch sizes: the peak's slope then
    under-counts the activations (see the README).
    """
    device = profiling.memory_device()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_weights)
        return loss + tf.add_n([tf.reduce_sum(g * g) for g in grads])

    x = tf.constant(np.random.default_rng(0).normal(
        size=(batch_size, *model.input_shape[1:])).astype("float32"))
    y = tf.zeros((batch_size,), tf.int32)
    step(x, y)
    step(x, y)
    peaks = []
    for _ in range(steps):
        tf.config.experimental.reset_memory_stats(device)
        step(x, y).numpy()
        peaks.append(tf.config.experimental.get_memory_info(device)["peak"])
    return min(peaks)


def measure(name: str, size: int, variant: str, batch_sizes, steps: int) -> dict:
    """Per-sample slope of `backward_peak` between two batch sizes, in this
    process; on JAX, of XLA's temp buffer of the compiled training step
    (`profiling.jax_step_temp_bytes`)."""
    model, report = variant_model(name, size, variant)
    if keras.backend.backend() == "jax":
        peaks = [profiling.jax_step_temp_bytes(model, b) for b in batch_sizes]
    else:
        # A discarded first trace: the first traced step of a converted
        # ResNet50V2 with bits=None (compiled op) often peaked ~90 MB higher
        # than later traces, whatever its batch size, which skewed the slope
        # (see the README; the jump is not fully understood).
        backward_peak(model, batch_sizes[0], 1)
        peaks = [backward_peak(model, b, steps) for b in batch_sizes]
    span = (batch_sizes[-1] - batch_sizes[0]) * 2**20
    result = {"model": name, "size": size, "variant": variant, "batch_sizes": list(batch_sizes),
              "peak_bytes": peaks, "mib_per_sample": (peaks[-1] - peaks[0]) / span,
              "step_slopes": [(p1 - p0) / (b1 - b0) / 2**20 for b0, b1, p0, p1 in zip(
                  batch_sizes, batch_sizes[1:], peaks, peaks[1:])],
              "params": model.count_params()}
    result["backend"] = keras.backend.backend()
    if report is not None and report.fused:
        result["saved_mib_per_sample"] = profiling.saved_bytes_per_sample(model) / 2**20
    return result


def measure_in_subprocess(args, name: str, variant: str) -> dict:
    """`measure` in fresh processes (allocator state matters), the lowest of
    `--memory-repeats`, as `keras_blpa.profiling` measures: TensorFlow's BFC
    allocator (counts every tensor) and every op in the calling thread."""
    command = [sys.executable, os.path.abspath(__file__), "--model", name,
               "--size", str(args.size), "--memory-steps", str(args.memory_steps),
               "--memory-batch-sizes", *map(str, args.memory_batch_sizes),
               "--measure-child", variant]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CPU_ALLOCATOR_USE_BFC="true")
    runs = []
    for _ in range(args.memory_repeats):
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {name} {variant}: {runs[-1]['mib_per_sample']:.2f} MiB/sample "
              f"({time.time() - start:.0f} s)", flush=True)
    return min(runs, key=lambda r: r["mib_per_sample"])


def child(args) -> None:
    if keras.backend.backend() == "jax":  # XLA's own account: nothing to set up
        print(json.dumps(measure(args.model, args.size, args.measure_child[0],
                                 args.memory_batch_sizes, args.memory_steps)))
        return
    tf.config.threading.set_inter_op_parallelism_threads(-1)
    if profiling.memory_device() == "CPU:0":
        # One BFC region up front, so chunk addresses (and the peak) do not
        # depend on where the pool grew (see keras_blpa.profiling).
        profiling.reserve_cpu_pool()
    print(json.dumps(measure(args.model, args.size, args.measure_child[0],
                             args.memory_batch_sizes, args.memory_steps)))


def memory_table(args, names) -> str:
    b0, b1 = args.memory_batch_sizes[0], args.memory_batch_sizes[-1]
    bn = "" if args.bn_bits == "none" else f"4+bn{args.bn_bits}"
    columns = ("stock", "none", "4") + ((bn,) if bn else ())
    best = bn or "4"
    header = f" | 4-bit, bn_bits={args.bn_bits}" if bn else ""
    ratios = " | 4-bit vs stock" + (f" | bn_bits={args.bn_bits} vs stock" if bn else "")
    rows = [f"| model ({args.size}x{args.size}) | params | chains fused / left stock "
            f"| stock | fused, bits=None | BLPA 4-bit{header}{ratios} "
            "| of which codes (computed) |",
            "|---|---|---|---|---|---|---|---|" + ("---|---|" if bn else "")]
    summary = {}
    for name in names:
        _, report = variant_model(name, args.size, best)
        mem = {"stock": measure_in_subprocess(args, name, "stock")}
        for variant in columns[1:]:
            # A model without BNs outside the chains converts the same with bn_bits.
            if report.fused and (variant != bn or report.approximated):
                mem[variant] = measure_in_subprocess(args, name, variant)
        summary[name] = mem
        cells = [f"{mem[v]['mib_per_sample']:.2f}" if v in mem else
                 ("(= 4-bit)" if v == bn and "4" in mem else "(= stock)") for v in columns]
        stock = mem["stock"]["mib_per_sample"]
        shown = ["4"] + ([bn] if bn else [])
        ratio_cells = [f"{stock / mem.get(v, mem.get('4', mem['stock']))['mib_per_sample']:.1f}x "
                       "less" for v in shown]
        last = mem.get(best, mem.get("4", mem["stock"]))
        rows.append(
            f"| {name} | {mem['stock']['params'] / 1e6:.1f}M | {len(report.fused)} / "
            f"{len(report.left)} | {' | '.join(cells)} | {' | '.join(ratio_cells)} | "
            f"{last.get('saved_mib_per_sample', 0):.2f} |"
        )
    if keras.backend.backend() == "jax":
        rows.append(f"\nMiB per sample (JAX): slope of XLA's temp buffer of the compiled "
                    f"training step from batch {b0} to {b1}.")
    else:
        rows.append(f"\nMiB per sample: slope of the peak memory of a forward + backward "
                    f"pass from batch {b0} to {b1}, lowest of {args.memory_steps} steps and "
                    f"{args.memory_repeats} fresh processes per figure.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return "\n".join(rows)


class BatchLosses(keras.callbacks.Callback):
    """Each step's loss (fit logs the running mean of the epoch)."""

    def __init__(self):
        super().__init__()
        self.losses, self._total = [], 0.0

    def on_train_batch_end(self, batch, logs=None):
        total = logs["loss"] * (batch + 1)
        self.losses.append(float(total - self._total))
        self._total = total


def load_data(args, count: int):
    """Fashion-MNIST as `size`x`size`x3 batches, and a small test set."""
    source = "subset" if args.dataset.endswith("subset") else "auto"
    (x, y), (x_test, y_test), description = datasets.load_fashion_mnist(source)
    x, y = x[:count], y[:count]
    mean, std = x.mean(), x.std()

    def prepare(images, labels):
        images = tf.image.resize((images - mean) / std, (args.size, args.size))
        return tf.repeat(images, 3, axis=-1), labels

    train = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
             .repeat().batch(args.batch_size).map(prepare))
    test = tf.data.Dataset.from_tensor_slices((x_test[:512], y_test[:512])).batch(128).map(
        prepare)
    return train, test, f"{description}: {len(x):,} training images, 512 test images"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.measure_child:
        child(args)
        return {}
    if args.table:
        table = memory_table(args, args.table)
        print("\n" + table)
        return {"table": table}
    keras.utils.set_random_seed(0)
    original = build(args.model, args.size)
    bits = None if args.bits == "none" else int(args.bits)
    bn_bits = None if args.bn_bits == "none" else int(args.bn_bits)
    start = time.time()
    model, report = keras_blpa.convert(original, bits=bits, bn_bits=bn_bits,
                                       return_report=True)
    print(f"Converted {args.model} ({args.size}x{args.size}, weights=None) in "
          f"{time.time() - start:.1f} s")
    if args.full_report:
        print(report)
    else:
        print(str(report).splitlines()[0])
        for chain in report.left:
            print(f"  left stock: {' -> '.join(chain.layers)}: {chain.reason}")
        if bn_bits is not None:
            print(f"  {len(report.approximated)} BatchNormalization layers outside the chains "
                  f"keep a {bn_bits}-bit input code (ApproxBatchNormalization)")
    summary = {"model": args.model, "size": args.size, "bits": bits,
               "fused": len(report.fused), "left": len(report.left)}
    if report.fused:
        saved = profiling.saved_bytes_per_sample(model) / 2**20
        summary["saved_mib_per_sample"] = saved
        print(f"Saved activations of the fused layers (computed): {saved:.2f} MiB/sample")
    if not args.no_memory:
        b0, b1 = args.memory_batch_sizes[0], args.memory_batch_sizes[-1]
        print(f"Activation memory: slope of the peak memory of a forward + backward pass "
              f"from batch {b0} to {b1}, a fresh process each", flush=True)
        variant = ("none" if bits is None else str(bits)) + (f"+bn{bn_bits}" if bn_bits else "")
        stock = measure_in_subprocess(args, args.model, "stock")["mib_per_sample"]
        fused = measure_in_subprocess(args, args.model, variant)["mib_per_sample"]
        summary.update(stock_mib_per_sample=stock, converted_mib_per_sample=fused)
        print(f"Memory: {stock:.2f} MiB/sample stock, {fused:.2f} converted: "
              f"{stock / fused:.1f}x less, {stock - fused:.2f} MiB/sample saved")
    train, test, line = load_data(args, count=max(args.steps * args.batch_size, 256))
    print(f"Data: {line}")
    model.compile(keras.optimizers.Adam(args.lr),
                  keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    losses = BatchLosses()
    start = time.time()
    model.fit(train, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=[losses],
              shuffle=False)
    seconds = time.time() - start
    k = max(1, min(5, args.steps // 4))
    first, last = float(np.mean(losses.losses[:k])), float(np.mean(losses.losses[-k:]))
    summary.update(train_losses=losses.losses, train_seconds=seconds)
    print(f"Fine-tuned {args.steps} steps at batch {args.batch_size} in {seconds:.0f} s: "
          f"training loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k})")
    if args.steps >= 200:
        # BN's moving statistics (momentum 0.99) need a few hundred steps
        # before inference-mode figures of a network trained from scratch mean much.
        summary["test_accuracy"] = model.evaluate(test, verbose=0)[1]
        print(f"Test accuracy: {summary['test_accuracy']:.3f}")
    standard = keras_blpa.to_standard(model)
    x = next(iter(test))[0][:8]
    gap = float(np.abs(standard(x) - model(x)).max())
    summary["to_standard_max_difference"] = gap
    print(f"keras_blpa.to_standard(model): stock layers, same outputs (max difference {gap:.1e})")
    return summary


if __name__ == "__main__":
    main()
