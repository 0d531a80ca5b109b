"""Train a BLPA pre-activation ResNet on real data and report memory and accuracy.

The README's main job. By default it trains on Fashion-MNIST, offline (the
Debian package `dataset-fashion-mnist` when installed, else the subset shipped
with keras_blpa), a 4-bit BLPA ResNet next to the exact (bits=None) one, then
prints test accuracy and the measured activation memory (MiB per sample) of
each. `--dataset cifar10` trains on CIFAR-10 from tfds instead.

    python examples/quickstart.py
    python examples/quickstart.py --dataset cifar10 --depth 56 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_blpa import datasets, profiling, training  # noqa: E402
from keras_blpa.models import preact_resnet_cifar  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist",
                   choices=["fashion_mnist", "fashion_mnist_subset", "cifar10", "cifar100"])
    p.add_argument("--depth", type=int, default=29, help="9n+2 (default 29)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--bits", type=int, nargs="+", default=[4],
                   help="BLPA bit widths to train (default 4)")
    p.add_argument("--no-exact", action="store_true", help="skip the bits=None baseline")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=12000,
                   help="training images used (Fashion-MNIST; 0 = all)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--out", default="quickstart_out", help="folder for CSV logs and summary")
    return p.parse_args(argv)


def load(args):
    if args.dataset.startswith("fashion_mnist"):
        source = "subset" if args.dataset.endswith("subset") else "auto"
        (x, y), (x_test, y_test), description = datasets.load_fashion_mnist(source)
        if args.train_size:
            x, y = x[: args.train_size], y[: args.train_size]
        mean, std = x.mean(), x.std()
        x, x_test = (x - mean) / std, (x_test - mean) / std
        return (x, y), (x_test, y_test), 10, x.shape[1:], len(x) // args.batch_size, description
    train, test, classes = datasets.cifar(args.dataset, args.batch_size)
    return train, test, classes, (32, 32, 3), 50_000 // args.batch_size, f"{args.dataset} (tfds)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, test, classes, shape, steps, description = load(args)
    print(f"Data: {description}; model: pre-activation ResNet-{args.depth}, "
          f"width {args.width:g}, {args.epochs} epochs")
    variants = [str(b) for b in args.bits] + ([] if args.no_exact else ["none"])
    summary = {"dataset": description, "depth": args.depth, "epochs": args.epochs,
               "variants": {}}
    for variant in variants:
        keras.utils.set_random_seed(args.seed)
        options = profiling.variant_options(variant)
        model = preact_resnet_cifar(args.depth, width=args.width, classes=classes,
                                    input_shape=shape, **options)
        training.compile_for_training(model, steps, args.epochs, base_lr=args.lr)
        label = "exact (bits=None)" if variant == "none" else f"BLPA {variant}-bit"
        print(f"\n== {label}: {model.count_params():,} parameters")
        start = time.time()
        log = training.callbacks(os.path.join(args.out, f"train_{variant}.csv"))
        if isinstance(train, tuple):
            model.fit(*train, batch_size=args.batch_size, epochs=args.epochs,
                      validation_data=test, callbacks=log, verbose=2)
            _, accuracy = model.evaluate(*test, batch_size=256, verbose=0)
        else:
            model.fit(train, epochs=args.epochs, validation_data=test, callbacks=log, verbose=2)
            _, accuracy = model.evaluate(test, verbose=0)
        result = {"test_accuracy": float(accuracy), "train_seconds": time.time() - start}
        if not args.no_memory:
            # Fresh process per variant: allocator state must not carry over.
            mem = profiling.measure_in_subprocess(
                model="cifar", variant=variant, depth=args.depth, width=args.width,
                channels=shape[-1], size=shape[0], classes=classes, batch_sizes=(8, 40),
            )
            result["activation_mib_per_sample"] = mem["mib_per_sample"]
        summary["variants"][label] = result
    if not args.no_memory:
        stock = profiling.measure_in_subprocess(
            model="cifar", variant="stock", depth=args.depth, width=args.width,
            channels=shape[-1], size=shape[0], classes=classes, batch_sizes=(8, 40),
        )
        summary["stock_keras_mib_per_sample"] = stock["mib_per_sample"]
    print("\n" + report(summary))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def report(summary: dict) -> str:
    rows = ["| variant | test accuracy | activation memory (MiB/sample) | train time (s) |",
            "|---|---|---|---|"]
    mems = {}
    for label, r in summary["variants"].items():
        mem = r.get("activation_mib_per_sample")
        mems[label] = mem
        rows.append(f"| {label} | {r['test_accuracy']:.4f} | "
                    f"{'-' if mem is None else f'{mem:.3f}'} | {r['train_seconds']:.0f} |")
    stock = summary.get("stock_keras_mib_per_sample")
    if stock:
        rows.append(f"| stock Keras layers (not trained) | - | {stock:.3f} | - |")
    exact = mems.get("exact (bits=None)")
    rows.append("")
    for label, mem in mems.items():
        if not mem:
            continue
        if exact and label != "exact (bits=None)":
            rows.append(f"{label}: {exact / mem:.1f}x less activation memory than exact "
                        "backprop with the same layers.")
        if stock:
            rows.append(f"{label}: {stock / mem:.1f}x less activation memory than stock "
                        "Keras layers.")
    return "\n".join(rows)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
