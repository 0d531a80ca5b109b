"""The paper's accuracy table at small scale: exact vs BLPA 8/4-bit vs naive 8-bit.

Trains the same pre-activation ResNet as
  exact        bits=None
  blpa8        BLPA 8-bit, the library's default 12-sigma window
  blpa8_w6     BLPA 8-bit with the paper's 6-sigma window
  blpa4        BLPA 4-bit (6-sigma window, as in the paper)
  blpa4_w8     BLPA 4-bit with an 8-sigma window
  naive8       naive 8-bit (quantized forward pass, also at inference; 6 sigma)
  quarter      exact with 1/4 of the features (width 0.25)
  blpaB_wW     any other BLPA bit width B and window W (e.g. blpa4_w7)
with several seeds on Fashion-MNIST (offline) or CIFAR-10 (tfds), and writes
test error mean +- std per variant and depth (markdown + JSON) and a plot of
the training curves. Instead of training runs:
  --fidelity     per-layer cosine and relative error of weight gradients
                 against exact ones, on a partly trained model;
  --depth-sweep  the same at initialization for each of --depths, and how far
                 the naive forward pass drifts from the exact one;
  --bias         whether the gradient error is noise or bias (errors of
                 several batches averaged).
Results and the commands that made them: benchmarks/results/accuracy/.

    python benchmarks/accuracy.py --depths 29 56 110 --seeds 2 --epochs 1 \\
        --train-size 20000 --val-size 0 --out benchmarks/results/accuracy
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
    "blpa8_w6": dict(bits=8, window=6.0),
    "blpa4": dict(bits=4, window=6.0),
    "blpa4_w8": dict(bits=4, window=8.0),
    "naive8": dict(bits=8, naive=True, window=6.0),
    "quarter": dict(bits=None, width=0.25),
}
COLORS = dict(zip(VARIANTS, ["k", "tab:blue", "tab:cyan", "tab:green", "tab:olive", "tab:red",
                             "tab:gray"]))


def load(args):
    if args.dataset == "fashion_mnist":
        (x, y), (xt, yt), desc = datasets.load_fashion_mnist()
        if args.train_size:
            x, y = x[: args.train_size], y[: args.train_size]
        mean, std = x.mean(), x.std()
        return ((x - mean) / std, y), ((xt - mean) / std, yt), 10, desc
    train, test, classes = datasets.cifar(args.dataset, args.batch_size)
    return train, test, classes, f"{args.dataset} (tfds)"


def variant_options(name: str) -> dict:
    """Layer options of a named variant; blpaB_wW names BLPA at B bits, window W."""
    if name in VARIANTS:
        return dict(VARIANTS[name])
    bits, _, window = name.removeprefix("blpa").partition("_w")
    if name.startswith("blpa") and bits in ("4", "8"):
        try:
            return dict(bits=int(bits), window=float(window))
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(
        f"unknown variant {name!r}: use one of {', '.join(VARIANTS)} or blpaB_wW "
        "(B = 4 or 8 bits, W = window in standard deviations, e.g. blpa4_w7)")


def _variant(name: str) -> str:
    variant_options(name)
    return name


def build(variant: str, depth: int, classes: int, shape) -> keras.Model:
    options = variant_options(variant)
    width = options.pop("width", 1.0)
    return preact_resnet_cifar(depth, width=width, classes=classes, input_shape=shape, **options)


class BatchLoss(keras.callbacks.Callback):
    """Per-step training loss (Keras logs a running mean over the epoch)."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._previous = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.losses.append((batch + 1) * mean - batch * self._previous)
        self._previous = mean


def train_one(args, data, variant, depth, seed) -> dict:
    (train, test, classes, _) = data
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    shape = train[0].shape[1:] if isinstance(train, tuple) else (32, 32, 3)
    model = build(variant, depth, classes, shape)
    steps = (len(train[0]) // args.batch_size) if isinstance(train, tuple) else 50_000 // 128
    training.compile_for_training(model, steps, args.epochs, base_lr=args.lr)
    start = time.time()
    batch_loss = BatchLoss()
    if isinstance(train, tuple):
        # Per-epoch validation on a slice keeps the curves cheap; the final
        # test error uses the whole test set.
        val = tuple(t[: args.val_size] for t in test) if args.val_size else None
        hist = model.fit(*train, batch_size=args.batch_size, epochs=args.epochs,
                         validation_data=val, callbacks=[batch_loss], verbose=2)
        _, acc = model.evaluate(*test, batch_size=256, verbose=0)
    else:
        hist = model.fit(train, epochs=args.epochs, validation_data=test,
                         callbacks=[batch_loss], verbose=2)
        _, acc = model.evaluate(test, verbose=0)
    return {"variant": variant, "depth": depth, "seed": seed,
            "test_error": 100 * (1 - float(acc)), "seconds": time.time() - start,
            "history": {k: [float(v) for v in vs] for k, vs in hist.history.items()},
            "batch_loss": batch_loss.losses}


LAST_STEPS = 20  # final training loss: mean over the last steps (less noisy than test error)


def _test_error(run: dict) -> float:
    return run["test_error"]


def _final_loss(run: dict) -> float:
    return float(np.mean(run["batch_loss"][-LAST_STEPS:]))


NOT_PAIRED = ("exact", "quarter")  # left out of the comparisons with exact


def _paired(runs: list[dict], variant: str, value=_test_error, depth=None) -> list[float]:
    """`value` minus exact's with the same depth and seed (same initial weights
    and batch order), which cancels most seed-to-seed noise."""
    exact = {(r["depth"], r["seed"]): value(r) for r in runs if r["variant"] == "exact"}
    return [value(r) - exact[r["depth"], r["seed"]] for r in runs
            if r["variant"] == variant and depth in (None, r["depth"])
            and (r["depth"], r["seed"]) in exact]


def _table(runs, depths, title, value, paired=False, digits=2) -> list[str]:
    """One row per variant, one `mean +- std (n)` cell per depth.

    paired: the difference to exact with the same depth and seed (`_paired`).
    """
    lines = ["| variant | " + " | ".join(f"ResNet-{d} {title}" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for variant in _variants(runs):
        if paired and variant in NOT_PAIRED:
            continue
        cells = []
        for d in depths:
            if paired:
                values = _paired(runs, variant, value, depth=d)
            else:
                values = [value(r) for r in runs if r["variant"] == variant and r["depth"] == d]
            sign = "+" if paired else ""
            cells.append("-" if not values else f"{np.mean(values):{sign}.{digits}f} +- "
                         f"{np.std(values):.{digits}f} (n={len(values)})")
        if any(c != "-" for c in cells):
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def _variants(runs: list[dict]) -> list[str]:
    """The named variants in table order, then any blpaB_wW ones run."""
    extra = sorted({r["variant"] for r in runs} - set(VARIANTS))
    return list(VARIANTS) + extra


def _pooled(runs: list[dict]) -> list[str]:
    """Paired differences to exact pooled over depths and seeds, with a 95%
    confidence interval (t distribution): is a variant within noise of exact?"""
    from scipy import stats

    lines = ["| variant | pairs | mean difference | 95% interval | pairs worse than exact |",
             "|---|---|---|---|---|"]
    for variant in _variants(runs):
        diffs = _paired(runs, variant)
        if variant in NOT_PAIRED or len(diffs) < 2:
            continue
        mean = np.mean(diffs)
        half = stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / np.sqrt(len(diffs))
        worse = sum(d > 0 for d in diffs)
        lines.append(f"| {variant} | {len(diffs)} | {mean:+.2f} | [{mean - half:+.2f}, "
                     f"{mean + half:+.2f}] | {worse} of {len(diffs)} |")
    return lines


def summarize(runs: list[dict]) -> str:
    """Markdown: test error, its paired difference to exact, final training loss."""
    depths = sorted({r["depth"] for r in runs})
    with_loss = [r for r in runs if r.get("batch_loss")]
    return "\n".join(
        _table(runs, depths, "test error (%)", _test_error)
        + ["", "Difference to exact with the same seed (test error, points):", ""]
        + _table(runs, depths, "vs exact", _test_error, paired=True)
        + ["", "The same differences pooled over depths and seeds:", ""]
        + _pooled(runs)
        + ["", f"Training loss, mean of the last {LAST_STEPS} steps:", ""]
        + _table(with_loss, depths, "final train loss", _final_loss, digits=3)
    )


def plot(runs: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    depths = sorted({r["depth"] for r in runs})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4), squeeze=False)
    window = 10
    for ax, d in zip(axes[0], depths):
        labelled = set()
        for r in runs:
            if r["depth"] != d or not r.get("batch_loss"):
                continue
            loss = np.convolve(r["batch_loss"], np.ones(window) / window, mode="valid")
            label = None
            if r["variant"] not in labelled:
                errs = [q["test_error"] for q in runs
                        if q["variant"] == r["variant"] and q["depth"] == d]
                label = f"{r['variant']} (test err {np.mean(errs):.1f}%)"
                labelled.add(r["variant"])
            ax.plot(np.arange(window, window + len(loss)), loss,
                    color=COLORS.get(r["variant"]), alpha=0.7, lw=1, label=label)
        ax.set(title=f"ResNet-{d}", xlabel="step", ylabel=f"train loss ({window}-step mean)",
               ylim=(0.2, 1.5))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _units(model: keras.Model) -> list:
    return [layer for layer in model.layers if isinstance(layer, BNReLUBase)]


def _kernel_grads(model: keras.Model, x, y) -> list[np.ndarray]:
    """Weight gradients of one training-mode step; moving statistics restored."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    state = [v.numpy() for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, [unit.kernel for unit in _units(model)])
    for v, value in zip(model.non_trainable_variables, state):
        v.assign(value)
    return [g.numpy().ravel() for g in grads]


def _agreement(g: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    cos = float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r) + 1e-30))
    rel = float(np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-30))
    return cos, rel


COMPARED = ("blpa8", "blpa8_w6", "blpa4", "naive8")
BIAS_COMPARED = ("blpa8", "blpa8_w6", "blpa4")


def _compared(args, default: tuple[str, ...]) -> tuple[str, ...]:
    """Approximate variants a gradient mode compares with exact: --variants if given."""
    if args.variants is None:
        return default
    return tuple(v for v in args.variants if v not in NOT_PAIRED)


def _compared_grads(compared, depth, classes, x, y, weights) -> dict[str, list[np.ndarray]]:
    grads = {}
    for variant in compared:
        model = build(variant, depth, classes, x.shape[1:])
        model.set_weights(weights)
        grads[variant] = _kernel_grads(model, x, y)
    return grads


def _clipped_fraction(model: keras.Model, x) -> list[float]:
    """Per unit: fraction of normalized inputs outside the 6-sigma window."""
    units = _units(model)
    probe = keras.Model(model.inputs[0], [unit.input for unit in units])
    fractions = []
    for unit, inputs in zip(units, probe(x, training=False)):
        flat = tf.reshape(tf.cast(inputs, tf.float32), [-1, inputs.shape[-1]])
        mean, var = tf.nn.moments(flat, [0])
        xhat = (flat - mean) / tf.sqrt(var + unit.epsilon)
        fractions.append(float(tf.reduce_mean(tf.cast(tf.abs(xhat) >= 3.0, tf.float32))))
    return fractions


def fidelity(args, data) -> tuple[str, dict]:
    """Per-layer weight-gradient agreement with exact, same weights and batch."""
    (train, _, classes, _) = data
    x, y = train[0][: args.batch_size], train[1][: args.batch_size]
    keras.utils.set_random_seed(0)
    depth = args.depths[0]
    exact = build("exact", depth, classes, x.shape[1:])
    steps = len(train[0]) // args.batch_size
    training.compile_for_training(exact, steps, args.fidelity_epochs, base_lr=args.lr)
    exact.fit(*train, batch_size=args.batch_size, epochs=args.fidelity_epochs, verbose=2)
    weights = exact.get_weights()
    reference = _kernel_grads(exact, x, y)
    compared = _compared(args, COMPARED)
    grads = _compared_grads(compared, depth, classes, x, y, weights)
    clipped = _clipped_fraction(exact, x)
    header = " | ".join(f"cos {v} | rel. err {v}" for v in compared)
    rows = [f"| layer | {header} | inputs beyond 3 sigma |",
            "|---|" + "---|---|" * len(compared) + "---|"]
    for i, unit in enumerate(_units(exact)):
        cells = []
        for variant in compared:
            cos, rel = _agreement(grads[variant][i], reference[i])
            cells += [f"{cos:.5f}", f"{rel:.4f}"]
        rows.append(f"| {unit.name} | " + " | ".join(cells) + f" | {100 * clipped[i]:.2f}% |")
    summary = ["", f"| ResNet-{depth}, trained {args.fidelity_epochs} epoch(s) | "
               "min cos | median cos | median rel. err |", "|---|---|---|---|"]
    stats = {"depth": depth, "clipped_median": float(np.median(clipped))}
    for variant in compared:
        cos, rel = zip(*(_agreement(g, r) for g, r in zip(grads[variant], reference)))
        stats[variant] = {"min_cos": min(cos), "median_cos": float(np.median(cos)),
                          "median_rel_err": float(np.median(rel))}
        summary.append(f"| {variant} | {min(cos):.5f} | {np.median(cos):.5f} | "
                       f"{np.median(rel):.4f} |")
    return "\n".join(rows + summary), stats


def gradient_bias(args, data) -> tuple[str, dict]:
    """Is the weight-gradient error noise or bias? Errors of K batches, averaged.

    Zero-mean errors independent across batches shrink as 1/sqrt(K) when
    averaged, the way SGD averages them over steps; a systematic error (a
    bias of the approximation) does not.
    """
    (train, _, classes, _) = data
    keras.utils.set_random_seed(0)
    depth, k, b = args.depths[0], args.bias_batches, args.batch_size
    half = len(train[0]) // 2
    exact = build("exact", depth, classes, train[0].shape[1:])
    training.compile_for_training(exact, half // b, args.fidelity_epochs, base_lr=args.lr)
    exact.fit(train[0][:half], train[1][:half], batch_size=b, epochs=args.fidelity_epochs,
              verbose=2)
    weights = exact.get_weights()
    batches = [(train[0][half + i * b: half + (i + 1) * b],
                train[1][half + i * b: half + (i + 1) * b]) for i in range(k)]
    reference = [_kernel_grads(exact, x, y) for x, y in batches]
    rows = [f"| variant | per-batch rel. err | rel. err of the {k}-batch mean | "
            f"ratio (1/sqrt({k}) = {1 / np.sqrt(k):.3f} if unbiased) |", "|---|---|---|---|"]
    stats = {"depth": depth, "batches": k}
    for variant in _compared(args, BIAS_COMPARED):
        model = build(variant, depth, classes, train[0].shape[1:])
        model.set_weights(weights)
        grads = [_kernel_grads(model, x, y) for x, y in batches]
        per_batch, averaged, ratio = [], [], []
        for layer in range(len(reference[0])):
            errors = [grads[i][layer] - reference[i][layer] for i in range(k)]
            mean_error = np.linalg.norm(np.mean(errors, 0))
            per_batch.append(np.mean([np.linalg.norm(e) / np.linalg.norm(r[layer])
                                      for e, r in zip(errors, reference)]))
            averaged.append(mean_error / np.linalg.norm(np.mean([r[layer] for r in reference], 0)))
            ratio.append(mean_error / np.mean([np.linalg.norm(e) for e in errors]))
        stats[variant] = {"per_batch": float(np.median(per_batch)),
                          "mean_of_batches": float(np.median(averaged)),
                          "ratio": float(np.median(ratio))}
        rows.append(f"| {variant} | {np.median(per_batch):.4f} | {np.median(averaged):.4f} | "
                    f"{np.median(ratio):.3f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows), stats


def _forward_drift(depth, classes, x, weights) -> float:
    """Naive 8-bit vs exact, same weights and batch: relative difference of the
    last unit's input (how far the quantized forward pass has drifted)."""
    outs = []
    for variant in ("exact", "naive8"):
        model = build(variant, depth, classes, x.shape[1:])
        model.set_weights(weights)
        probe = keras.Model(model.inputs[0], _units(model)[-1].input)
        outs.append(probe(x, training=True).numpy())
    return float(np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0]))


def depth_sweep(args, data) -> tuple[str, dict]:
    """Gradient agreement with exact at initialization, as depth grows, and the
    naive forward pass's drift from the exact one."""
    (train, _, classes, _) = data
    x, y = train[0][: args.batch_size], train[1][: args.batch_size]
    compared = _compared(args, COMPARED)
    rows = ["| depth | " + " | ".join(f"{v} median cos | {v} min cos" for v in compared)
            + " | naive8 forward drift |",
            "|---|" + "---|---|" * len(compared) + "---|"]
    stats = {}
    for depth in args.depths:
        keras.utils.set_random_seed(0)
        exact = build("exact", depth, classes, x.shape[1:])
        weights = exact.get_weights()
        reference = _kernel_grads(exact, x, y)
        grads = _compared_grads(compared, depth, classes, x, y, weights)
        cells = []
        for variant in compared:
            cos = [_agreement(g, r)[0] for g, r in zip(grads[variant], reference)]
            cells += [f"{np.median(cos):.5f}", f"{min(cos):.5f}"]
            stats.setdefault(variant, {})[depth] = {"median_cos": float(np.median(cos)),
                                                    "min_cos": min(cos)}
        drift = _forward_drift(depth, classes, x, weights)
        stats.setdefault("naive8_forward_drift", {})[depth] = drift
        rows.append(f"| {depth} | " + " | ".join(cells) + f" | {drift:.3f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows), stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist",
                   choices=["fashion_mnist", "cifar10", "cifar100"])
    p.add_argument("--depths", type=int, nargs="+", default=[56])
    p.add_argument("--variants", nargs="+", type=_variant,
                   help="default: all for training; the usual comparison for the gradient modes")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--val-size", type=int, default=2000,
                   help="test images for per-epoch validation (0: none)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in <out>/accuracy.json and skip them")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the table and plot from <out>/accuracy.json")
    p.add_argument("--fidelity", action="store_true")
    p.add_argument("--fidelity-epochs", type=int, default=1)
    p.add_argument("--bias", action="store_true",
                   help="noise or bias: weight-gradient errors averaged over batches")
    p.add_argument("--bias-batches", type=int, default=8)
    p.add_argument("--depth-sweep", action="store_true",
                   help="gradient agreement at initialization for each of --depths")
    p.add_argument("--out", default="benchmarks/results/accuracy")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "accuracy.json")
    if args.report_only:
        with open(raw) as f:
            saved = json.load(f)
        report(saved["runs"], saved["command"], saved["dataset"], args.out)
        return
    data = load(args)
    command = "python " + " ".join(sys.argv)
    if args.fidelity or args.depth_sweep or args.bias:
        mode, name = ((fidelity, "gradient_fidelity") if args.fidelity else
                      (gradient_bias, "gradient_bias") if args.bias else
                      (depth_sweep, "gradient_vs_depth"))
        table, stats = mode(args, data)
        print(table)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write(f"Command: `{command}`\n\nData: {data[3]}\n\n{table}\n")
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump({"command": command, "dataset": data[3], "stats": stats}, f, indent=1)
        return
    runs = []
    if args.resume and os.path.exists(raw):
        with open(raw) as f:
            runs = json.load(f)["runs"]
    done = {(r["variant"], r["depth"], r["seed"]) for r in runs}
    # Seed-major order: a run cut short still covers every depth and variant.
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for depth in args.depths:
            for variant in args.variants or VARIANTS:
                if (variant, depth, seed) in done:
                    continue
                runs.append(train_one(args, data, variant, depth, seed))
                summary = {k: v for k, v in runs[-1].items()
                           if k not in ("history", "batch_loss")}
                print(json.dumps(summary), flush=True)
                with open(raw, "w") as f:
                    json.dump({"command": command, "dataset": data[3], "runs": runs}, f)
    report(runs, command, data[3], args.out)


def report(runs: list[dict], command: str, dataset: str, out: str) -> None:
    table = summarize(runs)
    print(table)
    with open(os.path.join(out, "accuracy.md"), "w") as f:
        f.write(f"Command: `{command}`\n\nData: {dataset}\n\n{table}\n")
    plot(runs, os.path.join(out, "training_curves.png"))

if __name__ == "__main__":
    main()
