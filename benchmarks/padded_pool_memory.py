"""What `PaddedMaxPooling2D` saves inside ResNet50 (4-bit, bn_bits=8, 64x64).

The converted ResNet50 against the same conversion with its stem's
`ZeroPadding2D -> MaxPooling2D` kept stock (`keep=["pool1_pad"]`): per-sample
slope of `examples/convert_applications.py`'s `backward_peak` from batch 40
to 88, each variant in fresh processes (BFC allocator, ops in the calling
thread), `--repeats` times in turn.

    python benchmarks/padded_pool_memory.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(variant: str) -> None:
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    import convert_applications as ca  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import keras_blpa  # noqa: PLC0415
    from keras_blpa import profiling  # noqa: PLC0415

    tf.config.threading.set_inter_op_parallelism_threads(-1)
    profiling.reserve_cpu_pool()
    keep = None if variant == "padded" else ["pool1_pad"]
    model = keras_blpa.convert(ca.build("ResNet50", 64), bits=4, bn_bits=8, keep=keep)
    ca.backward_peak(model, 40, 1)  # a discarded first trace, as the example does
    peaks = [ca.backward_peak(model, b, 3) for b in (40, 88)]
    print(json.dumps((peaks[1] - peaks[0]) / 48 / 2**20))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["padded", "stock_pool"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="3")
    runs = {"stock_pool": [], "padded": []}
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "--child", variant], env=env,
                                 capture_output=True, text=True, check=True)
            runs[variant].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"  {variant}: {runs[variant][-1]:.2f} MiB/sample", flush=True)
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
