"""The paper's accuracy table at small scale: exact vs BLPA 8/4-bit vs naive 8-bit.

Trains the same pre-activation ResNet as
  exact        bits=None
  blpa8        BLPA 8-bit
  blpa4        BLPA 4-bit
  naive8       naive 8-bit (quantized forward pass, also at inference)
  quarter      exact with 1/4 of the features (width 0.25)
with several seeds on Fashion-MNIST (offline) or CIFAR-10 (tfds), and writes
test error mean +- std per variant and depth (markdown + JSON) and a plot of
the training curves. `--fidelity` instead reports per-layer cosine similarity
and relative error of weight gradients at 8 and 4 bits against exact ones, on
a partly trained model.

    python benchmarks/accuracy.py --depths 29 56 110 --seeds 3 --epochs 3 \\
        --train-size 20000 --out benchmarks/results/accuracy
    python benchmarks/accuracy.py --fidelity --depths 56 --out benchmarks/results/accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_blpa import datasets, training  # noqa: E402
from keras_blpa.layers.base import BNReLUBase  # noqa: E402
from keras_blpa.models import preact_resnet_cifar  # noqa: E402

VARIANTS = {
    "exact": dict(bits=None),
    "blpa8": dict(bits=8),
    "blpa4": dict(bits=4),
    "naive8": dict(bits=8, naive=True),
    "quarter": dict(bits=None, width=0.25),
}


def load(args):
    if args.dataset == "fashion_mnist":
        (x, y), (xt, yt), desc = datasets.load_fashion_mnist()
        if args.train_size:
            x, y = x[: args.train_size], y[: args.train_size]
        mean, std = x.mean(), x.std()
        return ((x - mean) / std, y), ((xt - mean) / std, yt), 10, desc
    train, test, classes = datasets.cifar(args.dataset, args.batch_size)
    return train, test, classes, f"{args.dataset} (tfds)"


def build(variant: str, depth: int, classes: int, shape) -> keras.Model:
    options = dict(VARIANTS[variant])
    width = options.pop("width", 1.0)
    return preact_resnet_cifar(depth, width=width, classes=classes, input_shape=shape, **options)


def train_one(args, data, variant, depth, seed) -> dict:
    (train, test, classes, _) = data
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    shape = train[0].shape[1:] if isinstance(train, tuple) else (32, 32, 3)
    model = build(variant, depth, classes, shape)
    steps = (len(train[0]) // args.batch_size) if isinstance(train, tuple) else 50_000 // 128
    training.compile_for_training(model, steps, args.epochs, base_lr=args.lr)
    start = time.time()
    if isinstance(train, tuple):
        hist = model.fit(*train, batch_size=args.batch_size, epochs=args.epochs,
                         validation_data=test, verbose=2)
        _, acc = model.evaluate(*test, batch_size=256, verbose=0)
    else:
        hist = model.fit(train, epochs=args.epochs, validation_data=test, verbose=2)
        _, acc = model.evaluate(test, verbose=0)
    return {"variant": variant, "depth": depth, "seed": seed,
            "test_error": 100 * (1 - float(acc)), "seconds": time.time() - start,
            "history": {k: [float(v) for v in vs] for k, vs in hist.history.items()}}


def summarize(runs: list[dict]) -> str:
    depths = sorted({r["depth"] for r in runs})
    lines = ["| variant | " + " | ".join(f"ResNet-{d} test error (%)" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for variant in VARIANTS:
        cells = []
        for d in depths:
            errs = [r["test_error"] for r in runs if r["variant"] == variant and r["depth"] == d]
            cells.append("-" if not errs else
                         f"{np.mean(errs):.2f} +- {np.std(errs):.2f} (n={len(errs)})")
        if any(c != "-" for c in cells):
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    depths = sorted({r["depth"] for r in runs})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4), squeeze=False)
    colors = dict(zip(VARIANTS, ["k", "tab:blue", "tab:green", "tab:red", "tab:gray"]))
    for ax, d in zip(axes[0], depths):
        for r in runs:
            if r["depth"] == d:
                ax.plot(r["history"]["loss"], color=colors[r["variant"]], alpha=0.6,
                        label=r["variant"] if r["seed"] == 0 else None)
                ax.plot(r["history"]["val_loss"], color=colors[r["variant"]], ls="--", alpha=0.6)
        ax.set(title=f"ResNet-{d}: train (solid) / test (dashed) loss", xlabel="epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fidelity(args, data) -> str:
    """Per-layer weight-gradient agreement of 8/4-bit with exact, same weights."""
    (train, _, classes, _) = data
    x, y = train[0][: args.batch_size], train[1][: args.batch_size]
    keras.utils.set_random_seed(0)
    depth = args.depths[0]
    exact = build("exact", depth, classes, x.shape[1:])
    training.compile_for_training(exact, len(train[0]) // args.batch_size, 1, base_lr=args.lr)
    exact.fit(*train, batch_size=args.batch_size, epochs=args.fidelity_epochs, verbose=2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def grads(model):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        kernels = [layer.kernel for layer in model.layers if isinstance(layer, BNReLUBase)]
        return [g.numpy() for g in tape.gradient(loss, kernels)]

    names = [layer.name for layer in exact.layers if isinstance(layer, BNReLUBase)]
    weights = exact.get_weights()
    reference = grads(exact)
    exact.set_weights(weights)  # undo the moving-statistics update
    rows = ["| layer | cos 8-bit | rel. err 8-bit | cos 4-bit | rel. err 4-bit |",
            "|---|---|---|---|---|"]
    per_bits = {}
    for bits in (8, 4):
        model = build(f"blpa{bits}", depth, classes, x.shape[1:])
        model.set_weights(weights)
        per_bits[bits] = grads(model)
    for i, name in enumerate(names):
        cells = []
        for bits in (8, 4):
            g, r = per_bits[bits][i].ravel(), reference[i].ravel()
            cos = float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r) + 1e-30))
            rel = float(np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-30))
            cells += [f"{cos:.5f}", f"{rel:.4f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist",
                   choices=["fashion_mnist", "cifar10", "cifar100"])
    p.add_argument("--depths", type=int, nargs="+", default=[56])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--fidelity", action="store_true")
    p.add_argument("--fidelity-epochs", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/accuracy")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = load(args)
    command = "python " + " ".join(sys.argv)
    if args.fidelity:
        table = fidelity(args, data)
        print(table)
        with open(os.path.join(args.out, "gradient_fidelity.md"), "w") as f:
            f.write(f"Command: `{command}`\n\n{table}\n")
        return
    raw = os.path.join(args.out, "accuracy.json")
    runs = []
    for depth in args.depths:
        for seed in range(args.seeds):
            for variant in args.variants:
                runs.append(train_one(args, data, variant, depth, seed))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}),
                      flush=True)
                with open(raw, "w") as f:
                    json.dump({"command": command, "dataset": data[3], "runs": runs}, f)
    table = summarize(runs)
    print(table)
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write(f"Command: `{command}`\n\nData: {data[3]}\n\n{table}\n")
    plot(runs, os.path.join(args.out, "training_curves.png"))


if __name__ == "__main__":
    main()
