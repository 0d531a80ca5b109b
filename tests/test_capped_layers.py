"""Fused layers with a capped ReLU (`max_value`, ReLU6) against stock
BatchNormalization -> ReLU(max_value) -> Conv2D/Dense: outputs, gradients
(equal with bits=None, close at 4 and 8 bits), XLA against eager, naive
inference, configs and bad arguments, on both paths (the compiled op with
its cap, and the pure-TF quantizer with the op disabled or under XLA)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from stock import StockUnit, cosine, fused_weights, randomize_bn

import keras_blpa

COSINE_FLOOR = {8: 0.999, 4: 0.99}
CASES = [
    ("conv", dict(filters=5, kernel_size=3, padding="same"), (3, 9, 9, 8)),
    ("conv", dict(filters=4, kernel_size=3, groups=2, strides=2), (3, 9, 9, 8)),
    ("dense", dict(units=6, pooling="avg"), (3, 5, 5, 8)),
]
IDS = ["conv", "conv-groups", "dense-pooled"]


def _make(kind, kwargs, bits, shape, rng, cap, naive=False):
    cls = keras_blpa.BNReLUConv2D if kind == "conv" else keras_blpa.BNReLUDense
    layer = cls(bits=bits, naive=naive, max_value=cap, **kwargs)
    layer.build(shape)
    randomize_bn(layer, shape[-1], rng)
    # wide gammas so that a good share of activations saturates at either cap
    layer.gamma.assign(layer.gamma * (4.0 if cap >= 6 else 1.0))
    if layer.use_bias:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return layer, StockUnit(layer, shape)


def _input(rng, shape):
    return tf.constant(rng.normal(0.5, 2.0, shape).astype("float32"))


def _grads(fn, weights, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.sin(fn(x, training=True)) * fn(x, training=True))
    return tape.gradient(loss, [x, *weights])


def _saturated_share(layer, x) -> float:
    mean, var = tf.nn.moments(x, [0, 1, 2])
    y = (x - mean) * tf.math.rsqrt(var + layer.epsilon) * layer.gamma + layer.beta
    return float(tf.reduce_mean(tf.cast(y >= layer.max_value, tf.float32)))


@pytest.mark.parametrize("cap", [6.0, 0.8])
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("kind,kwargs,shape", CASES, ids=IDS)
def test_capped_relu_matches_stock(kind, kwargs, shape, bits, cap, implementation):
    rng = np.random.default_rng(21)
    layer, stock = _make(kind, kwargs, bits, shape, rng, cap)
    x = _input(rng, shape)
    assert _saturated_share(layer, x) > 0.05  # the cap's kink is exercised
    for training in (True, False):
        np.testing.assert_allclose(
            layer(x, training=training), stock(x, training=training), rtol=1e-4, atol=1e-4
        )
    ours = _grads(layer, fused_weights(layer), x)
    ref = _grads(stock, stock.weights, x)
    plain = keras_blpa.BNReLUConv2D if kind == "conv" else keras_blpa.BNReLUDense
    uncapped = plain.from_config({**layer.get_config(), "max_value": None})
    uncapped.build(shape)
    uncapped.set_weights(layer.get_weights())
    relu_grads = _grads(uncapped, fused_weights(uncapped), x)
    for a, b, c in zip(ours, ref, relu_grads):
        if bits is None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
        else:
            assert cosine(a, b) >= COSINE_FLOOR[bits]
        assert cosine(a, c) < 0.9999  # the cap reaches the gradients


@pytest.mark.parametrize("bits", [None, 4])
def test_capped_relu_under_xla_matches_eager(bits):
    rng = np.random.default_rng(22)
    kind, kwargs, shape = CASES[0]
    layer, _ = _make(kind, kwargs, bits, shape, rng, 6.0)
    x = _input(rng, shape)
    weights = fused_weights(layer)
    eager = _grads(layer, weights, x)
    compiled = tf.function(lambda x: _grads(layer, weights, x), jit_compile=True)(x)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_naive_capped_inference_quantizes_the_capped_output():
    rng = np.random.default_rng(23)
    kind, kwargs, shape = CASES[-1]
    layer, stock = _make(kind, kwargs, 8, shape, rng, 0.8, naive=True)
    x = _input(rng, shape)
    out, ref = layer(x, training=False), stock(x, training=False)
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())
    assert not np.allclose(out, ref, rtol=1e-6, atol=1e-6)  # it is quantized


def test_config_round_trip_and_old_configs():
    layer = keras_blpa.BNReLUConv2D(4, 3, bits=4, max_value=6)
    config = layer.get_config()
    assert config["max_value"] == 6.0
    assert keras_blpa.BNReLUConv2D.from_config(config).max_value == 6.0
    old = {k: v for k, v in config.items() if k != "max_value"}
    assert keras_blpa.BNReLUConv2D.from_config(old).max_value is None


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "6", True])
def test_bad_max_value_names_it(bad):
    with pytest.raises(ValueError, match="max_value"):
        keras_blpa.BNReLUDense(4, max_value=bad)


def test_a_cap_with_a_leaky_slope_is_refused():
    with pytest.raises(ValueError, match="max_value.*negative_slope"):
        keras_blpa.BNReLUConv2D(4, 3, max_value=6.0, negative_slope=0.1)
