"""Compiles one BLPA training step with `jax.jit` and dumps what XLA made of it.

Run in a fresh process (XLA reads `XLA_FLAGS` once per process):

    KERAS_BACKEND=jax python tests/jax_backend/jax_program.py DUMP_DIR --bits 4

The step is the vjp of the network's outputs against `seed`, the step's last
argument, so the first instruction that reads `seed` marks where the backward
pass begins in XLA's schedule. `--network`:

- `bn` (default): that of `tests/xla_program.py` (BN units, an identity
  residual, a projection head, a pooled dense head), capped with `--max-value`;
- `relu`: the units without a fused BN, `ApproxBatchNormalization ->
  ReLUConv2D` twice (the second with a projection head) and a pooled
  `ReLUDense` behind a last `ApproxBatchNormalization`;
- `pool`: `ReLUConv2D -> PaddedMaxPooling2D -> ReLUConv2D -> ReLUDense`.

`spec.json` in DUMP_DIR describes it for the tests (every unit that keeps
codes, with its kind and input shape; every pooling with its input and padded
shapes), with the pre-optimization program (`lowered.txt`) that the GPU and
TPU compilers start from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# The layers that keep codes of their input for the backward pass.
CODED = ("BNReLUConv2D", "BNReLUDense", "ReLUConv2D", "ReLUDense", "ApproxBatchNormalization")


def build_capped(bits, max_value: float):
    """`xla_program.build`'s network with every unit capped at `max_value`."""
    import functools

    from xla_program import build

    import keras_blpa.layers as layers

    for name in ("BNReLUConv2D", "BNReLUDense"):  # this process builds one model
        setattr(layers, name, functools.partial(getattr(layers, name), max_value=max_value))
    return build(bits)


def build_unfused(network: str, bits):
    """The `relu` or `pool` network (see the module docstring)."""
    import keras
    from xla_program import BATCH, CHANNELS, CLASSES, SIZE

    import keras_blpa

    inputs = keras.Input((SIZE, SIZE, CHANNELS), batch_size=BATCH)
    if network == "relu":
        x = keras_blpa.ApproxBatchNormalization(bits=bits)(inputs)
        x = keras_blpa.ReLUConv2D(CHANNELS, 3, padding="same", bits=bits)(x)
        x = keras_blpa.ApproxBatchNormalization(bits=bits)(x)
        out, short = keras_blpa.ReLUConv2D(CHANNELS, 3, padding="same", bits=bits,
                                           projection_filters=CHANNELS)(x)
        x = keras_blpa.ApproxBatchNormalization(bits=bits)(keras.layers.Add()([out, short]))
    else:
        x = keras_blpa.ReLUConv2D(CHANNELS, 3, padding="same", bits=bits)(inputs)
        x = keras_blpa.PaddedMaxPooling2D(padding=1, pool_size=3, strides=2)(x)
        x = keras_blpa.ReLUConv2D(CHANNELS, 3, padding="same", bits=bits)(x)
    outputs = keras_blpa.ReLUDense(CLASSES, pooling="avg", bits=bits)(x)
    return keras.Model(inputs, outputs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dump_dir")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--negative-slope", type=float, default=0.0)
    parser.add_argument("--max-value", type=float, default=None)
    parser.add_argument("--network", choices=("bn", "relu", "pool"), default="bn")
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
    if args.network != "bn":
        model = build_unfused(args.network, bits)
    elif args.max_value is not None:
        model = build_capped(bits, args.max_value)
    else:
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
        {"name": layer.name, "kind": type(layer).__name__, "input_shape": list(layer.input.shape)}
        for layer in model.layers
        if type(layer).__name__ in CODED
    ]
    pools = [
        {"name": layer.name, "input_shape": list(layer.input.shape),
         "padded_shape": list(layer.input.shape[:1]) + [
             d + sum(p) for d, p in zip(layer.input.shape[1:3], layer.padding)
         ] + list(layer.input.shape[3:])}
        for layer in model.layers
        if type(layer).__name__ == "PaddedMaxPooling2D"
    ]
    # Entry parameters: the trainable variables, then x, then seed.
    spec = dict(bits=bits, batch=BATCH, units=units, pools=pools,
                input_parameter=str(len(trainable)), seed_parameter=str(len(trainable) + 1))
    Path(args.dump_dir, "spec.json").write_text(json.dumps(spec))


if __name__ == "__main__":
    main()
