"""Soak test: memory of a long `model.fit` run of a small BLPA ResNet stays flat.

A pre-activation ResNet with 4-bit (or 8-bit) BLPA units trains on the
Fashion-MNIST subset shipped with the package through `model.fit` (several
epochs, a validation pass after each), the path users take. Every `--every`
steps a callback samples

- the process's resident set size (`VmRSS` of `/proc/self/status`), which
  sees every leak: Python objects, TensorFlow graphs and kernels, the op's
  buffers, malloc fragmentation;
- the TensorFlow allocator's bytes in use on the device the step fills
  (`tf.config.experimental.get_memory_info` on
  `keras_blpa.profiling.memory_device()`, as the memory benchmarks measure).
  On CPU it counts allocations of 256 KiB and more (smaller ones come from a
  pool it does not track): between steps, the input pipeline's tensors; a
  leaked activation of this model (0.8 to 3 MiB a step) or the 4-bit codes
  of a 32-channel unit (392 KiB) would show. RSS sees the rest.

Verdict. The first `--warmup` steps are excluded (tracing of the train and
evaluation functions, the first validation pass, allocator pools reaching
their working size). A least-squares line through the remaining samples
gives a growth slope in bytes per step. "No growth after warm-up" holds when
both slopes are below their bounds:

- RSS: `--rss-tol-kib` (default 16 KiB per step, i.e. 16 MiB per 1000
  steps). The smallest leak that matters in practice keeps something per
  step: one input batch of this run is 98 KiB (32 x 28 x 28 x 4 B), one
  step's 4-bit codes 1.3 MiB, a retraced step function megabytes. 16 KiB per
  step is a sixth of the smallest of those, yet 2.3x or more above every
  slope measured over 1000 steps, BLPA or stock layers (1.3 to 6.8 KiB/step,
  `benchmarks/results/cpu/soak.md`);
- allocator: `--alloc-tol-kib` (default 4 KiB per step). Between steps it
  holds only persistent tensors, so after warm-up it should not move at all;
  the smallest tracked leak is 256 KiB a step.

RSS is sampled after `malloc_trim(0)` (glibc; `--no-trim` to skip): freed
heap pages that malloc would keep cached are returned first, so RSS follows
live memory rather than the cache's level, which wanders by a megabyte or two.

Input: `--inputs dataset` (default) feeds a shuffled, repeated tf.data
pipeline with `steps_per_epoch`, for which `model.fit` keeps one iterator for
the whole run. `--inputs arrays` passes NumPy arrays, for which Keras makes a
new iterator every epoch; that path's RSS creeps by 0.7 to 0.8 MiB an epoch
for stock Keras layers as for BLPA (`--stock`), see `benchmarks/results/cpu/soak.md`.

    python benchmarks/soak.py --steps 1000 --every 50 --bits 4 \
        --json benchmarks/results/cpu/soak.json --md benchmarks/results/cpu/soak.md

`--inject-leak-kib K` keeps K KiB of host memory and a K KiB TensorFlow
tensor per step, to check that the verdict catches a leak.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_blpa import datasets, ops, profiling  # noqa: E402
from keras_blpa.models import preact_resnet_cifar  # noqa: E402

KIB = 1024
MIB = 1024 * 1024


def rss_bytes() -> int:
    """Current resident set size of this process (bytes).

    `/proc/self/status` where it exists (Linux); elsewhere the peak RSS from
    `resource`, which can only rise, so growth still shows.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * KIB


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> bool:
    """Returns freed heap pages to the OS (glibc `malloc_trim(0)`); False where
    unavailable. Without it RSS also counts memory that malloc keeps cached
    after a free, whose level wanders with allocation patterns."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def allocator_bytes(device: str | None = None) -> int:
    """Bytes in use in TensorFlow's allocator of `device` (default: the one
    `keras_blpa.profiling` measures)."""
    return int(tf.config.experimental.get_memory_info(device or profiling.memory_device())
               ["current"])


class MemorySampler(keras.callbacks.Callback):
    """Samples RSS and allocator bytes every `every` training steps (global
    step count across epochs); stops training after `steps` steps.

    `leak_kib` > 0 keeps that much host memory and one TensorFlow tensor of
    that size per step (a deliberate leak, for testing the verdict).
    """

    def __init__(self, every: int, steps: int, leak_kib: int = 0, trim: bool = True):
        super().__init__()
        self.every, self.steps, self.leak_kib, self.trim = every, steps, leak_kib, trim
        self.step = 0
        self.samples: list[dict] = []
        self._leak: list = []
        self._start = 0.0

    def _sample(self) -> None:
        if self.trim:
            trim_heap()
        self.samples.append({
            "step": self.step,
            "rss_bytes": rss_bytes(),
            "alloc_bytes": allocator_bytes(),
            "seconds": time.perf_counter() - self._start,
        })

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()
        self._sample()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.leak_kib:
            host = np.ones(self.leak_kib * KIB // 8)  # touched: resident
            self._leak.append((host, tf.fill([self.leak_kib * KIB // 4], float(self.step))))
        if self.step % self.every == 0 or self.step == self.steps:
            self._sample()
        if self.step >= self.steps:
            self.model.stop_training = True


def slope(steps, values) -> float:
    """Least-squares slope of `values` against `steps` (per step); 0 for < 2 points."""
    steps = np.asarray(steps, np.float64)
    values = np.asarray(values, np.float64)
    if steps.size < 2 or np.ptp(steps) == 0:
        return 0.0
    return float(np.polyfit(steps, values, 1)[0])


def verdict(
    samples: list[dict], warmup: int, rss_tol_kib: float = 16.0, alloc_tol_kib: float = 4.0
) -> dict:
    """Growth slopes over the samples at steps >= `warmup` and the verdict.

    Returns a dict with `rss_slope_kib_per_step`, `alloc_slope_kib_per_step`,
    the bounds, the post-warm-up first-to-last changes, `post_warmup_samples`,
    `growth` (True when a slope exceeds its bound, or too few samples, < 3, to
    judge) and `text`.
    """
    post = [s for s in samples if s["step"] >= warmup]
    steps = [s["step"] for s in post]
    rss = slope(steps, [s["rss_bytes"] for s in post]) / KIB
    alloc = slope(steps, [s["alloc_bytes"] for s in post]) / KIB
    enough = len(post) >= 3
    growth = not enough or rss > rss_tol_kib or alloc > alloc_tol_kib
    if not enough:
        text = f"undecided: {len(post)} samples after warm-up (need 3)"
    elif growth:
        text = (f"GROWTH after warm-up: RSS {rss:+.2f} KiB/step (bound {rss_tol_kib}), "
                f"allocator {alloc:+.2f} KiB/step (bound {alloc_tol_kib})")
    else:
        text = (f"no growth after warm-up: RSS {rss:+.2f} KiB/step (bound {rss_tol_kib}), "
                f"allocator {alloc:+.2f} KiB/step (bound {alloc_tol_kib})")
    return {
        "warmup_steps": warmup,
        "post_warmup_samples": len(post),
        "rss_slope_kib_per_step": rss,
        "alloc_slope_kib_per_step": alloc,
        "rss_tol_kib_per_step": rss_tol_kib,
        "alloc_tol_kib_per_step": alloc_tol_kib,
        "rss_change_mib": (post[-1]["rss_bytes"] - post[0]["rss_bytes"]) / MIB if post else 0.0,
        "alloc_change_mib": (
            (post[-1]["alloc_bytes"] - post[0]["alloc_bytes"]) / MIB if post else 0.0),
        "growth": growth,
        "text": text,
    }


def training_data(x, y, batch_size: int, seed: int) -> tf.data.Dataset:
    """Shuffled, repeated batches: with `steps_per_epoch`, `model.fit` keeps one
    iterator for the whole run (with arrays it makes a new one every epoch)."""
    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .repeat().batch(batch_size, drop_remainder=True).prefetch(2))


def run_soak(
    steps: int = 1000,
    every: int = 50,
    bits: int = 4,
    depth: int = 11,
    width: float = 0.5,
    batch_size: int = 32,
    train_size: int = 4000,
    val_size: int = 256,
    warmup: int | None = None,
    seed: int = 0,
    rss_tol_kib: float = 16.0,
    alloc_tol_kib: float = 4.0,
    leak_kib: int = 0,
    stock: bool = False,
    inputs: str = "dataset",
    trim: bool = True,
) -> dict:
    """Trains for `steps` steps with `model.fit` and returns samples and verdict.

    `inputs`: "dataset" (a repeated tf.data pipeline, `steps_per_epoch`) or
    "arrays" (NumPy arrays, Keras shuffles them each epoch). `stock`: the same
    network from stock Keras layers (a baseline). `trim`: `trim_heap()` before
    each sample. `warmup` defaults to the larger of `steps // 5` and one epoch
    plus one sampling interval (so the first validation pass is inside it).
    """
    if inputs not in ("dataset", "arrays"):
        raise ValueError(f"`inputs` must be 'dataset' or 'arrays'; received {inputs!r}.")
    keras.utils.set_random_seed(seed)
    (x, y), (x_val, y_val), description = datasets.load_fashion_mnist("subset")
    x, y = x[:train_size], y[:train_size]
    steps_per_epoch = len(x) // batch_size if inputs == "dataset" else math.ceil(
        len(x) / batch_size)
    if warmup is None:
        warmup = max(steps // 5, steps_per_epoch + every)
    model = preact_resnet_cifar(depth, width=width, classes=10, input_shape=x.shape[1:],
                                bits=None if stock else bits, stock=stock)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    sampler = MemorySampler(every, steps, leak_kib, trim)
    fit_kwargs = dict(
        epochs=math.ceil(steps / steps_per_epoch), callbacks=[sampler], verbose=0,
        validation_data=(x_val[:val_size], y_val[:val_size]) if val_size else None,
    )
    start = time.perf_counter()
    if inputs == "dataset":
        history = model.fit(training_data(x, y, batch_size, seed), shuffle=False,
                            steps_per_epoch=steps_per_epoch, **fit_kwargs)
    else:
        history = model.fit(x, y, batch_size=batch_size, **fit_kwargs)
    wall = time.perf_counter() - start
    return {
        "config": {
            "steps": steps, "every": every, "bits": None if stock else bits, "stock": stock,
            "depth": depth, "width": width, "batch_size": batch_size, "train_size": len(x),
            "val_size": val_size, "steps_per_epoch": steps_per_epoch, "inputs": inputs,
            "trim": trim and _MALLOC_TRIM is not None, "seed": seed, "leak_kib": leak_kib,
            "params": model.count_params(), "data": description,
        },
        "implementation": ops.implementation(),
        "device": profiling.memory_device(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": platform.python_version()},
        "steps_run": sampler.step,
        "wall_seconds": wall,
        "final_loss": float(history.history["loss"][-1]),
        "final_val_accuracy": float(history.history.get("val_accuracy", [math.nan])[-1]),
        "samples": sampler.samples,
        "verdict": verdict(sampler.samples, warmup, rss_tol_kib, alloc_tol_kib),
    }


def describe(result: dict) -> str:
    """One sentence: model, path, data and run."""
    c = result["config"]
    layers = ("stock Keras layers" if c["stock"] else
              f"BLPA {c['bits']}-bit (quantizer `{result['implementation']}`)")
    feed = ("a repeated tf.data pipeline, one iterator for the run" if c["inputs"] == "dataset"
            else "NumPy arrays, a new iterator each epoch")
    return (
        f"Pre-activation ResNet-{c['depth']} (width {c['width']}, {c['params']} parameters), "
        f"{layers}, `model.fit` on {c['train_size']} Fashion-MNIST images from {feed} "
        f"(batch {c['batch_size']}, {c['steps_per_epoch']} steps per epoch, validation on "
        f"{c['val_size']} images after each epoch), {result['steps_run']} steps in "
        f"{result['wall_seconds']:.0f} s; RSS sampled "
        f"{'after malloc_trim(0)' if c['trim'] else 'as is'}; TensorFlow "
        f"{result['versions']['tensorflow']}, Keras {result['versions']['keras']}, "
        f"allocator of {result['device']}."
    )


def report(result: dict, command: str | None = None) -> str:
    """Markdown: configuration, the sample table and the verdict."""
    c, v = result["config"], result["verdict"]
    lines = [f"Command: `{command}`", ""] if command else []
    lines += [
        describe(result),
        "",
        "| step | epoch | RSS (MiB) | RSS change (MiB) | TF allocator (MiB) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    base = result["samples"][0]["rss_bytes"]
    for s in result["samples"]:
        mark = " (warm-up)" if s["step"] < v["warmup_steps"] else ""
        lines.append(
            f"| {s['step']}{mark} | {s['step'] / c['steps_per_epoch']:.1f} | "
            f"{s['rss_bytes'] / MIB:.1f} | {(s['rss_bytes'] - base) / MIB:+.1f} | "
            f"{s['alloc_bytes'] / MIB:.2f} | {s['seconds']:.1f} |"
        )
    lines += [
        "",
        f"After warm-up ({v['post_warmup_samples']} samples from step {v['warmup_steps']}): "
        f"least-squares slope RSS {v['rss_slope_kib_per_step']:+.3f} KiB/step "
        f"(bound {v['rss_tol_kib_per_step']}), TF allocator "
        f"{v['alloc_slope_kib_per_step']:+.3f} KiB/step (bound {v['alloc_tol_kib_per_step']}); "
        f"first to last sample: RSS {v['rss_change_mib']:+.2f} MiB, allocator "
        f"{v['alloc_change_mib']:+.2f} MiB.",
        "",
        f"**Verdict: {v['text']}.**",
        "",
        f"Final training loss {result['final_loss']:.3f}, validation accuracy "
        f"{result['final_val_accuracy']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=50, help="sample every N steps")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--depth", type=int, default=11)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=None,
                   help="steps excluded from the verdict (default: max(steps/5, an epoch + "
                   "one interval))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-tol-kib", type=float, default=16.0)
    p.add_argument("--alloc-tol-kib", type=float, default=4.0)
    p.add_argument("--inject-leak-kib", type=int, default=0)
    p.add_argument("--stock", action="store_true",
                   help="the same network from stock Keras layers (a baseline)")
    p.add_argument("--inputs", choices=("dataset", "arrays"), default="dataset")
    p.add_argument("--no-trim", action="store_true", help="sample RSS without malloc_trim")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--md", default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    if profiling.memory_device() == "CPU:0" and not profiling.cpu_allocator_keeps_stats():
        # The default CPU allocator keeps no statistics without oneDNN (AMD
        # CPUs): rerun this command with the BFC allocator, which does.
        print("soak: the default CPU allocator keeps no statistics here; rerunning with "
              "TF_CPU_ALLOCATOR_USE_BFC=true", file=sys.stderr)
        command = sys.orig_argv[1:] if argv is None else [__file__, *argv]
        os.execve(sys.executable, [sys.executable, *command],
                  {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"})
    result = run_soak(
        args.steps, args.every, args.bits, args.depth, args.width, args.batch_size,
        args.train_size, args.val_size, args.warmup, args.seed, args.rss_tol_kib,
        args.alloc_tol_kib, args.inject_leak_kib, args.stock, args.inputs, not args.no_trim,
    )
    command = "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["command"] = command
    text = report(result, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(text)
    return result


if __name__ == "__main__":
    main()
