"""Gradient fidelity and a short training run of a converted post-activation ResNet.

`keras_blpa.convert` makes each `Add -> ReLU -> Conv` of `keras.applications`'
ResNet50 a `ReLUConv2D` (a one-sided code of the ReLU's input, grid from the
batch's moments) and, with `bn_bits`, each BN outside the chains (the one
before every residual `Add`) an `ApproxBatchNormalization`. This measures
what that costs in gradient quality and in training, on Fashion-MNIST
(offline) resized to `--size` and repeated to 3 channels:

  fidelity  the stock model is trained for `--warmup-steps`, then each
            variant, converted from it, computes the weight gradients of the
            same batch in training mode: cosine and relative error against
            the stock model's, whole network and per layer;
  training  each variant, converted from the same initial weights, trains
            `--train-steps` steps on the same batches: loss curves and
            held-out accuracy (with batch statistics) side by side.

Variants: "stock", and `<bits>` or `<bits>+bn<bn_bits>` ("4", "4+bn8", ...);
"4-no-relu" converts only the BN chains (the ReLU -> Conv units kept stock).

    python benchmarks/post_activation.py --out benchmarks/results/post_activation
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

import keras_blpa  # noqa: E402
from keras_blpa import datasets  # noqa: E402

DEFAULT_VARIANTS = ("none", "8", "4", "4+bn8", "4+bn4", "8+bn8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ResNet50")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--train-variants", nargs="+", default=["stock", "4", "4+bn8"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--out", default=None, help="folder for post_activation.{json,md}")
    return p.parse_args(argv)


def load_data(size: int, batch_size: int, steps: int, seed: int):
    (x, y), (x_test, y_test), description = datasets.load_fashion_mnist("auto")
    count = min(len(x), steps * batch_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))[:count]
    mean, std = x.mean(), x.std()

    def prepare(images):
        images = tf.image.resize((images - mean) / std, (size, size))
        return tf.repeat(images, 3, axis=-1).numpy()

    batches = [(prepare(x[order[i:i + batch_size]]), y[order[i:i + batch_size]])
               for i in range(0, count - batch_size + 1, batch_size)]
    test = (prepare(x_test[:512]), y_test[:512])
    return batches, test, f"{description}: {count:,} training images, 512 test images"


def build(name: str, size: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                             classes=10, classifier_activation=None)


def convert(model: keras.Model, variant: str) -> keras.Model:
    if variant == "stock":
        return _copy(model)
    relu_units = not variant.endswith("-no-relu")
    bits, _, bn_bits = variant.removesuffix("-no-relu").partition("+bn")
    bits = None if bits == "none" else int(bits)
    keep = None if relu_units else (lambda layer: layer.name.endswith("_out")
                                    or layer.name in ("avg_pool", "predictions"))
    return keras_blpa.convert(model, bits=bits, bn_bits=int(bn_bits) if bn_bits else None,
                              keep=keep)


def _copy(model: keras.Model) -> keras.Model:
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def kernel_grads(model: keras.Model, x, y) -> dict[str, np.ndarray]:
    """Gradient of each kernel (by its stock layer's name) on one batch."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    kernels = {}
    for layer in model.layers:
        if hasattr(layer, "kernel") and layer.trainable:
            kernels[layer.name] = layer.kernel
            if getattr(layer, "projection_kernel", None) is not None:
                kernels[_projection_name(model, layer)] = layer.projection_kernel
    grads = tape.gradient(loss, list(kernels.values()))
    return {name: np.asarray(g) for name, g in zip(kernels, grads)}


def _projection_name(model, layer) -> str:
    # keras.applications' ResNets: conv{s}_block1_1_conv's shortcut is conv{s}_block1_0_conv.
    return layer.name.replace("_1_conv", "_0_conv")


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def fidelity(args, batches) -> dict:
    stock = build(args.model, args.size, args.seed)
    stock.compile(keras.optimizers.Adam(args.lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.time()
    for x, y in batches[: args.warmup_steps]:
        stock.train_on_batch(x, y)
    print(f"warm-up: {args.warmup_steps} steps in {time.time() - start:.0f} s", flush=True)
    x, y = batches[args.warmup_steps % len(batches)]
    reference = kernel_grads(_copy(stock), x, y)
    names = list(reference)
    results = {}
    for variant in args.variants:
        grads = kernel_grads(convert(stock, variant), x, y)
        missing = set(names) - set(grads)
        if missing:
            raise RuntimeError(f"{variant}: no gradient for {sorted(missing)[:5]}")
        flat = [np.concatenate([np.ravel(g[n]) for n in names]) for g in (grads, reference)]
        per_layer = {n: _cosine(grads[n], reference[n]) for n in names}
        rel = float(np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1]))
        worst = min(per_layer, key=per_layer.get)
        results[variant] = dict(cosine=_cosine(*flat), relative_error=rel,
                                median_layer_cosine=float(np.median(list(per_layer.values()))),
                                worst_layer=worst, worst_layer_cosine=per_layer[worst])
        print(f"  {variant}: {results[variant]}", flush=True)
    return results


def train(args, batches, test) -> dict:
    initial = build(args.model, args.size, args.seed)
    results = {}
    for variant in args.train_variants:
        keras.utils.set_random_seed(args.seed)
        model = convert(initial, variant)
        model.compile(keras.optimizers.Adam(args.lr),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        losses, start = [], time.time()
        for x, y in batches[: args.train_steps]:
            losses.append(float(model.train_on_batch(x, y)[0]))
        seconds = time.time() - start
        # Batch statistics: a few hundred steps leave BN's moving averages
        # (momentum 0.99) far from the weights' statistics.
        accuracy = float(np.mean(np.concatenate([
            np.argmax(model(test[0][i:i + 128], training=True), -1) == test[1][i:i + 128]
            for i in range(0, len(test[0]), 128)])))
        k = max(1, len(losses) // 10)
        results[variant] = dict(first_loss=float(np.mean(losses[:k])),
                                last_loss=float(np.mean(losses[-k:])),
                                test_accuracy=float(accuracy), seconds=seconds, losses=losses)
        print(f"  {variant}: loss {results[variant]['first_loss']:.3f} -> "
              f"{results[variant]['last_loss']:.3f}, held-out accuracy {accuracy:.3f} "
              f"({seconds:.0f} s)", flush=True)
    return results


def report(args, description, fid, runs) -> str:
    lines = [f"# {args.model} ({args.size}x{args.size}), converted: gradient fidelity and "
             "training", "", f"Data: {description}.", "",
             f"Command: `python benchmarks/post_activation.py {' '.join(sys.argv[1:])}`"]
    if fid:
        lines += ["", f"## Weight gradients against stock's (after {args.warmup_steps} warm-up "
                  f"steps, one batch of {args.batch_size})", "",
                  "| variant | cosine (whole net) | relative error | median layer cosine "
                  "| worst layer (cosine) |", "|---|---|---|---|---|"]
    for variant, r in fid.items():
        lines.append(f"| {variant} | {r['cosine']:.5f} | {r['relative_error']:.4f} | "
                     f"{r['median_layer_cosine']:.5f} | {r['worst_layer']} "
                     f"({r['worst_layer_cosine']:.4f}) |")
    if runs:
        lines += ["", f"## Training {args.train_steps} steps from the same initial weights "
                  f"(Adam {args.lr}, batch {args.batch_size}, same batches)", "",
                  "| variant | loss, first 10% of steps | loss, last 10% "
                  "| held-out accuracy (batch statistics) |",
                  "|---|---|---|---|"]
        for variant, r in runs.items():
            lines.append(f"| {variant} | {r['first_loss']:.3f} | {r['last_loss']:.3f} | "
                         f"{r['test_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    steps = max(args.warmup_steps + 1, 0 if args.skip_training else args.train_steps)
    batches, test, description = load_data(args.size, args.batch_size, steps, args.seed)
    print(description, flush=True)
    fid = {} if args.skip_fidelity else fidelity(args, batches)
    runs = {} if args.skip_training else train(args, batches, test)
    text = report(args, description, fid, runs)
    print("\n" + text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "post_activation.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "post_activation.json"), "w") as f:
            json.dump(dict(args=vars(args), fidelity=fid, training=runs), f, indent=2)
    return dict(fidelity=fid, training=runs)


if __name__ == "__main__":
    main()
