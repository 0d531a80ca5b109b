"""Throughput of BLPA encode/decode: compiled op vs pure TF vs XLA vs a plain copy.

All rates are GB/s of fp32 activations (the size of `x` for encode, of the
decoded `xhat` for decode), measured in the same process:

- op:   the compiled custom op (keras_blpa.backend.tensorflow.kernels), one eager op call;
- tf:   the pure-TF quantizer (keras_blpa.backend.tensorflow.quantizer) in a tf.function;
- xla:  the same under tf.function(jit_compile=True);
  (tf and xla include the tf.function call overhead, printed as `fn_call_us`;
  it dominates at 1 MiB on slow machines);
- copy: memory-copy references, `x * 1.0` in eager TF (a real read + write of
  fp32) and numpy `copyto` into a preallocated array;
- fill: write-only references, `tf.fill` and numpy's `fill` of a preallocated
  array: the rate at which this machine can store fp32 at all.

Everything of one size is timed round-robin (the best call of each counts),
so that noise from other work on the machine hits every column alike.

Encode reads 4 B and writes 4 B (+0.5 or 1 B of codes) per element; decode
reads 0.5 or 1 B and writes 5 B (xhat + bool mask), so "copy" is the natural
ceiling for both. The backward columns (`bwd`) time `decode_bn_backward`
(fused decode + ReLU/BN backward: per-channel sums, then the input gradient)
in GB/s of the fp32 upstream gradient; it reads that gradient twice and the
codes twice and writes the input gradient, so its ceiling is about 2/3 of copy.

The second table ("vs copy") counts the bytes each kernel really moves
(`MOVED_BYTES`) against those of the copy (8 B per element: read and write)
measured in the same run, for the ops the training step runs: encode,
`decode_relu` and the fused backward at 4 and 8 bits, and the exact path
(bits=None: forward, rebuild, backward). 100% is the copy's bandwidth.

The third table sets `decode_relu` beside the fills. It reads half or one
byte per element and writes four, so it is bound by stores, not by reads:
in bytes moved it cannot pass about 4.5/8 of a copy (56%) unless this
machine stores faster than it copies, which the fills measure.

    python benchmarks/pack_bench.py                       # 1..256 MiB, 4 and 8 bits
    python benchmarks/pack_bench.py --sizes-mib 1,4,16,64,256 --bits 4,8 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_blpa.backend.tensorflow import kernels, quantizer  # noqa: E402

CHANNELS = 64


def _sync() -> None:
    # CPU eager/tf.function calls are synchronous; GPUs need an explicit sync.
    sync = getattr(getattr(tf.test, "experimental", None), "sync_devices", None)
    if sync is not None and tf.config.list_logical_devices("GPU"):
        sync()


def _best(fn: Callable[[], object], min_time: float, min_reps: int) -> float:
    """Seconds of the fastest of at least `min_reps` calls (after one warm-up)."""
    fn()
    _sync()
    best = float("inf")
    reps = 0
    start = time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def _best_interleaved(
    fns: dict[str, Callable[[], object]], min_time: float, min_reps: int
) -> dict[str, float]:
    """Seconds of each function's fastest call, calling them in turn (after a
    warm-up call each) for at least `min_reps` rounds and `min_time` seconds
    per function on average."""
    for fn in fns.values():
        fn()
    _sync()
    best = dict.fromkeys(fns, float("inf"))
    rounds = 0
    start = time.perf_counter()
    while rounds < min_reps or time.perf_counter() - start < min_time * len(fns):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync()
            best[name] = min(best[name], time.perf_counter() - t0)
        rounds += 1
    return best


def _inputs(mib: int, bits: int):
    n = mib * (1 << 20) // 4
    x = tf.random.normal([n // CHANNELS, CHANNELS], seed=1)
    rng = np.random.default_rng(0)
    gamma = tf.constant(rng.normal(size=CHANNELS).astype(np.float32))
    beta = tf.constant(rng.normal(size=CHANNELS).astype(np.float32))
    mean = tf.reduce_mean(x, axis=0)
    inv_std = tf.math.rsqrt(tf.math.reduce_variance(x, axis=0) + 1e-3)
    params = quantizer.quantizer_params(gamma, beta, bits)
    return x, mean, inv_std, gamma, beta, params


def bench_size(mib: int, bits: int, min_time: float, min_reps: int, use_op: bool) -> dict:
    x, mean, inv_std, gamma, beta, params = _inputs(mib, bits)
    nbytes = int(x.shape.num_elements()) * 4
    shape = x.shape

    def encode_with(mod):
        def f(x):
            return mod.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)

        return f

    def decode_with(mod):
        def f(packed):
            return mod.decode(packed, params, shape, bits)

        return f

    def backward_with(mod):
        def f(g_a, packed):
            return mod.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits)

        return f

    def decode_relu_with(mod):
        def f(packed):
            return mod.decode_relu(packed, params, gamma, beta, shape, bits)

        return f

    impls = {
        "tf": (
            tf.function(encode_with(quantizer)),
            tf.function(decode_with(quantizer)),
            tf.function(backward_with(quantizer)),
        ),
        "xla": (
            tf.function(encode_with(quantizer), jit_compile=True),
            tf.function(decode_with(quantizer), jit_compile=True),
            tf.function(backward_with(quantizer), jit_compile=True),
        ),
    }
    if use_op:
        # A single op needs no graph: calling it eagerly skips tf.function's overhead.
        impls = {
            "op": (encode_with(kernels), decode_with(kernels), backward_with(kernels)),
            **impls,
        }
    _, packed = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    g_a = tf.random.normal(x.shape, seed=2)

    row: dict = {"size_mib": mib, "bits": bits, "elements": int(x.shape.num_elements())}
    # Everything of one size is timed round-robin, so that machine noise hits
    # the ops and the copies alike: each entry's best call counts.
    fns: dict[str, Callable[[], object]] = {}
    if use_op:
        fns["decode_relu_op"] = lambda: decode_relu_with(kernels)(packed)
        if bits == EXACT_ROW_BITS:  # the exact path has no bits: once per size
            _, xhat = kernels.bn_relu_exact(x, mean, inv_std, gamma, beta)
            fns["exact_forward_op"] = lambda: kernels.bn_relu_exact(
                x, mean, inv_std, gamma, beta)
            fns["exact_relu_op"] = lambda: kernels.relu_exact(xhat, gamma, beta)
            fns["exact_backward_op"] = lambda: kernels.bn_backward_exact(
                g_a, xhat, gamma, beta, inv_std)
    for name, (enc, dec, bwd) in impls.items():
        fns[f"encode_{name}"] = lambda e=enc: e(x)
        fns[f"decode_{name}"] = lambda d=dec: d(packed)
        fns[f"backward_{name}"] = lambda b=bwd: b(g_a, packed)
    fns["copy_tf"] = lambda: x * 1.0
    src = x.numpy()
    dst = np.empty_like(src)
    fns["copy_np"] = lambda: np.copyto(dst, src)
    filled = np.empty_like(src)
    fns["fill_tf"] = lambda: tf.fill(shape, 1.5)
    fns["fill_np"] = lambda: filled.fill(1.5)
    for key, seconds in _best_interleaved(fns, min_time, min_reps).items():
        row[key] = nbytes / seconds / 1e9
    return row


# Bytes each kernel reads and writes per element (bits: codes per element).
def moved_bytes(kernel: str, bits: int) -> float:
    code = bits / 8
    return {
        "copy": 8.0,
        "encode": 4 + 4 + code,  # x in; a and the code out
        "decode_relu": code + 4,  # code in; a out
        "backward": 2 * 4 + 2 * code + 4,  # g_a and codes twice (two passes); g_x out
        "exact_forward": 4 + 8,  # x in; a and xhat out
        "exact_relu": 4 + 4,  # xhat in; a out
        "exact_backward": 2 * 4 + 2 * 4 + 4,  # g_a and xhat twice; g_x out
    }[kernel]


EXACT_ROW_BITS = 4
VS_COPY = ["encode", "decode_relu", "backward", "exact_forward", "exact_relu",
           "exact_backward"]


def vs_copy(row: dict) -> dict:
    """Each op's bandwidth in bytes moved, as a fraction of the copy's."""
    copy = max(row["copy_tf"], row["copy_np"]) * moved_bytes("copy", row["bits"]) / 4
    out = {}
    for kernel in VS_COPY:
        rate = row.get(f"{kernel}_op")
        if rate is not None:
            out[kernel] = rate * moved_bytes(kernel, row["bits"]) / 4 / copy
    return out


def markdown_vs_copy(rows: list[dict]) -> str:
    lines = ["| MiB | bits | copy GB/s moved | " + " | ".join(VS_COPY) + " |",
             "|---:|---:|---:|" + "---:|" * len(VS_COPY)]
    for row in rows:
        fractions = vs_copy(row)
        copy = max(row["copy_tf"], row["copy_np"]) * 2
        cells = [f"{100 * fractions[k]:.0f}%" if k in fractions else "" for k in VS_COPY]
        lines.append(f"| {row['size_mib']} | {row['bits']} | {copy:.1f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def markdown_vs_fill(rows: list[dict]) -> str:
    """decode_relu's fp32 written per second against the faster fill's."""
    lines = ["| MiB | bits | fill GB/s | copy GB/s | decode_relu GB/s | vs fill |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "fill_tf" not in row or "decode_relu_op" not in row:
            continue
        fill = max(row["fill_tf"], row["fill_np"])
        copy = max(row["copy_tf"], row["copy_np"])
        rate = row["decode_relu_op"]
        lines.append(f"| {row['size_mib']} | {row['bits']} | {fill:.2f} | {copy:.2f} | "
                     f"{rate:.2f} | {100 * rate / fill:.0f}% |")
    return "\n".join(lines)


COLUMNS = [
    ("size_mib", "MiB"),
    ("bits", "bits"),
    ("encode_op", "enc op"),
    ("encode_tf", "enc TF"),
    ("encode_xla", "enc XLA"),
    ("decode_op", "dec op"),
    ("decode_tf", "dec TF"),
    ("decode_xla", "dec XLA"),
    ("backward_op", "bwd op"),
    ("backward_tf", "bwd TF"),
    ("backward_xla", "bwd XLA"),
    ("copy_tf", "copy TF"),
    ("copy_np", "copy np"),
    ("fill_tf", "fill TF"),
    ("fill_np", "fill np"),
]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("n/a")
            elif isinstance(value, float):
                cells.append(f"{value:.2f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,4,16,64,256", help="comma-separated fp32 sizes")
    parser.add_argument("--bits", default="4,8", help="comma-separated: 4, 8 or 4,8")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--out", default="out/pack_bench.json", help="JSON results path")
    args = parser.parse_args(argv)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        use_op = kernels.is_available()
    if not use_op:
        reason = kernels.load_error() or "disabled"
        print(f"custom op unavailable ({reason}); op columns are n/a", file=sys.stderr)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)

    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for mib in (int(s) for s in args.sizes_mib.split(",")):
            row = bench_size(mib, bits, args.min_time, args.min_reps, use_op)
            rows.append(row)
            print(f"done {mib} MiB, {bits} bits", file=sys.stderr, flush=True)

    trivial = tf.function(lambda x: x)
    fn_call_us = 1e6 * _best(lambda: trivial(tf.constant(0.0)), 0.2, 20)
    devices = [d.name for d in tf.config.list_logical_devices()]
    meta = {
        "tensorflow": tf.__version__,
        "devices": devices,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "custom_op": use_op,
        "unit": "GB/s of fp32 activations (1e9 bytes/s)",
        "channels": CHANNELS,
        "fn_call_us": fn_call_us,
    }
    for row in rows:
        row["vs_copy"] = vs_copy(row)
    table = markdown(rows) + "\n\nBandwidth in bytes moved, vs the copy (exact path: "
    table += "bits=None, in the 4-bit rows):\n\n" + markdown_vs_copy(rows)
    if use_op:
        table += ("\n\ndecode_relu's fp32 stores against a write-only fill "
                  "(GB/s of fp32 written):\n\n" + markdown_vs_fill(rows))
    print(
        f"TF {tf.__version__}, {os.cpu_count()} CPUs, devices {devices}; GB/s of fp32; "
        f"tf.function call overhead {fn_call_us:.0f} us\n"
    )
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
