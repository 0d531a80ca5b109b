"""The weight gradient over batch slices (`linear.chunked_gradients`) on JAX.

On the custom calls a coded conv unit's weight gradient runs over four
slices of the batch, each rebuilding only its rows of the activation (the
memory this saves is measured in `test_jax_memory.py`, the program's decodes
counted in `test_jax_program.py`). Here: the gradients equal those of the
whole batch at once up to float32 rounding (the sum runs in another order),
for slices of unequal size and batches smaller than the slice count, and the
setting's errors.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_blpa
from keras_blpa.backend.jax import kernels, linear

LAYERS = {
    "bn-conv-projection": lambda bits: keras_blpa.BNReLUConv2D(
        5, 3, bits=bits, projection_filters=3, projection_strides=2),
    "bn-conv-relu6": lambda bits: keras_blpa.BNReLUConv2D(4, 3, strides=2, bits=bits,
                                                          max_value=6.0),
    "bn-dense-pooled": lambda bits: keras_blpa.BNReLUDense(6, pooling="avg", bits=bits),
    "relu-conv": lambda bits: keras_blpa.ReLUConv2D(4, 3, bits=bits),
}


def _gradients(layer_of, bits, batch: int, chunks: str, monkeypatch):
    """Gradients of `sum(outputs * seed)` w.r.t. the weights and the input,
    under `jax.jit`, with the weight gradient over `chunks` slices."""
    monkeypatch.setenv("KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS", chunks)
    keras.utils.set_random_seed(3)
    layer = layer_of(bits)
    inputs = keras.Input((8, 8, 6))
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 8, 8, 6)).astype("float32")
    seeds = [rng.normal(size=(batch, *o.shape[1:])).astype("float32")
             for o in keras.tree.flatten(outputs)]
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(trainable, x):
        y = model.stateless_call(trainable, fixed, x, training=True)[0]
        return sum(jnp.sum(o * s) for o, s in zip(keras.tree.flatten(y), seeds))

    d_weights, d_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x)
    return [np.asarray(g) for g in (*d_weights, d_x)]


@pytest.mark.parametrize("batch", [6, 3], ids=["unequal-slices", "fewer-rows-than-slices"])
@pytest.mark.parametrize("bits", [4, None], ids=["bits4", "exact"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_slices_give_the_whole_batch_gradients(name, bits, batch, monkeypatch):
    if "cpu" not in kernels.load():
        pytest.fail(f"the custom calls did not load: {kernels.load_error()}")
    if name == "relu-conv" and bits is None:
        pytest.skip("ReLUConv2D with bits=None keeps relu(z) itself: nothing to slice")
    whole = _gradients(LAYERS[name], bits, batch, "1", monkeypatch)
    sliced = _gradients(LAYERS[name], bits, batch, "4", monkeypatch)
    assert all(np.abs(g).max() > 0 for g in whole)
    for g, h in zip(sliced, whole):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=2e-6 * np.abs(h).max())


@pytest.mark.parametrize("value", ["0", "-2", "four", "1.5"])
def test_a_bad_slice_count_is_a_clear_error(value, monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS", value)
    with pytest.raises(ValueError, match="KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS.*positive"):
        linear.weight_gradient_chunks()


def test_the_slice_count_defaults_to_four(monkeypatch):
    monkeypatch.delenv("KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS", raising=False)
    assert linear.weight_gradient_chunks() == linear.DEFAULT_CHUNKS == 4
    monkeypatch.setenv("KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS", " 2 ")
    assert linear.weight_gradient_chunks() == 2


def test_memory_benchmark_compiles_the_whole_batch_variant_beside_the_sliced_one(tmp_path):
    """`benchmarks/jax_memory.py`'s `-whole` variants trace with one slice:
    side by side, the sliced 4-bit step keeps less, and the variable is
    restored afterwards."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "jax_memory.py"
    spec = importlib.util.spec_from_file_location("jax_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
        rows = module.main(["--depth", "3", "--channels", "8", "--size", "8",
                            "--variants", "4", "4-whole", "--out", str(tmp_path / "m.json")])
    finally:
        sys.path.remove(str(path.parent))
    assert [r["variant"] for r in rows] == ["4", "4-whole"]
    assert rows[1]["saved_mib_per_sample"] == rows[0]["saved_mib_per_sample"]
    assert rows[1]["mib_per_sample"] > rows[0]["mib_per_sample"]
    assert "KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS" not in os.environ
