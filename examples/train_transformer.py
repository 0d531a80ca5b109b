"""Train a byte-level GPT-2 (KerasHub) on English text, stock against BLPA.

The text is the Python documentation's reST sources, offline: the Debian
package `python3-doc` when installed (`apt-get install python3-doc`, about
10 MB), else the tutorial shipped with keras_blpa (240 KB). Each byte is a
token (vocabulary 256, no tokenizer to download). The model is
`keras_hub.models.GPT2CausalLM` with random weights; BLPA is
`keras_blpa.convert(model)`, which makes its blocks keep 8-bit codes and a
3-bit activation-derivative code instead of float activations.

Both variants start from the same weights and see the same batches. The
script prints the training loss as it goes, then each variant's test loss
in bits per byte, the paired difference, and the activation memory per
sample of one training step (JAX: XLA's temp buffer of the compiled step;
TensorFlow: the peak of the BFC allocator), measured at two batch sizes.
With `--seeds N` it repeats for N seeds and reports the mean difference
with its 95% interval.

    python examples/train_transformer.py
    KERAS_BACKEND=jax python examples/train_transformer.py --steps 600 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# Count every CPU allocation in TensorFlow's memory statistics (before TF starts).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--bits", type=int, default=8, choices=[4, 8])
    p.add_argument("--derivative-bits", type=int, default=3, choices=[1, 2, 3, 4])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--data", default="auto", choices=["auto", "debian", "subset"])
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "sequence_length", "layers", "hidden_dim", "heads",
                 "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hidden_dim % args.heads:
        p.error("--hidden-dim must be a multiple of --heads")
    return args


def build(args, seed: int, variant: str):
    import keras_blpa
    from keras_blpa import paired_runs

    model = paired_runs.byte_gpt(seed, layers=args.layers, hidden_dim=args.hidden_dim,
                                 heads=args.heads, sequence_length=args.sequence_length)
    if variant == "blpa":
        model = keras_blpa.convert(model, transformer_bits=args.bits,
                                   derivative_bits=args.derivative_bits)
    paired_runs.compile_lm(model, args.learning_rate)
    return model


def memory_per_sample(model, args) -> float:
    """MiB of activations per sample: the step's memory at batch 2 and 6."""
    import keras
    import numpy as np

    from keras_blpa import paired_runs, profiling

    used = []
    for size in (2, 6):
        x, y = paired_runs.windows(np.zeros(args.sequence_length + 2, np.uint8), size,
                                   args.sequence_length, np.random.default_rng(0))
        if keras.backend.backend() == "jax":
            used.append(profiling.batch_temp_bytes(model, x, y))
        else:
            used.append(profiling.batch_peak_bytes(model, x, y))
    return (used[1] - used[0]) / 4 / 2**20


def main(argv=None) -> dict:
    args = parse(argv)
    import keras
    import numpy as np

    from keras_blpa import datasets, paired_runs

    train, test, description = datasets.load_python_docs(args.data)
    print(f"Data: {description}; {len(train):,} training bytes, {len(test):,} test bytes")
    print(f"Backend: {keras.backend.backend()}; GPT-2, {args.layers} layers, hidden "
          f"{args.hidden_dim}, sequence {args.sequence_length}, batch {args.batch_size}")
    test_batch = paired_runs.windows(test, 64, args.sequence_length, np.random.default_rng(12345))
    results = {"stock": [], "blpa": []}
    memory = {}
    for seed in range(args.seeds):
        for variant in results:
            model = build(args, seed, variant)
            rng = np.random.default_rng(seed)  # the same batches for both variants
            start, recent = time.perf_counter(), []
            for step in range(1, args.steps + 1):
                x, y = paired_runs.windows(train, args.batch_size, args.sequence_length, rng)
                recent.append(float(model.train_on_batch(x, y, return_dict=True)["loss"]))
                if step % max(1, args.steps // 6) == 0 or step == args.steps:
                    print(f"  seed {seed} {variant:>5} step {step:>5}: loss "
                          f"{np.mean(recent) / math.log(2):.3f} bits/byte", flush=True)
                    recent = []
            elapsed = time.perf_counter() - start
            results[variant].append(paired_runs.bits_per_byte(model, test_batch))
            print(f"seed {seed} {variant}: test {results[variant][-1]:.4f} bits/byte, "
                  f"train {elapsed:.0f} s", flush=True)
            if seed == 0 and not args.no_memory:
                memory[variant] = memory_per_sample(build(args, 0, variant), args)
    difference = np.array(results["blpa"]) - np.array(results["stock"])
    print("\nTest loss, bits per byte (lower is better):")
    for variant, losses in results.items():
        print(f"  {variant:>5}: " + " / ".join(f"{v:.4f}" for v in losses))
    if args.seeds > 1:
        mean, half = paired_runs.paired_interval(difference)
        print(f"  BLPA - stock: {mean:+.4f} +- {half:.4f} over {args.seeds} seeds")
    else:
        print(f"  BLPA - stock: {difference[0]:+.4f} (one seed; --seeds 3 for an interval)")
    if memory:
        ratio = (f" ({memory['stock'] / memory['blpa']:.1f}x less)" if memory["blpa"] > 0
                 else " (too small for the allocator to count: use a larger model)")
        print(f"Activation memory, MiB per sample: stock {memory['stock']:.2f}, BLPA "
              f"{memory['blpa']:.2f}{ratio}")
    return {"test_bits_per_byte": results, "memory_mib_per_sample": memory}


if __name__ == "__main__":
    main(sys.argv[1:])
