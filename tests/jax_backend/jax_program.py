"""Compiles one BLPA training step with `jax.jit` and dumps what XLA made of it.

Run in a fresh process (XLA reads `XLA_FLAGS` once per process):

    KERAS_BACKEND=jax python tests/jax_backend/jax_program.py DUMP_DIR --bits 4

The step is the vjp of the network's outputs against `seed`, the step's last
argument, so the first instruction that reads `seed` marks where the backward
pass begins in XLA's schedule. The network is that of `tests/xla_program.py`
(plain units, an identity residual, a projection head, a pooled dense head).
`spec.json` in DUMP_DIR describes it for the tests, with the pre-optimization
program (`lowered.txt`) that the GPU and TPU compilers start from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dump_dir")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--negative-slope", type=float, default=0.0)
    parser.add_argument("--jnp", action="store_true", help="the jnp quantizer, not custom calls")
    args = parser.parse_args(argv)
    if args.jnp:
        os.environ["KERAS_BLPA_DISABLE_CUSTOM_OPS"] = "1"
    else:
        os.environ["KERAS_BLPA_JAX_CUSTOM_CALLS"] = "1"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump_dir}"
        " --xla_dump_hlo_module_re=.*blpa_step.*"
    ).strip()
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from xla_program import BATCH, CHANNELS, CLASSES, SIZE, build

    bits = None if args.bits == "none" else int(args.bits)
    model = build(bits, negative_slope=args.negative_slope)
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def blpa_step(trainable, x, seed):
        def outputs(trainable):
            return model.stateless_call(trainable, fixed, x, training=True)[0]

        _, vjp = jax.vjp(outputs, trainable)
        return vjp(seed)[0]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, SIZE, SIZE, CHANNELS)),
                    jnp.float32)
    seed = jnp.ones((BATCH, CLASSES), jnp.float32)
    lowered = jax.jit(blpa_step, keep_unused=True).lower(trainable, x, seed)
    Path(args.dump_dir, "lowered.txt").write_text(lowered.as_text())
    lowered.compile()
    units = [
        {"name": layer.name, "input_shape": list(layer.input.shape)}
        for layer in model.layers
        if type(layer).__name__.startswith("BNReLU")
    ]
    # Entry parameters: the trainable variables, then x, then seed.
    spec = dict(bits=bits, batch=BATCH, units=units, input_parameter=str(len(trainable)),
                seed_parameter=str(len(trainable) + 1))
    Path(args.dump_dir, "spec.json").write_text(json.dumps(spec))


if __name__ == "__main__":
    main()
