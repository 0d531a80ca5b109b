"""Bandwidth of the JAX unit's quantizer kernels against a plain copy, per size:
the jnp quantizer and, where registered, the XLA custom calls.

Each op is jitted on the default JAX device (CPU here, the GPU on a GPU
machine) and timed round-robin with a reference that reads and writes the
same float32 tensor (`2 * x`: one read, one write, what a copy moves), so
machine noise hits both alike. Bytes moved per op:

  encode               reads x (4 B), writes a (4 B) and the words (bits/8 B)
  decode_relu          reads the words, writes a (4 B)
  decode_bn_backward   reads g_a (4 B) and the words, writes g_x (4 B)

    KERAS_BACKEND=jax python benchmarks/jax_pack_bench.py --sizes-mib 16 64 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _ops(q, jax, x, g_a, mean, inv_std, gamma, beta, bits: int) -> dict:
    """name: (jitted function, its inputs, bytes it moves)."""
    shape, elements = x.shape, x.size
    params = q.quantizer_params(gamma, beta, bits)

    def encode(x):
        xhat, on, a = q.normalize_relu(x, mean, inv_std, gamma, beta)
        return a, q.pack_words(q.encode_codes(xhat, on, params, bits), bits)

    def decode_relu(words):
        xhat, mask = q.decode_words(words, params, shape, bits)
        return q.relu_from_decoded(xhat, mask, gamma, beta)

    def decode_bn_backward(g_a, words):
        return q.decode_bn_backward(g_a, words, params, gamma, inv_std, bits)

    words = jax.jit(encode)(x)[1]
    code_bytes = elements * bits / 8
    return {
        "encode": (jax.jit(encode), (x,), elements * 8 + code_bytes),
        "decode_relu": (jax.jit(decode_relu), (words,), elements * 4 + code_bytes),
        "decode_bn_backward": (jax.jit(decode_bn_backward), (g_a, words),
                               elements * 8 + code_bytes),
        "copy (2 * x)": (jax.jit(lambda x: 2.0 * x), (x,), elements * 8),
    }


def _custom_ops(jax, x, g_a, mean, inv_std, gamma, beta, bits: int) -> dict:
    """The same three as XLA custom calls (`keras_blpa.backend.jax.kernels`)."""
    from keras_blpa.backend.jax import kernels
    from keras_blpa.backend.jax import quantizer as q

    shape, elements = x.shape, x.size
    params = q.quantizer_params(gamma, beta, bits)

    def encode(x):
        return kernels.encode(x, mean, inv_std, gamma, beta, params, bits, None, 0.0)

    def decode_relu(codes, gate):
        return kernels.decode_relu(codes, params, gamma, beta, shape, bits, None, 0.0, gate)

    def decode_bn_backward(g_a, codes):
        return kernels.decode_bn_backward(g_a, codes, params, gamma, inv_std, bits, None, 0.0)

    codes = jax.jit(encode)(x)[1]
    gate = x[:1, :1, :1, :1]  # a gate of one element: reading it costs nothing
    code_bytes = elements * bits / 8
    return {
        "encode (custom call)": (jax.jit(encode), (x,), elements * 8 + code_bytes),
        "decode_relu (custom call)": (jax.jit(decode_relu), (codes, gate),
                                      elements * 4 + code_bytes),
        "decode_bn_backward (custom call)": (jax.jit(decode_bn_backward), (g_a, codes),
                                             elements * 8 + code_bytes),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 64, 256],
                   help="float32 activation sizes")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from keras_blpa.backend.jax import kernels
    from keras_blpa.backend.jax import quantizer as q

    rows = []
    for mib in args.sizes_mib:
        c = args.channels
        # NHWC: batch 8, 32 columns, as many rows (the word axis) as the size needs.
        shape = (8, max(mib * 2**20 // 4 // (8 * 32 * c), 8), 32, c)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
        g_a = jnp.asarray(rng.normal(size=shape).astype(np.float32))
        mean, inv_std = jnp.zeros(c), jnp.ones(c)
        gamma = jnp.asarray(rng.normal(1, 0.5, c).astype(np.float32))
        beta = jnp.asarray(rng.normal(0, 0.5, c).astype(np.float32))
        for bits in args.bits:
            ops = _ops(q, jax, x, g_a, mean, inv_std, gamma, beta, bits)
            if kernels.usable(shape, bits):
                ops.update(_custom_ops(jax, x, g_a, mean, inv_std, gamma, beta, bits))
            times = {name: [] for name in ops}
            for fn, inputs, _ in ops.values():
                jax.block_until_ready(fn(*inputs))
            for _ in range(args.rounds):
                for name, (fn, inputs, _) in ops.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*inputs))
                    times[name].append(time.perf_counter() - start)
            copy_rate = ops["copy (2 * x)"][2] / statistics.median(times["copy (2 * x)"])
            for name, (_, _, moved) in ops.items():
                seconds = statistics.median(times[name])
                rows.append({"size_mib": mib, "bits": bits, "op": name, "seconds": seconds,
                             "gb_per_s": moved / seconds / 1e9,
                             "share_of_copy": moved / seconds / copy_rate,
                             "device": jax.devices()[0].platform})
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}: GB/s moved, share of the copy")
    print("| size MiB | bits | op | ms | GB/s | vs copy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_mib']} | {r['bits']} | {r['op']} | {1e3 * r['seconds']:.2f} | "
              f"{r['gb_per_s']:.1f} | {100 * r['share_of_copy']:.0f}% |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
