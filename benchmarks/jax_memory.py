"""Activation memory per sample on Keras's JAX backend, from the compiled step.

For each variant (stock Keras layers, fused bits=None, 8 and 4 bits) the
training step (`model.train_step` under `jax.jit`) is compiled at two batch
sizes and XLA's temp buffer is read from `memory_analysis()`
(`keras_blpa.profiling.jax_temp_slope`): its slope is the activation memory
per sample, XLA's own account. Nothing runs, so one process serves every
variant, side by side. The fused variants use the XLA custom calls where
they run by default (CPU; `KERAS_BLPA_JAX_CUSTOM_CALLS=1` also on a GPU), the
jnp quantizer with `--jnp` (TPU's path). The
suffix `-whole` (`4-whole`) compiles a variant with the weight gradient over the
whole batch at once (`KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS=1`) instead of
four batch slices. The
table sets the slope against the saved bytes in theory (4 bytes per element
for bits=None, bits/8 for BLPA); the rest is the backward pass's transient
working memory.

    KERAS_BACKEND=jax python benchmarks/jax_memory.py --channels 64
    KERAS_BACKEND=jax python benchmarks/jax_memory.py --model cifar --depth 164 --channels 3

`--peak` also measures peak memory at run time, after three
`train_on_batch` steps in a fresh process per variant and batch size (no
peak resets within a process), and its slope: on a GPU or TPU the device's
`peak_bytes_in_use` (`jax.devices()[0].memory_stats()`); on CPU, which
reports no device statistics, the process's peak resident memory
(`ru_maxrss`, compilation included: the slope removes what does not grow
with the batch).

XLA:CPU in jaxlib 0.10 fuses reductions into YNNPACK kernels that take
broadcast operands at full size; `--no-ynn` sets
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` (before JAX starts) to
measure without them, as older jaxlibs compile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

BYTES_PER_ELEMENT = {"none": 4.0, "8": 1.0, "4": 0.5}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="stack", choices=["stack", "cifar"])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["stock", "none", "8", "4"])
    p.add_argument("--batch-sizes", type=int, nargs=2, default=(8, 24))
    p.add_argument("--no-ynn", action="store_true", help="XLA:CPU without YNNPACK fusions")
    p.add_argument("--jnp", action="store_true",
                   help="the jnp quantizer (TPU's path) instead of the custom calls")
    p.add_argument("--peak", action="store_true",
                   help="also the device's peak_bytes_in_use, fresh process each (GPU, TPU)")
    p.add_argument("--peak-child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.peak_child:
        return _peak_child(args, *args.peak_child)
    if args.no_ynn:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_experimental_ynn_fusion_type=").strip()
    if args.jnp:
        os.environ["KERAS_BLPA_JAX_CUSTOM_CALLS"] = "0"  # the peak children inherit it
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras

    from keras_blpa.profiling import build_model, jax_temp_slope

    if keras.backend.backend() != "jax":
        sys.exit("Run with KERAS_BACKEND=jax.")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from activation_memory import saved_elements

    from keras_blpa.backend.jax import kernels

    kernels = "custom calls" if kernels.usable((2, 2), 4) else "jnp"
    spec = dict(model=args.model, depth=args.depth, channels=args.channels, size=args.size)
    elements = saved_elements(build_model(variant="4", **spec))
    rows = []
    for variant in args.variants:
        name, _, whole = variant.partition("-")
        with _whole_batch_weight_gradient(whole == "whole"):
            r = jax_temp_slope(batch_sizes=tuple(args.batch_sizes), variant=name, **spec)
        r["variant"] = variant
        saved = elements * BYTES_PER_ELEMENT.get(name, float("nan")) / 2**20
        if args.peak:
            peaks = [_peak_in_subprocess(args, variant, b) for b in args.batch_sizes]
            r["peak_source"] = peaks[0][1]
            r["peak_bytes"] = [p for p, _ in peaks]
            r["peak_mib_per_sample"] = ((peaks[1][0] - peaks[0][0])
                                        / (args.batch_sizes[1] - args.batch_sizes[0]) / 2**20)
        rows.append({**r, "saved_mib_per_sample": saved,
                     "transient_mib_per_sample": r["mib_per_sample"] - saved,
                     "jax": jax.__version__, "device": jax.devices()[0].platform,
                     "ynn": not args.no_ynn, "kernels": kernels})
    stock = next((r["mib_per_sample"] for r in rows if r["variant"] == "stock"), None)
    lines = [
        f"{args.model}, depth {args.depth}, {args.channels} channels, {args.size}x{args.size}, "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}"
        f"{'' if not args.no_ynn else ' (no YNN fusions)'}, kernels: {kernels}, "
        f"batch {args.batch_sizes[0]} -> "
        f"{args.batch_sizes[1]} (MiB per sample, XLA temp slope)",
        "",
        "| variant | XLA temp slope | saved activations (theory) | transient | vs stock |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{stock / r['mib_per_sample']:.1f}x less" if stock else "-"
        saved = "-" if r["variant"] == "stock" else f"{r['saved_mib_per_sample']:.3f}"
        transient = "-" if r["variant"] == "stock" else f"{r['transient_mib_per_sample']:.3f}"
        peak = (f" ({r['peak_source']} slope {r['peak_mib_per_sample']:.3f})"
                if "peak_mib_per_sample" in r else "")
        lines.append(f"| {r['variant']} | {r['mib_per_sample']:.3f}{peak} | {saved} | "
                     f"{transient} | {ratio} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows


@contextlib.contextmanager
def _whole_batch_weight_gradient(on: bool):
    """Traces within with the weight gradient over the whole batch at once."""
    key = "KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS"
    saved = os.environ.get(key)
    if on:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if on and saved is None:
            os.environ.pop(key)
        elif on:
            os.environ[key] = saved


def _spec_args(args) -> list[str]:
    return ["--model", args.model, "--depth", str(args.depth), "--channels",
            str(args.channels), "--size", str(args.size)]


def _peak_in_subprocess(args, variant: str, batch: int) -> tuple[int, str]:
    import subprocess

    cmd = [sys.executable, __file__, *_spec_args(args), "--peak-child", variant, str(batch)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    child = json.loads(result.stdout.strip().splitlines()[-1])
    return child["peak_bytes"], child["peak_source"]


def _peak_child(args, variant: str, batch: str) -> dict:
    """Three training steps at `batch`; prints the device's peak bytes in use
    (the process's peak resident memory where the device reports none)."""
    import resource

    import jax
    import keras
    import numpy as np

    from keras_blpa.profiling import build_model

    name, _, whole = variant.partition("-")
    if whole == "whole":
        os.environ["KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS"] = "1"
    model = build_model(args.model, name, depth=args.depth, channels=args.channels,
                        size=args.size)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(int(batch), *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 10, int(batch))
    for _ in range(3):
        model.train_on_batch(x, y)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, source = stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    else:  # ru_maxrss is in KiB on Linux
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS peak"
    result = {"variant": variant, "batch": int(batch), "peak_bytes": peak, "peak_source": source}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
