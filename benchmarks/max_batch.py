"""Maximum batch size and time per sample under a memory budget (the paper's table).

For each pre-activation ResNet depth and variant, a fresh worker process finds
the largest batch whose training step (`train_on_batch`, SGD) fits in the
budget, by binary search on measured peak memory (`get_memory_info`: CPU here,
GPU:0 where one is visible), seeded by the linear fit of peak memory against
batch size. It then times the step per sample at that batch and at one common
batch. Variants:

  stock        stock Keras layers
  recompute    stock, each residual block under `tf.recompute_grad`
  remat-full   stock built under `keras.RematScope(mode="full")`
  remat-act    stock built under `keras.RematScope(mode="activations")`
  none         fused layers, bits=None (exact)
  8, 4         BLPA 8-bit, 4-bit
  ...+xla      the same with `jit_compile=True`

Output: a markdown table (depths by variants), a PNG of peak memory against
batch size per variant, and the raw figures as JSON.

On CPU the workers count memory with TensorFlow's BFC allocator (`--allocator
bfc`, the default): the default CPU allocator leaves allocations under 256 KiB
out of its statistics, which at small batches is most of BLPA's codes. With
`--search fit` the search starts from the linear fit of peak memory and steps
by 3% to the boundary (about 4 compiled steps per variant, for deep networks
whose every new batch size costs minutes of tracing); `--search bisect`
brackets the fit by +-7% first. `--repeats 0` and `--common-batch 0` skip the
timings.

    python benchmarks/max_batch.py --depths 164 254 --budget-mib 2048 \\
        --out benchmarks/results/cpu
    python benchmarks/max_batch.py --depths 1001 --variants stock none 8 4 --jit off \\
        --budget-mib 2048 --search fit --repeats 0 --common-batch 0 \\
        --inter-op-threads -1 --out benchmarks/results/cpu/depth1001
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import keras
import tensorflow as tf

VARIANTS = ("stock", "recompute", "remat-full", "remat-act", "none", "8", "4")


def _device() -> str:
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


class RecomputedBottleneck(keras.layers.Layer):
    """Stock pre-activation bottleneck whose forward is recomputed in the backward.

    (Its BN moving statistics update twice per step, in the forward and in
    the recomputation: fine for measuring memory and time.)
    """

    def __init__(self, planes, strides, **kwargs):
        super().__init__(**kwargs)
        self.planes, self.strides = planes, strides

    def build(self, shape):
        out = 4 * self.planes
        self.project = self.strides != 1 or shape[-1] != out
        self.bns = [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
                    for _ in range(3)]
        conv = dict(use_bias=False, padding="same")
        self.convs = [keras.layers.Conv2D(self.planes, 1, **conv),
                      keras.layers.Conv2D(self.planes, 3, strides=self.strides, **conv),
                      keras.layers.Conv2D(out, 1, **conv)]
        h = shape
        for bn, conv_layer in zip(self.bns, self.convs):
            bn.build(h)
            conv_layer.build(h)
            h = conv_layer.compute_output_shape(h)
        if self.project:
            self.proj = keras.layers.Conv2D(out, 1, strides=self.strides, use_bias=False)
            self.proj.build(shape)

    def call(self, x, training=None):
        def block(x):
            a = tf.nn.relu(self.bns[0](x, training=training))
            shortcut = self.proj(a) if self.project else x
            h = self.convs[0](a)
            h = self.convs[1](tf.nn.relu(self.bns[1](h, training=training)))
            h = self.convs[2](tf.nn.relu(self.bns[2](h, training=training)))
            return h + shortcut

        return tf.recompute_grad(block)(x) if training else block(x)


def build(variant: str, depth: int, classes: int = 10):
    """The ResNet of a variant (the stock variants share one architecture)."""
    from keras_blpa.models import preact_resnet_cifar

    if variant in ("none", "8", "4"):
        bits = None if variant == "none" else int(variant)
        return preact_resnet_cifar(depth, bits=bits, classes=classes)
    if variant == "stock":
        return preact_resnet_cifar(depth, stock=True, classes=classes)
    if variant.startswith("remat"):
        mode = "full" if variant == "remat-full" else "activations"
        with keras.RematScope(mode=mode):
            return preact_resnet_cifar(depth, stock=True, classes=classes)
    if variant == "recompute":
        n = (depth - 2) // 9
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
        for planes, strides in ((16, 1), (32, 2), (64, 2)):
            for block in range(n):
                x = RecomputedBottleneck(planes, strides if block == 0 else 1)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(classes)(x))
    raise ValueError(f"unknown variant {variant!r}")


def worker(depth: int, variant: str, jit: bool, budget: int, common: int, repeats: int,
           search: str = "bisect") -> dict:
    """Runs in a fresh process: search of the max batch, then timings."""
    import numpy as np

    from keras_blpa import profiling

    device = _device()
    if device == "CPU:0" and profiling.cpu_bfc():
        profiling.reserve_cpu_pool(int(2 * budget / 2**20) + 256)
    model = build(variant, depth)
    rng = np.random.default_rng(0)
    peaks: dict[int, int] = {}

    def step(batch: int, times: int = 1) -> float:
        x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
        y = rng.integers(0, 10, batch).astype("int32")
        # A fresh train function per batch size: static shapes, as model.fit
        # with a fixed batch size traces it.
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                      jit_compile=jit)
        model.train_on_batch(x, y)  # trace / compile for this shape
        model.train_on_batch(x, y)
        tf.config.experimental.reset_memory_stats(device)
        start = time.perf_counter()
        for _ in range(times):
            model.train_on_batch(x, y)
        elapsed = (time.perf_counter() - start) / times
        peaks[batch] = tf.config.experimental.get_memory_info(device)["peak"]
        return elapsed

    def fits(batch: int) -> bool:
        if batch not in peaks:
            step(batch)
        return peaks[batch] <= budget

    b0, b1 = 4, 16
    step(b0), step(b1)
    slope = (peaks[b1] - peaks[b0]) / (b1 - b0)
    guess = max(1, int((budget - (peaks[b0] - slope * b0)) / slope))
    lo = find_max_batch(fits, guess, search)
    result = {
        "depth": depth, "variant": variant, "jit_compile": jit, "device": device,
        "budget_bytes": budget, "max_batch": lo, "search": search,
        "allocator": "bfc" if profiling.cpu_bfc() else "default",
        "mib_per_sample": slope / 2**20,
        "peaks": {str(k): v for k, v in sorted(peaks.items())},
    }
    if lo >= 1 and repeats:
        result["ms_per_sample_at_max"] = 1e3 * step(lo, repeats) / lo
    if 1 <= common <= lo and repeats:
        result["common_batch"] = common
        result["ms_per_sample_at_common"] = 1e3 * step(common, repeats) / common
    return result


def find_max_batch(fits: Callable[[int], bool], guess: int, search: str = "bisect") -> int:
    """The largest batch for which `fits(batch)` holds, to 3%, starting at `guess`.

    `search="fit"` trusts the guess (a linear fit of measured memory): it
    steps from it by 3% to the boundary, at most 3 steps, then falls back to
    the bracketing below. `"bisect"` tries the guess and +-7% first. Each call
    of `fits` costs a compiled training step, so few calls matter.
    """
    if search not in ("bisect", "fit"):
        raise ValueError(f"`search` must be 'bisect' or 'fit'; received {search!r}.")
    guess = max(1, int(guess))
    lo, hi = 0, None

    def record(batch: int) -> bool:
        nonlocal lo, hi
        if fits(batch):
            lo = max(lo, batch)
            return True
        hi = batch if hi is None else min(hi, batch)
        return False

    if search == "fit":
        delta = max(1, guess // 33)
        step = delta if record(guess) else -delta
        batch = guess
        for _ in range(3):  # walk towards the boundary
            batch += step
            if batch < 1 or record(batch) != (step > 0):
                break
    else:
        for candidate in (guess, int(guess * 0.93), int(guess * 1.07) + 1):
            if candidate >= 1:
                record(candidate)
    if lo == 0 and hi is not None:  # the guess overshot a lot: halve down
        while hi > 1 and not record(hi // 2):
            pass
    while hi is None:  # the guess undershot a lot: double up
        record(lo * 2)
    while hi - lo > max(1, lo // 33):  # binary search to 3%
        record((lo + hi) // 2)
    return lo


def _one_line(error: Exception) -> str:
    """The telling line of an exception (Keras wraps the cause in a banner)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(error).__name__}: {error}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "custom_gradient" in line or "not supported" in line.lower():
            return line[:200]
    return " ".join(lines)[:200]


def run_worker(args, depth, variant, jit) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--depths", str(depth),
           "--variants", variant, "--budget-mib", str(args.budget_mib),
           "--common-batch", str(args.common_batch), "--repeats", str(args.repeats)]
    cmd += ["--search", args.search]
    if args.inter_op_threads is not None:
        cmd += ["--inter-op-threads", str(args.inter_op_threads)]
    if jit:
        cmd.append("--xla")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if args.allocator == "bfc":
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"depth": depth, "variant": variant, "jit_compile": jit, "error": error}
    result = json.loads(lines[-1])
    result["wall_seconds"] = time.time() - start
    return result


def label(r) -> str:
    return r["variant"] + ("+xla" if r["jit_compile"] else "")


def table(results: list[dict], budget_mib: float) -> str:
    depths = sorted({r["depth"] for r in results})
    labels = list(dict.fromkeys(label(r) for r in results))
    by = {(r["depth"], label(r)): r for r in results}
    lines = [f"Max batch size within {budget_mib:g} MiB (time per sample, ms, at that batch;"
             " ratio to stock)", "",
             "| variant | " + " | ".join(f"ResNet-{d}" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for lab in labels:
        cells = []
        for d in depths:
            r = by.get((d, lab))
            stock = by.get((d, "stock" + ("+xla" if lab.endswith("+xla") else "")))
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append(f"fails: {r['error'][:80]}")
            else:
                ratio = ""
                if stock and stock.get("max_batch"):
                    ratio = f", {r['max_batch'] / stock['max_batch']:.1f}x"
                ms = r.get("ms_per_sample_at_max")
                cells.append(f"{r['max_batch']} ({'-' if ms is None else f'{ms:.1f}'}{ratio})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "Time per sample at the common batch (ms):", "",
              "| variant | " + " | ".join(f"ResNet-{d}" for d in depths) + " |",
              "|---|" + "---|" * len(depths)]
    for lab in labels:
        cells = []
        for d in depths:
            r = by.get((d, lab)) or {}
            ms = r.get("ms_per_sample_at_common")
            cells.append("-" if ms is None else f"{ms:.2f} (batch {r['common_batch']})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    depths = sorted({r["depth"] for r in results})
    fig, axes = plt.subplots(1, len(depths), figsize=(6 * len(depths), 4.5), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for r in results:
            if r["depth"] != d or "peaks" not in r:
                continue
            pts = sorted((int(b), p / 2**20) for b, p in r["peaks"].items())
            ax.plot(*zip(*pts), marker="o", label=label(r))
        ax.axhline(results[0].get("budget_bytes", 0) / 2**20, color="k", ls="--", lw=0.8)
        ax.set(title=f"Pre-activation ResNet-{d}", xlabel="batch size",
               ylabel="peak training-step memory (MiB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[164])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--xla", action="store_true", help="(worker) jit_compile=True")
    p.add_argument("--jit", choices=["off", "on", "both"], default="both")
    p.add_argument("--budget-mib", type=float, default=2048)
    p.add_argument("--common-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the table and plot from <out>/max_batch.json")
    p.add_argument("--search", choices=["bisect", "fit"], default="bisect")
    p.add_argument("--allocator", choices=["bfc", "default"], default="bfc",
                   help="CPU allocator whose statistics count (bfc: every tensor)")
    p.add_argument("--inter-op-threads", type=int, default=None,
                   help="-1: run ops one at a time in a fixed order (a peak that does "
                   "not depend on load)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
        try:
            result = worker(args.depths[0], args.variants[0], args.xla,
                            int(args.budget_mib * 2**20), args.common_batch, args.repeats,
                            args.search)
        except Exception as e:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            result = {"depth": args.depths[0], "variant": args.variants[0],
                      "jit_compile": args.xla, "error": _one_line(e)}
        print(json.dumps(result))
        return
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "max_batch.json")
    if args.report_only:
        with open(raw) as f:
            saved = json.load(f)
        report(saved["results"], args.budget_mib, args.out, saved["command"])
        return
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    results = []
    command = "python " + " ".join(sys.argv)
    for depth in args.depths:
        for jit in jits:
            for variant in args.variants:
                if jit and variant.startswith("remat"):
                    continue
                r = run_worker(args, depth, variant, jit)
                print(json.dumps({k: v for k, v in r.items() if k != "peaks"}), flush=True)
                results.append(r)
                with open(raw, "w") as f:
                    json.dump({"command": command, "results": results}, f, indent=1)
    report(results, args.budget_mib, args.out, command)


def report(results: list[dict], budget_mib: float, out: str, command: str) -> None:
    md = table(results, budget_mib)
    print(md)
    with open(os.path.join(out, "max_batch.md"), "w") as f:
        f.write(f"Command: `{command}`\n\n{md}\n")
    plot(results, os.path.join(out, "max_batch.png"))


if __name__ == "__main__":
    main()
