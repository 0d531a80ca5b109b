"""The word layout of the codes under XLA, and its fallback when TF internals move."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from keras_blpa.backend.tensorflow import kernels, quantizer, xla

SHAPES = [(3, 13, 5, 7), (2, 8, 4, 3), (1, 1, 1, 1), (9, 6), (4, 5), (2, 3, 16)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_words_round_trip_and_layout(shape, bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, shape).astype(np.uint8)
    words = quantizer.pack_words(tf.constant(codes), bits)
    assert words.dtype == tf.uint32
    assert words.shape.as_list() == quantizer.words_shape(shape, bits)
    np.testing.assert_array_equal(quantizer.unpack_words(words, list(shape), bits), codes)
    # The layout: element i of the word axis sits at bits (i % k) * bits of word i // k.
    axis, k = quantizer.word_axis(len(shape)), quantizer.codes_per_word(bits)
    index = [0] * len(shape)
    index[axis] = min(shape[axis] - 1, k + 1)
    word_index = list(index)
    word_index[axis] //= k
    word = int(words.numpy()[tuple(word_index)])
    assert (word >> ((index[axis] % k) * bits)) & ((1 << bits) - 1) == codes[tuple(index)]
    # The channel axis stays minor at full width.
    assert words.shape[-1] == shape[-1]


@pytest.mark.parametrize("bits", [4, 8])
def test_xla_words_hold_the_ops_codes_bit_for_bit(bits):
    """Under jit_compile the reduce-window packs the same codes that the
    compiled op (or its pure-TF twin) packs into flat bytes."""
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(0.3, 1.7, (3, 11, 6, 5)).astype("float32"))
    x = tf.tensor_scatter_nd_update(x, [[0, 0, 0, 0], [1, 2, 3, 4]], [np.nan, np.inf])
    mean, inv_std = tf.constant(rng.normal(size=5), tf.float32), tf.ones([5])
    gamma = tf.constant([1.0, -0.5, 0.0, 2.0, 1e-6])
    beta = tf.constant([0.2, 0.1, 0.3, -9.0, 0.0])
    params = quantizer.quantizer_params(gamma, beta, bits)
    a_ref, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    flat_codes = quantizer.unpack(packed, x.shape, bits)

    @tf.function(jit_compile=True)
    def words_codes(x):
        a, words = quantizer.bn_relu_encode_words(
            x, mean, inv_std, gamma, beta, params, bits, xla.sum_windows()
        )
        return a, quantizer.unpack_words(words, x.shape, bits)

    a, codes = words_codes(x)
    np.testing.assert_array_equal(codes.numpy(), flat_codes.numpy())
    np.testing.assert_allclose(a.numpy(), a_ref.numpy(), rtol=1e-6, atol=1e-6)


def _xla_grads(layer, x):
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        return tape.gradient(loss, [x, *layer.trainable_weights])

    return grads(x), tf.function(grads, jit_compile=True)(x)


def test_missing_reduce_window_warns_once_and_still_trains(monkeypatch):
    """A TensorFlow whose internal reduce-window op moved: one warning naming the
    memory consequence, then plain-TF packing with the same gradients."""
    barrier_only = types.SimpleNamespace(
        xla_optimization_barrier=xla._gen_xla_ops.xla_optimization_barrier
    )
    monkeypatch.setattr(xla, "_gen_xla_ops", barrier_only)
    monkeypatch.setattr(xla, "_warned", set())
    layer = keras_blpa.BNReLUConv2D(4, 3, bits=4)
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 10, 6, 3)).astype("float32"))
    layer(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager, compiled = _xla_grads(layer, x)
        tf.function(lambda x: layer(x, training=True), jit_compile=True)(x)
    messages = [str(w.message) for w in caught if "reduce-window" in str(w.message)]
    assert len(messages) == 1 and "memory" in messages[0]
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_missing_barrier_warns_once(monkeypatch):
    monkeypatch.setattr(xla, "_gen_xla_ops", types.SimpleNamespace())
    monkeypatch.setattr(xla, "_warned", set())
    layer = keras_blpa.BNReLUDense(3, bits=8)
    x = tf.constant(np.random.default_rng(3).normal(size=(8, 5)).astype("float32"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager, compiled = _xla_grads(layer, x)
    texts = [str(w.message) for w in caught]
    assert sum("optimization barrier" in t for t in texts) == 1
    assert sum("reduce-window" in t for t in texts) == 1
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_no_xla_helpers_outside_xla():
    """Outside XLA the helpers are identities: the op path is untouched."""
    t = tf.constant([1.0, 2.0])
    assert xla.tie(t, tf.constant([3], tf.uint32)) is t
    assert xla.after(t, t) is t


def test_dynamic_batch_under_xla():
    """Keras retraces `model.fit`'s step with an unknown batch size for a
    partial last batch: the Dense unit then packs along a dynamic axis."""
    rng = np.random.default_rng(4)
    conv = keras_blpa.BNReLUConv2D(4, 3, bits=4)
    dense = keras_blpa.BNReLUDense(3, pooling="avg", bits=4)
    x = tf.constant(rng.normal(size=(11, 9, 7, 2)).astype("float32"))
    dense(conv(x))
    weights = conv.trainable_weights + dense.trainable_weights

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(dense(conv(x, training=True), training=True)))
        return tape.gradient(loss, [x, *weights])

    spec = [tf.TensorSpec([None, 9, 7, 2], tf.float32)]
    compiled = tf.function(grads, jit_compile=True, input_signature=spec)
    for size in (11, 5):
        for a, b in zip(grads(x[:size]), compiled(x[:size])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
