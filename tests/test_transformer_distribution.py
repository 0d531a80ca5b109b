"""A converted KerasHub GPT-2 backbone under `tf.distribute.MirroredStrategy`
over two logical CPU devices, against one replica (TensorFlow).

Two logical devices have to be configured before TensorFlow initializes its
devices, so the runs happen in one child process (this file run as a
script). `fit` of global batch 8 runs each replica on 4 samples; Keras scales
each replica's mean loss by 1/2 and MirroredStrategy sums the gradients, so a
step is the one-replica step on the whole batch up to the order of float
sums. Tolerances as in `tests/jax_backend/test_jax_transformer_distribution.py`:
`bits=None` within 8x stock KerasHub's own 1-vs-2-replica spread in the same
run, 8 bits within a tenth of what 8-bit quantization changes (a value within
an ulp of a rounding point may take the neighbouring code).

With dropout each replica draws its masks from the same seed (stock Keras
layers do too), so the masks are not one replica's: that run is only
checked to train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

BATCH, SEQ, HIDDEN, VOCAB, STEPS = 8, 16, 32, 100, 2
RUNS = ("stock", "none", "8")
FLOAT_ULP = 1.2e-7
NONE_MARGIN = 8.0
CODE_MARGIN = 10.0


def _child() -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_hub

    import keras_blpa

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (STEPS * BATCH, SEQ)).astype("int32")
    lengths = rng.integers(SEQ // 2, SEQ + 1, STEPS * BATCH)
    # An int32 padding mask: stock KerasHub fails on a bool one under
    # MirroredStrategy ("Value for attr 'T' of bool is not in the list of
    # allowed values", an AddN), converted or not.
    padding = (np.arange(SEQ)[None, :] < lengths[:, None]).astype("int32")
    x = {"token_ids": tokens, "padding_mask": padding}
    y = rng.normal(size=(STEPS * BATCH, SEQ, HIDDEN)).astype("float32")

    def train(bits_name: str, strategy, dropout: float = 0.0) -> dict:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras_hub.models.GPT2Backbone(
                vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=HIDDEN,
                intermediate_dim=64, max_sequence_length=SEQ, dropout=dropout)
            model.set_weights([
                ((1.0 if v.path.endswith("gamma") else 0.0)
                 + np.random.default_rng(i).normal(0, 0.2, v.shape)).astype("float32")
                for i, v in enumerate(model.weights)])
            if bits_name != "stock":
                bits = None if bits_name == "none" else int(bits_name)
                model = keras_blpa.convert(model, transformer_bits=bits)
                assert any(type(layer).__module__.startswith("keras_blpa.layers")
                           for layer in model.layers)
            model.compile(keras.optimizers.SGD(0.5), loss="mse")
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        return {"loss": history.history["loss"][0],
                "weights": [np.asarray(w) for w in model.get_weights()],
                "jit_compile": bool(model.jit_compile)}

    one = tf.distribute.get_strategy()
    trained = {(run, n): train(run, s) for run in RUNS for n, s in (("1", one), ("2", mirrored))}

    def distance(a, b):
        return max(float(np.max(np.abs(u - v)))
                   for u, v in zip(trained[a]["weights"], trained[b]["weights"]))

    results = {}
    for run in RUNS:
        results[run] = {"loss_1": trained[(run, "1")]["loss"],
                        "loss_2": trained[(run, "2")]["loss"],
                        "jit_compile": trained[(run, "2")]["jit_compile"],
                        "distance": distance((run, "2"), (run, "1"))}
    # What 8-bit quantization itself changes.
    results["8"]["quantization"] = distance(("8", "1"), ("stock", "1"))
    for run in ("stock", "8"):
        dropped = train(run, mirrored, dropout=0.1)
        results[f"{run}-drop"] = {
            "loss": dropped["loss"],
            "finite": all(bool(np.all(np.isfinite(w))) for w in dropped["weights"]),
            "moved": max(float(np.max(np.abs(u - v)))
                         for u, v in zip(dropped["weights"], trained[(run, "2")]["weights"]))}
    return results


@pytest.fixture(scope="module")
def mirrored():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fit_on_two_replicas_matches_one(mirrored):
    """Two SGD steps: stock, `transformer_bits=None` and 8 bits on two
    replicas against one, on the same global batch (graph mode: Keras's
    default here; `jit_compile=True` under a strategy cannot run on CPU,
    docs/scaling.md)."""
    tolerance = NONE_MARGIN * max(mirrored["stock"]["distance"], FLOAT_ULP)
    assert mirrored["none"]["distance"] <= tolerance, mirrored
    quantization = mirrored["8"]["quantization"]
    assert quantization > 100 * tolerance, mirrored
    assert mirrored["8"]["distance"] <= quantization / CODE_MARGIN, mirrored
    for run in RUNS:  # the mean of the two steps' losses
        np.testing.assert_allclose(mirrored[run]["loss_2"], mirrored[run]["loss_1"], rtol=1e-5)


def test_dropout_trains_on_two_replicas(mirrored):
    for name in ("stock", "8"):
        run = mirrored[f"{name}-drop"]
        assert run["finite"] and np.isfinite(run["loss"]), run
        assert run["moved"] > 1e-3, run  # the masks are in effect


if __name__ == "__main__" and "--child" in sys.argv:
    print(json.dumps(_child()))
