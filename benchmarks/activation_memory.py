"""Activation memory per sample, measured, with the breakdown of what it holds.

For a stack of BN -> ReLU -> 3x3 conv units (default: 20 units, 32 channels,
32x32) or a pre-activation ResNet, each variant runs in a fresh process
(`keras_blpa.profiling`): the slope of peak training-step memory against
batch size. The breakdown sets that slope against the bytes the saved
activations need in theory (4 bytes per element for bits=None, bits/8 for
BLPA); the remainder is transient working memory of the backward pass.

Each figure is the lowest of `--repeats` fresh processes (and of `--steps`
steps in each), counted by TensorFlow's BFC allocator with ops run one at a
time (`--inter-op-threads -1`): the default CPU allocator leaves allocations
under 256 KiB out of its statistics, and BFC counts whole chunks, so single
processes differ by up to one activation tensor (see "Stable figures on a
CPU" in keras_blpa/profiling.py). `--fast` measures once, as before.

With `--jit-compile` the table also gives XLA's own figure: the slope of the
temp buffer in XLA's buffer assignment (`keras_blpa.xla_dump`). The allocator
peak can round XLA's single temp buffer up to the chunk it was handed (up to
2x), so under XLA the XLA figure is the one to compare.

    python benchmarks/activation_memory.py
    python benchmarks/activation_memory.py --jit-compile
    python benchmarks/activation_memory.py --model cifar --depth 164 --channels 3
    python benchmarks/activation_memory.py --model cifar --depth 29 --channels 1 --size 28
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from keras_blpa.profiling import build_model, measure_in_subprocess

BYTES_PER_ELEMENT = {"none": 4.0, "8": 1.0, "4": 0.5}


def saved_elements(model) -> int:
    """Elements of the inputs of all fused units, per sample."""
    from keras_blpa.layers.base import BNReLUBase

    total = 0
    for layer in model.layers:
        if isinstance(layer, BNReLUBase):
            shape = layer.input.shape[1:]
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="stack", choices=["stack", "cifar"])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["stock", "none", "8", "4"])
    p.add_argument("--negative-slope", type=float, default=0.0,
                   help="leaky ReLU units (stack only; stock uses keras.layers.LeakyReLU)")
    p.add_argument("--batch-sizes", type=int, nargs=2, default=(8, 40))
    p.add_argument("--jit-compile", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant")
    p.add_argument("--steps", type=int, default=5, help="measured steps per batch size")
    p.add_argument("--fast", action="store_true",
                   help="one process, one step, TensorFlow's default allocator and threads")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spec = dict(model=args.model, depth=args.depth, channels=args.channels, size=args.size)
    if args.negative_slope:
        spec["negative_slope"] = args.negative_slope
    elements = saved_elements(build_model(variant="4", **spec))
    rows = []
    for variant in args.variants:
        stable = {} if args.fast else dict(
            repeats=args.repeats, steps=args.steps, cpu_bfc=True, inter_op_threads=-1,
            aggregate="min")
        r = measure_in_subprocess(batch_sizes=tuple(args.batch_sizes),
                                  jit_compile=args.jit_compile, variant=variant,
                                  **stable, **spec)
        saved = elements * BYTES_PER_ELEMENT.get(variant, float("nan")) / 2**20
        # The input batch is held through the step and so is in every peak;
        # XLA's temp buffer excludes it (the input is a parameter there).
        input_mib = 0.0 if args.jit_compile else r["input_mib_per_sample"]
        measured = r.get("xla_mib_per_sample", r["mib_per_sample"])
        rows.append({"variant": variant, "mib_per_sample": measured,
                     "allocator_mib_per_sample": r["mib_per_sample"],
                     "runs_mib_per_sample": r.get("mib_per_sample_runs"),
                     "input_mib_per_sample": input_mib,
                     "activation_mib_per_sample": measured - input_mib,
                     "saved_mib_per_sample": saved,
                     "transient_mib_per_sample": measured - input_mib - saved})
    stock = next((r["activation_mib_per_sample"] for r in rows if r["variant"] == "stock"),
                 None)
    source = "XLA temp slope" if args.jit_compile else "measured"
    lines = [
        f"{args.model}, depth {args.depth}, {args.channels} channels, {args.size}x{args.size}, "
        + (f"negative_slope={args.negative_slope}, " if args.negative_slope else "")
        + f"jit_compile={args.jit_compile}, batch {args.batch_sizes[0]} -> "
        f"{args.batch_sizes[1]} (MiB per sample)", "",
        f"| variant | {source} | allocator peak slope | input batch | activations "
        "| saved activations (theory) | transient | activations vs stock |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{stock / r['activation_mib_per_sample']:.1f}x less" if stock else "-"
        if r["variant"] in BYTES_PER_ELEMENT:
            saved = f"{r['saved_mib_per_sample']:.3f}"
            transient = f"{r['transient_mib_per_sample']:.3f}"
        else:
            saved = transient = "-"
        lines.append(
            f"| {r['variant']} | {r['mib_per_sample']:.3f} | "
            f"{r['allocator_mib_per_sample']:.3f} | {r['input_mib_per_sample']:.3f} | "
            f"{r['activation_mib_per_sample']:.3f} | {saved} | {transient} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"spec": spec, "jit_compile": args.jit_compile, "fast": args.fast,
                       "repeats": args.repeats, "steps": args.steps, "rows": rows}, f, indent=1)
        command = "python benchmarks/activation_memory.py " + " ".join(argv or sys.argv[1:])
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(f"Command: `{command}`\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
