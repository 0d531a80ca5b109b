"""The compiled CPU kernels of the transformer units' codes (TensorFlow's
`row_kernels`) against the pure-TF codes they replace: the same codes and
the same gradients bit for bit, used only where they apply, and one warning
then the pure path when the library lacks them."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from kernel_requirement import kernels_unavailable

import keras_blpa
from keras_blpa.backend.tensorflow import kernels, row_kernels
from keras_blpa.transformer import codes, derivative


@pytest.fixture
def compiled(op_lib):
    if not row_kernels.compiled():
        kernels_unavailable("the op library has no row-code ops")


def _pure(monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    assert codes.compiled_codes() is None


def _values(shape, seed=0):
    v = np.random.default_rng(seed).standard_normal(shape).astype("float32") * 3
    v[1] = 2.5  # a constant row (group): scale 1, all codes 0
    v[2, ..., 0] = v[2].max() + 1e-3  # a row whose minimum and maximum are near
    return v


def _ops_in(fn, *args) -> set[str]:
    return {op.type for op in tf.function(fn).get_concrete_function(*args).graph.get_operations()}


@pytest.mark.parametrize("shape", [(37, 64), (130, 4, 16), (9, 5)])
@pytest.mark.parametrize("bits", [4, 8])
def test_row_codes_are_the_pure_codes(compiled, monkeypatch, shape, bits):
    v = tf.constant(_values(shape))

    def round_trip(v):
        words, lo, scale = codes.encode_rows(v, bits)
        return words, lo, scale, codes.decode_rows(words, lo, scale, shape, bits)

    assert {"BlpaRowEncode", "BlpaRowDecode"} <= _ops_in(round_trip, v)
    ours = [t.numpy() for t in tf.function(round_trip)(v)]
    _pure(monkeypatch)
    assert "BlpaRowEncode" not in _ops_in(round_trip, v)
    pure = [t.numpy() for t in tf.function(round_trip)(v)]
    for a, b in zip(ours, pure):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("activation,bits", [("gelu", 3), ("silu", 4), ("gelu_tanh", 2),
                                             ("relu", 1)])
def test_derivative_codes_are_the_pure_codes(compiled, monkeypatch, activation, bits):
    fit = derivative.fit(activation, bits)
    width = max(1, (len(fit.levels) - 1).bit_length())
    h = _values((45, 33), seed=1)
    h[0, : len(fit.edges)] = fit.edges  # on an edge: `h > edge` is false
    h, g = tf.constant(h), tf.constant(_values((45, 33), seed=2))

    def code_and_scale(h, g):
        words = codes.pack_derivative(h, fit.edges, width)
        return words, codes.scale_by_derivative(g, words, (45, 33), fit.levels, width)

    assert {"BlpaBinsPacked", "BlpaBinsScale"} <= _ops_in(code_and_scale, h, g)
    ours = [t.numpy() for t in code_and_scale(h, g)]
    _pure(monkeypatch)
    pure = [t.numpy() for t in code_and_scale(h, g)]
    for a, b in zip(ours, pure):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _gpt2_gradients(**options):
    hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = hub.models.GPT2Backbone(vocabulary_size=100, num_layers=2, num_heads=2,
                                       hidden_dim=16, intermediate_dim=32,
                                       max_sequence_length=16, dropout=0.0)
    model = keras_blpa.convert(backbone, **options)
    ids = np.random.default_rng(3).integers(1, 100, (2, 16)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones((2, 16), bool)}
    weight = tf.constant(np.random.default_rng(4).standard_normal((2, 16, 16)), tf.float32)

    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(inputs, training=True) * weight)
        return tape.gradient(loss, model.trainable_variables)

    return [tf.convert_to_tensor(g).numpy() for g in step(inputs)]


@pytest.mark.parametrize("options", [{}, {"transformer_bits": 4, "derivative_bits": 1}])
def test_converted_gpt2_gradients_are_the_pure_paths(compiled, monkeypatch, options):
    ours = _gpt2_gradients(**options)
    _pure(monkeypatch)
    pure = _gpt2_gradients(**options)
    assert len(ours) == len(pure) > 0
    for a, b in zip(ours, pure):
        np.testing.assert_array_equal(a, b)


def test_xla_keeps_the_pure_codes(compiled):
    v = tf.constant(_values((16, 8)))
    graph = tf.function(lambda v: codes.encode_rows(v, 8), jit_compile=True)
    ops = {op.type for op in graph.get_concrete_function(v).graph.get_operations()}
    assert "BlpaRowEncode" not in ops and "Min" in ops


def test_a_library_without_the_row_ops_warns_once_then_runs_pure(monkeypatch):
    stale = type("Stale", (), {})()  # a loaded library of older sources
    monkeypatch.setattr(kernels, "load", lambda: stale)
    monkeypatch.setattr(row_kernels, "_warned_stale", False)
    v = tf.constant(_values((12, 8)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [codes.encode_rows(v, 4) for _ in range(3)]
    ours = [w for w in caught if "row-code ops" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "build_ops" in str(ours[0].message)
    assert results[0][0].dtype == tf.uint32  # the pure path's words
    monkeypatch.setattr(kernels, "load", lambda: None)  # no library at all: pure, no new warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = codes.encode_rows(v, 4)
    assert not [w for w in caught if "row-code ops" in str(w.message)]
    np.testing.assert_array_equal(again[0].numpy(), results[0][0].numpy())
