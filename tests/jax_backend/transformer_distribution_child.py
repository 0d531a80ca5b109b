"""Process for tests/jax_backend/test_jax_transformer_distribution.py, on
two forced CPU devices. Each of `--runs` (`BITS-LAYOUT[-drop]`) trains a tiny
KerasHub GPT-2 backbone, stock or converted (`transformer_bits` None or 8),
two SGD steps of global batch 8 (one `fit` per step), from the same NumPy
weights: LAYOUT `1` without a distribution (device 0), `dp` under
`keras.distribution.DataParallel`, `mp` under a tensor-parallel
`ModelParallel` (heads and MLP units split over "model", as Megatron splits
them); `-drop`: dropout 0.1. Writes, per run, the weights after each step
and (8 bits) the code words of the first step's forward to
`{out}_{run}.npz`, and the losses and (8 bits, 2 devices) the collectives of
the compiled `train_step` to `{out}.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

BATCH, SEQ, HIDDEN, VOCAB, STEPS = 8, 16, 32, 100, 2


def _layout_map(keras, mesh):
    """Tensor parallel over "model": Q/K/V and the MLP's first Dense split
    their outputs (heads, hidden units), the projections their inputs."""
    layout_map = keras.distribution.LayoutMap(mesh)
    for head in ("query", "key", "value"):
        layout_map[f"transformer_layer_.*/self_attention/{head}/kernel"] = (None, "model", None)
        layout_map[f"transformer_layer_.*/self_attention/{head}/bias"] = ("model", None)
    layout_map["transformer_layer_.*/attention_output/kernel"] = ("model", None, None)
    layout_map["transformer_layer_.*/feedforward_intermediate_dense/kernel"] = (None, "model")
    layout_map["transformer_layer_.*/feedforward_intermediate_dense/bias"] = ("model",)
    layout_map["transformer_layer_.*/feedforward_output_dense/kernel"] = ("model", None)
    return layout_map


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--runs", required=True,
                        help="comma-separated BITS-LAYOUT[-drop]: BITS stock|none|8, "
                             "LAYOUT 1 (no distribution: device 0), dp or mp")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax

    assert len(jax.devices()) == args.devices
    results = {}
    for run in args.runs.split(","):
        results[run] = _run(run, args.out)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f)


def _run(run: str, out: str) -> dict:
    import jax
    import jax.numpy as jnp
    import keras
    import keras_hub
    import numpy as np

    import keras_blpa

    bits_name, layout, *extra = run.split("-")
    dropout = 0.1 if extra == ["drop"] else 0.0
    keras.distribution.set_distribution(None)
    keras.backend.clear_session()
    if layout == "dp":
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()))
    elif layout == "mp":
        mesh = keras.distribution.DeviceMesh((1, len(jax.devices())), ["batch", "model"],
                                             jax.devices())
        keras.distribution.set_distribution(keras.distribution.ModelParallel(
            layout_map=_layout_map(keras, mesh), batch_dim_name="batch"))
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=HIDDEN,
        intermediate_dim=64, max_sequence_length=SEQ, dropout=dropout)
    # The same start on any mesh: weights from NumPy, not the initializers.
    start = []
    for i, v in enumerate(backbone.weights):
        rng = np.random.default_rng(i)
        base = 1.0 if v.path.endswith("gamma") else 0.0
        start.append((base + rng.normal(0, 0.2, v.shape)).astype("float32"))
    backbone.set_weights(start)
    if bits_name == "stock":
        model = backbone
    else:
        bits = None if bits_name == "none" else int(bits_name)
        model = keras_blpa.convert(backbone, transformer_bits=bits)
        kinds = {type(layer).__module__ for layer in model.layers}
        assert "keras_blpa.layers.transformer_decoder" in kinds, kinds
    shardings = sorted({str(getattr(v.value.sharding, "spec", None)) for v in model.weights
                        if "feedforward_intermediate_dense/kernel" in v.path})
    model.compile(keras.optimizers.SGD(0.5), loss="mse")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (STEPS * BATCH, SEQ)).astype("int32")
    lengths = rng.integers(SEQ // 2, SEQ + 1, STEPS * BATCH)
    padding = np.arange(SEQ)[None, :] < lengths[:, None]
    y = rng.normal(size=(STEPS * BATCH, SEQ, HIDDEN)).astype("float32")
    arrays = {}
    if bits_name == "8" and not dropout:
        first = {"token_ids": tokens[:BATCH], "padding_mask": padding[:BATCH]}
        for i, words in enumerate(_codes(model, first)):
            arrays[f"codes_{i}"] = words
    losses = []
    for step in range(STEPS):  # one `fit` per step, to read the weights after each
        batch = slice(step * BATCH, (step + 1) * BATCH)
        history = model.fit({"token_ids": tokens[batch], "padding_mask": padding[batch]},
                            y[batch], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        losses.append(history.history["loss"][0])
        for i, w in enumerate(model.get_weights()):
            arrays[f"step{step + 1}_{i}"] = np.asarray(w)
    np.savez(f"{out}_{run}.npz", **arrays)
    result = {"loss": losses, "kernel_sharding": shardings}
    if layout == "1" or bits_name != "8" or dropout:
        return result

    # The compiled train_step at global batch BATCH, its inputs sharded as
    # `fit` shards them: its collectives, with their element counts.
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    specs = {"token_ids": ((BATCH, SEQ), jnp.int32), "padding_mask": ((BATCH, SEQ), jnp.bool_),
             "y": ((BATCH, SEQ, HIDDEN), jnp.float32)}
    distribution = keras.distribution.distribution()
    structs = {key: jax.ShapeDtypeStruct(
        shape, dtype, sharding=distribution.get_data_layout(shape).backend_layout)
        for key, (shape, dtype) in specs.items()}
    y_struct = structs.pop("y")
    hlo = jax.jit(model.train_step, donate_argnums=0).lower(
        state, (structs, y_struct)).compile().as_text()
    if os.environ.get("DUMP_HLO"):
        with open(f"{out}_{run}.hlo", "w") as f:
            f.write(hlo)
    result["collectives"] = _collectives(hlo)
    return result


def _codes(model, x) -> list:
    """The uint32 words the BLPA units keep from the training forward of `x`
    (the residuals of its vjp), gathered."""
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    distribution = keras.distribution.distribution()
    if distribution is not None:
        x = {k: jax.device_put(v, distribution.get_data_layout(v.shape).backend_layout)
             for k, v in x.items()}
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def residual_words(trainable, x):
        _, pull = jax.vjp(lambda t: model.stateless_call(t, frozen, x, training=True)[0],
                          trainable)
        return [leaf for leaf in jax.tree.leaves(pull) if leaf.dtype == jnp.uint32]

    return [np.asarray(w) for w in jax.jit(residual_words)(trainable, x)]


def _collectives(hlo: str) -> list:
    """`[kind, dtype, elements, op_name]` of every collective (each part of
    a combined one)."""
    found = []
    kinds = "all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter"
    for m in re.finditer(rf"= (\(.*?\)|\w+\[[\d,]*\]\S*) ({kinds})(?:-start)?\((.*)", hlo):
        op_name = re.search(r'op_name="([^"]*)"', m.group(3))
        for part in re.finditer(r"(\w+)\[([\d,]*)\]", m.group(1)):
            dims = [int(d) for d in part.group(2).split(",") if d]
            found.append([m.group(2), part.group(1), int(math.prod(dims)),
                          op_name.group(1) if op_name else ""])
    return found


if __name__ == "__main__":
    main()
