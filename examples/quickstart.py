"""Train a BLPA pre-activation ResNet on real data and report memory and accuracy.

The README's main job. By default it trains on Fashion-MNIST, offline (the
Debian package `dataset-fashion-mnist` when installed, else the subset shipped
with keras_blpa), a 4-bit BLPA ResNet-29 next to the exact (bits=None) one,
then measures the activation memory (MiB per sample) of each and of stock
Keras layers, and prints a table: test accuracy, measured memory, and the
part of it that the saved activations take (computed exactly), which is the
part that grows with depth.

Progress goes to stdout as it happens; the CSV logs (`train_<variant>.csv`)
and `summary.json` go to `runs/quickstart/` (git-ignored; `--out` moves them).

    python examples/quickstart.py
    python examples/quickstart.py --dataset fashion_mnist_subset   # the shipped subset
    python examples/quickstart.py --dataset cifar10 --depth 56 --epochs 10
    python examples/quickstart.py --seeds 3      # the spread over seeds too
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_blpa import datasets, profiling, training  # noqa: E402
from keras_blpa.models import preact_resnet_cifar  # noqa: E402

EXACT = "exact (bits=None)"
STOCK = "stock Keras layers (not trained)"
# Memory is the slope of peak step memory between these batch sizes, the
# lowest peak of MEMORY_STEPS steps at each (see keras_blpa.profiling).
MEMORY_BATCH_SIZES = (8, 40)
MEMORY_STEPS = 5
# A deeper net whose saved bytes are computed too (the paper's CIFAR ResNet).
PROJECTION_DEPTH = 164


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist",
                   choices=["fashion_mnist", "fashion_mnist_subset", "cifar10", "cifar100"],
                   help="fashion_mnist: the Debian package if installed, else the subset")
    p.add_argument("--depth", type=training.cifar_depth, default=29,
                   help="9n+2: 11, 20, 29 (default), ..., 164")
    p.add_argument("--width", type=training.positive_float, default=1.0,
                   help="channel multiplier (default 1)")
    p.add_argument("--bits", type=int, nargs="+", default=[4], choices=[4, 8],
                   help="BLPA bit widths to train (default 4)")
    p.add_argument("--no-exact", action="store_true", help="skip the bits=None baseline")
    p.add_argument("--epochs", type=training.positive_int, default=2)
    p.add_argument("--batch-size", type=training.positive_int, default=128)
    p.add_argument("--train-size", type=training.non_negative_int, default=12000,
                   help="training images used (Fashion-MNIST; 0 = all)")
    p.add_argument("--lr", type=training.positive_float, default=0.1)
    p.add_argument("--seed", type=training.non_negative_int, default=0,
                   help="first seed (initial weights and data order; default 0)")
    p.add_argument("--seeds", type=training.positive_int, default=1,
                   help="seeds trained per variant, from --seed up (default 1); with more "
                   "than one the report gives the spread over seeds")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--memory-repeats", type=training.positive_int, default=3,
                   help="fresh processes per memory figure; the lowest is reported (default 3)")
    p.add_argument("--progress-seconds", type=training.positive_float, default=15.0,
                   help="seconds between training progress lines (default 15)")
    p.add_argument("--out", default=os.path.join("runs", "quickstart"),
                   help="folder for the CSV logs and summary.json (default runs/quickstart)")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> dict:
    """The data, its shape and a `Data:` line that says how many images are used."""
    if args.dataset.startswith("fashion_mnist"):
        source = "subset" if args.dataset.endswith("subset") else "auto"
        (x, y), (x_test, y_test), description = datasets.load_fashion_mnist(source)
        available = len(x)
        if args.train_size:
            x, y = x[: args.train_size], y[: args.train_size]
        mean, std = x.mean(), x.std()
        x, x_test = (x - mean) / std, (x_test - mean) / std
        used = f"{len(x):,} of {available:,} training images" if len(x) < available else (
            f"all {available:,} training images")

        def train(seed: int) -> tf.data.Dataset:
            # Reshuffled every epoch, like fit(x, y, shuffle=True); a new
            # pipeline per run, so that runs of one seed see the same order.
            return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
                    .batch(args.batch_size).prefetch(tf.data.AUTOTUNE))

        test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)
        return dict(
            train=train, test=test, labels=y_test, same_order=True, classes=10,
            shape=x.shape[1:],
            steps=math.ceil(len(x) / args.batch_size),
            line=f"{description}: {used}, {len(x_test):,} test images",
        )
    train, test, classes = datasets.cifar(args.dataset, args.batch_size)
    labels = np.concatenate([y.numpy() for _, y in test])
    return dict(
        train=lambda seed: train, test=test, labels=labels, same_order=False,
        classes=classes, shape=(32, 32, 3),
        steps=50_000 // args.batch_size,
        line=f"{args.dataset} (tfds): 50,000 training images, 10,000 test images",
    )


def label_of(variant: str) -> str:
    return EXACT if variant == "none" else f"BLPA {variant}-bit"


def prepare_op() -> str:
    """Builds (once, cached) and loads the compiled op before anything is timed."""
    if keras.backend.backend() == "jax":
        from keras_blpa.backend.jax import kernels as jax_kernels

        start = time.time()
        platforms = jax_kernels.load()
        seconds = time.time() - start
        if jax_kernels.enabled() and jax_kernels.platform() in platforms:
            return (f"XLA custom calls: ready in {seconds:.0f} s (JAX backend, "
                    f"{jax_kernels.platform()}; every step is jit-compiled)")
        why = jax_kernels.load_error() or f"not enabled on {jax_kernels.platform()}"
        return (f"XLA custom calls: not used here ({why}); the 4/8-bit runs use the jnp "
                "quantizer, the same codes")
    from keras_blpa import ops
    from keras_blpa.backend.tensorflow import kernels

    start = time.time()
    implementation = ops.implementation()
    seconds = time.time() - start
    if implementation == "custom_op":
        return (f"Compiled op: ready in {seconds:.0f} s (built on first use for this "
                "TensorFlow, then loaded from the cache)")
    return (f"Compiled op: unavailable ({kernels.load_error() or 'disabled'}); "
            "the 4/8-bit runs use the pure-TF quantizer, the same codes, slower")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(prepare_op(), flush=True)
    data = load(args)
    shape = data["shape"]
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"Data: {data['line']}, {'x'.join(map(str, shape))}")
    print(f"Model: pre-activation ResNet-{args.depth}, width {args.width:g}; {args.epochs} "
          f"epochs of {data['steps']} steps at batch {args.batch_size}; seed"
          f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
          f"logs in {args.out}/", flush=True)
    variants = [str(b) for b in dict.fromkeys(args.bits)] + ([] if args.no_exact else ["none"])
    summary = {"dataset": data["line"], "depth": args.depth, "width": args.width,
               "epochs": args.epochs, "seeds": seeds, "variants": {}}
    correct = {}  # (label, seed) -> which test images the model got right
    for variant in variants:
        label = label_of(variant)
        runs = []
        for seed in seeds:
            keras.utils.set_random_seed(seed)
            model = preact_resnet_cifar(args.depth, width=args.width, classes=data["classes"],
                                        input_shape=shape, **profiling.variant_options(variant))
            training.compile_for_training(model, data["steps"], args.epochs, base_lr=args.lr)
            print(f"\n== Training {label}, seed {seed}: {model.count_params():,} parameters "
                  "(the first step includes tracing)", flush=True)
            suffix = "" if len(seeds) == 1 else f"_seed{seed}"
            log = training.callbacks(os.path.join(args.out, f"train_{variant}{suffix}.csv"),
                                     progress_seconds=args.progress_seconds)
            start = time.time()
            # The test set is evaluated once, after training: per-epoch validation
            # on Fashion-MNIST's 10,000 test images cost ~10 s per epoch and was
            # followed by a 20-40 s stall before the next epoch's first step.
            # shuffle=False: the pipeline shuffles itself (fit's own shuffle
            # applies to arrays only, and warns for datasets).
            model.fit(data["train"](seed), epochs=args.epochs, callbacks=log, verbose=2,
                      shuffle=False)
            seconds = time.time() - start
            # A plain forward per batch: `predict` retraces for every new model.
            predicted = np.concatenate([np.argmax(model(x, training=False), axis=-1)
                                        for x, _ in data["test"]])
            correct[label, seed] = predicted == data["labels"]
            runs.append((float(correct[label, seed].mean()), seconds))
        summary["variants"][label] = {
            "test_accuracy": float(np.mean([accuracy for accuracy, _ in runs])),
            "test_accuracy_runs": [accuracy for accuracy, _ in runs],
            "train_seconds": float(np.mean([seconds for _, seconds in runs])),
            # Exact: the fused layers' input shapes times the bytes per element.
            "saved_mib_per_sample": profiling.saved_bytes_per_sample(model) / 2**20,
        }
    if not args.no_exact:
        summary["comparison"] = compare(correct, seeds, data["same_order"])
    if args.depth < PROJECTION_DEPTH:
        summary["projection"] = project(args, shape, data["classes"], variants)
    if not args.no_memory:
        measure_memory(args, shape, data["classes"], variants, summary)
    print("\n" + report(summary))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def compare(correct: dict, seeds: list[int], same_order: bool) -> dict:
    """Each BLPA variant's test accuracy minus exact's, paired seed by seed
    (same initial weights and data order) and image by image.

    `test_half_width_95` is how far the difference could move from which test
    images were drawn alone (1.96 standard errors of the mean of the per-image
    differences); `seed_range` is the spread over seeds, training noise,
    which that interval does not include.
    """
    out = {}
    for label in {label for label, _ in correct} - {EXACT}:
        per_image = np.concatenate([
            correct[label, seed].astype(float) - correct[EXACT, seed] for seed in seeds])
        by_seed = [float(np.mean(correct[label, seed]) - np.mean(correct[EXACT, seed]))
                   for seed in seeds]
        out[label] = {
            "difference": float(per_image.mean()),
            "test_half_width_95": float(1.96 * per_image.std(ddof=1) / np.sqrt(len(per_image))),
            "by_seed": by_seed,
            "test_images": len(correct[EXACT, seeds[0]]),
            "same_data_order": same_order,
        }
    return out


def comparison_lines(comparison: dict) -> list[str]:
    """What the paired comparison can and cannot show, in words."""
    lines = []
    for label, c in sorted(comparison.items()):
        seeds = len(c["by_seed"])
        paired = "same initial weights" + (" and data order" if c["same_data_order"] else "")
        line = (f"{label} - exact: {c['difference']:+.3f} test accuracy "
                f"({seeds} seed{'s' if seeds > 1 else ''}, paired: {paired}, the same "
                f"{c['test_images']:,} test images). The choice of test images alone moves "
                f"this by up to +-{c['test_half_width_95']:.3f} (95%)")
        if seeds > 1:
            line += (f"; over seeds it ranged from {min(c['by_seed']):+.3f} to "
                     f"{max(c['by_seed']):+.3f}.")
        else:
            line += ("; training noise adds to that and one seed cannot measure it: "
                     "--seeds 3 gives the spread over seeds.")
        if abs(c["difference"]) <= c["test_half_width_95"]:
            line += " Within that range, this run cannot tell the two apart."
        lines.append(line)
    return lines


def project(args: argparse.Namespace, shape, classes: int, variants: list[str]) -> dict:
    """Saved MiB per sample of the same net at `PROJECTION_DEPTH` (built, not trained)."""
    deep = preact_resnet_cifar(PROJECTION_DEPTH, width=args.width, classes=classes,
                               input_shape=shape, bits=None)
    elements = profiling.saved_bytes_per_sample(deep) / profiling.SAVED_BYTES_PER_ELEMENT[None]
    saved = {}
    for variant in variants:
        bits = profiling.variant_options(variant)["bits"]
        saved[label_of(variant)] = elements * profiling.SAVED_BYTES_PER_ELEMENT[bits] / 2**20
    return {"depth": PROJECTION_DEPTH, "saved_mib_per_sample": saved}


def measure_memory(args: argparse.Namespace, shape, classes: int, variants: list[str],
                   summary: dict) -> None:
    """Lowest of `--memory-repeats` fresh processes per variant (and of their steps)."""
    todo = [*variants, "stock"]
    if keras.backend.backend() == "jax":
        return measure_jax_memory(args, shape, classes, todo, summary)
    print(f"\n== Activation memory: {len(todo)} variants x {args.memory_repeats} fresh "
          f"processes, slope of peak step memory from batch {MEMORY_BATCH_SIZES[0]} to "
          f"{MEMORY_BATCH_SIZES[1]} (untrained models)", flush=True)
    for variant in todo:
        # Single runs moved by 20% with load on the machine: see "Stable
        # figures on a CPU" in keras_blpa/profiling.py.
        mem = profiling.measure_in_subprocess(
            model="cifar", variant=variant, depth=args.depth, width=args.width,
            channels=shape[-1], size=shape[0], classes=classes,
            batch_sizes=MEMORY_BATCH_SIZES, repeats=args.memory_repeats, steps=MEMORY_STEPS,
            inter_op_threads=-1, cpu_bfc=True, aggregate="min",
            progress=lambda line: print(f"  {line}", flush=True),
        )
        figures = {"activation_mib_per_sample": mem["mib_per_sample"],
                   "activation_mib_per_sample_runs": mem["mib_per_sample_runs"]}
        if variant == "stock":
            summary["stock_keras_mib_per_sample"] = mem["mib_per_sample"]
            summary["stock_keras_runs"] = mem["mib_per_sample_runs"]
        else:
            summary["variants"][label_of(variant)].update(figures)
    runs = [summary["stock_keras_runs"]] + [
        r["activation_mib_per_sample_runs"] for r in summary["variants"].values()]
    spread = max((max(r) - min(r)) / min(r) for r in runs)
    summary["memory_method"] = (
        f"slope of peak training-step memory from batch {MEMORY_BATCH_SIZES[0]} to "
        f"{MEMORY_BATCH_SIZES[1]}, the lowest of {MEMORY_STEPS} steps in each of "
        f"{args.memory_repeats} fresh processes (the op order that needs least; the "
        f"highest run was {100 * spread:.0f}% above)"
    )


def measure_jax_memory(args: argparse.Namespace, shape, classes: int, todo: list[str],
                       summary: dict) -> None:
    """On JAX: XLA's temp buffer of the compiled training step, its slope
    (`profiling.jax_temp_slope`); deterministic, so one run per variant."""
    print(f"\n== Activation memory: {len(todo)} variants, slope of XLA's temp buffer of the "
          f"compiled step from batch {MEMORY_BATCH_SIZES[0]} to {MEMORY_BATCH_SIZES[1]}",
          flush=True)
    for variant in todo:
        mem = profiling.jax_temp_slope(
            batch_sizes=MEMORY_BATCH_SIZES, model="cifar", variant=variant, depth=args.depth,
            width=args.width, channels=shape[-1], size=shape[0], classes=classes)
        print(f"  {variant}: {mem['mib_per_sample']:.3f} MiB/sample", flush=True)
        figures = {"activation_mib_per_sample": mem["mib_per_sample"],
                   "activation_mib_per_sample_runs": [mem["mib_per_sample"]]}
        if variant == "stock":
            summary["stock_keras_mib_per_sample"] = mem["mib_per_sample"]
            summary["stock_keras_runs"] = [mem["mib_per_sample"]]
        else:
            summary["variants"][label_of(variant)].update(figures)
    summary["memory_method"] = (
        f"slope of XLA's temp buffer of the compiled training step (memory_analysis) from "
        f"batch {MEMORY_BATCH_SIZES[0]} to {MEMORY_BATCH_SIZES[1]}, JAX backend"
    )


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(summary: dict) -> str:
    """The results table, and what the memory figures mean with depth."""
    variants = summary["variants"]
    stock = summary.get("stock_keras_mib_per_sample")
    rows = ["| variant | test accuracy | activation memory, measured (MiB/sample) "
            "| of which saved activations (computed) | train time (s) |",
            "|---|---|---|---|---|"]
    for label, r in variants.items():
        rows.append(f"| {label} | {r['test_accuracy']:.4f} | "
                    f"{_f(r.get('activation_mib_per_sample'))} | "
                    f"{_f(r['saved_mib_per_sample'])} | {r['train_seconds']:.0f} |")
    if stock:
        rows.append(f"| {STOCK} | - | {stock:.3f} | - | - |")
    rows.append("")
    measured = {k: r["activation_mib_per_sample"] for k, r in variants.items()
                if "activation_mib_per_sample" in r}
    exact = measured.get(EXACT)
    for label, mem in measured.items():
        versus = [f"{exact / mem:.1f}x less than exact"] if exact and label != EXACT else []
        versus += [f"{stock / mem:.1f}x less than stock Keras layers"] if stock else []
        if versus:
            rows.append(f"{label}: {', '.join(versus)}.")
    if summary.get("comparison"):
        rows += comparison_lines(summary["comparison"])
    if measured:
        rows.append(f"Measured: {summary.get('memory_method', '')}.")
    projection = summary.get("projection")
    if not projection:
        return "\n".join(rows)
    depth = projection["depth"]
    rows += [
        "",
        "The saved activations grow with depth; the rest of the measured figure, one unit's "
        "backward working memory, does not. The same net at depth "
        f"{depth} (built, not trained), saved activations computed:",
        f"| variant | saved, depth {summary['depth']} (MiB/sample) | saved, depth {depth} |",
        "|---|---|---|",
    ]
    deep = projection["saved_mib_per_sample"]
    for label, deep_saved in deep.items():
        rows.append(f"| {label} | {_f(variants[label]['saved_mib_per_sample'])} | "
                    f"{_f(deep_saved)} |")
    if EXACT in deep:
        for label, deep_saved in deep.items():
            if label != EXACT:
                rows.append(f"{label} saves {deep[EXACT] / deep_saved:.1f}x less than exact "
                            "at any depth; the measured ratio approaches that as depth grows.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
