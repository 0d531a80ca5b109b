"""ReLU -> linear layers without a BN in front (`ReLUConv2D`, `ReLUDense`)
against stock ReLU -> Conv2D / Dense: outputs, the activation passed through
to a shortcut, gradients (equal with bits=None, the input gradient's mask
exact and the weight gradients close at 4 and 8 bits), XLA against eager, the
one-sided grid, configs, saving and bad arguments, on both paths."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from stock import cosine

import keras_blpa
from keras_blpa.backend.tensorflow import quantizer, relu_unit

L = keras.layers
COSINE_FLOOR = {8: 0.9995, 4: 0.99}
CASES = {
    "conv": dict(filters=6, kernel_size=3, strides=2),
    "conv-projection": dict(filters=5, kernel_size=1, strides=2, projection_filters=7,
                            projection_use_bias=True),
    "conv-groups-dilated": dict(filters=4, kernel_size=3, groups=2, dilation_rate=2,
                                padding="valid"),
    "dense-pooled": dict(units=6, pooling="avg"),
}
SHAPE = (3, 9, 9, 8)


def _input(rng, shape=SHAPE):
    # Post-add inputs: shifted, so that channels differ in how much is positive.
    shift = rng.normal(0.0, 1.0, shape[-1]).astype("float32")
    return tf.constant(rng.normal(0.0, 1.5, shape).astype("float32") + shift)


def _pair(case, bits, return_activation=True):
    """The fused layer, randomized, and the stock layers with its weights."""
    kwargs = CASES[case]
    rng = np.random.default_rng(3)
    if case.startswith("dense"):
        layer = keras_blpa.ReLUDense(bits=bits, return_activation=return_activation, **kwargs)
    else:
        layer = keras_blpa.ReLUConv2D(bits=bits, return_activation=return_activation, **kwargs)
    layer.build(SHAPE)
    for w in layer.weights:
        w.assign(rng.normal(0.0, 0.3, w.shape).astype("float32"))
    if case.startswith("dense"):
        stock = [keras.Sequential([L.GlobalAveragePooling2D(), L.Dense(kwargs["units"])])]
        stock[0].build(SHAPE)
        stock[0].layers[1].set_weights([layer.kernel, layer.bias])
        weights = [layer.kernel, layer.bias]
    else:
        conv_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("projection")}
        conv_kwargs.setdefault("padding", "same")
        stock = [L.Conv2D(**conv_kwargs)]
        stock[0].build(SHAPE)
        stock[0].set_weights([layer.kernel, layer.bias])
        weights = [layer.kernel, layer.bias]
        if "projection_filters" in kwargs:
            proj = L.Conv2D(kwargs["projection_filters"], 1, strides=kwargs["strides"])
            proj.build(SHAPE)
            proj.set_weights([layer.projection_kernel, layer.projection_bias])
            stock.append(proj)
            weights += [layer.projection_kernel, layer.projection_bias]
    return layer, stock, weights


def _stock_call(stock, z, return_activation=True):
    a = L.ReLU()(z)
    return [s(a) for s in stock] + ([a] if return_activation else [])


def _grads(fn, variables, z):
    with tf.GradientTape() as tape:
        tape.watch(z)
        outputs = fn(z)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        loss = sum(tf.reduce_sum(tf.sin(o) * o) for o in outputs)
    grads = tape.gradient(loss, [z, *variables])
    return [np.asarray(g) for g in grads] if tf.executing_eagerly() else grads


def _stock_variables(stock):
    return [w for s in stock for w in s.trainable_weights]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_stock_relu_then_linear(case, bits, implementation):
    layer, stock, weights = _pair(case, bits)
    z = _input(np.random.default_rng(0))
    for training in (True, False):
        ours = layer(z, training=training)
        ref = _stock_call(stock, z)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ours[-1], tf.nn.relu(z))  # the passed-through activation
    ours = _grads(lambda t: layer(t, training=True), weights, z)
    ref = _grads(lambda t: _stock_call(stock, t), _stock_variables(stock), z)
    # The input gradient: the mask `z > 0` rebuilt from the codes is exact.
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5 * np.abs(ref[0]).max())
    for a, b in zip(ours[1:], ref[1:]):
        if bits is None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
        else:
            assert cosine(a, b) >= COSINE_FLOOR[bits]


def test_eight_bits_closer_than_four():
    z = _input(np.random.default_rng(1))
    errors = {}
    for bits in (8, 4):
        layer, stock, weights = _pair("conv", bits)
        ours = _grads(lambda t, layer=layer: layer(t, training=True), weights, z)
        ref = _grads(lambda t, stock=stock: _stock_call(stock, t), _stock_variables(stock), z)
        errors[bits] = np.linalg.norm(ours[1] - ref[1]) / np.linalg.norm(ref[1])
    assert 0 < errors[8] < errors[4] / 4, errors


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("case", ["conv-projection", "dense-pooled"])
def test_xla_matches_eager(case, bits):
    layer, _, weights = _pair(case, bits)
    z = _input(np.random.default_rng(2))
    eager = _grads(lambda t: layer(t, training=True), weights, z)
    compiled = tf.function(
        lambda t: _grads(lambda u: layer(u, training=True), weights, t), jit_compile=True
    )(z)
    for a, b in zip(eager, compiled):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_one_sided_grid_puts_zero_on_the_threshold_edge():
    """z <= 0 gets code 0 (the bin below the threshold edge), 0 < z <= top
    the other 15 bins, evenly; z above the top clips into the last bin."""
    rng = np.random.default_rng(4)
    z = tf.constant(rng.normal(0.5, 2.0, (64, 4, 4, 3)).astype("float32"))
    mean, inv_std, gamma, beta = relu_unit.relu_grid(z, 4, None)
    params = quantizer.quantizer_params(gamma, beta, 4)
    xhat = (z - mean) * inv_std
    codes = quantizer.encode_codes(xhat, xhat * gamma + beta > 0, params, 4)
    codes = np.asarray(codes)
    positive = np.asarray(z) > 0
    assert (codes[~positive] == 0).all() and (codes[positive] >= 1).all()
    mu, var = tf.nn.moments(z, [0, 1, 2])
    top = np.maximum(mu, 0) + 3.0 * np.sqrt(var)
    width = top / 15
    for c in range(3):
        zc, cc = np.asarray(z)[..., c], codes[..., c]
        inside = positive[..., c] & (zc < top[c] - 1e-4)
        expected = np.minimum(np.ceil(zc[inside] / width[c]), 15)
        assert np.abs(cc[inside] - expected).max() <= 1  # bin edges round either way
        assert (cc[zc > top[c]] == 15).all()


def test_a_channel_of_zeros_and_nan_inputs():
    z = np.random.default_rng(5).normal(size=SHAPE).astype("float32")
    z[..., 0] = 0.0  # no positive value: the grid's floor keeps it finite
    layer, stock, weights = _pair("conv", 4)
    grads = _grads(lambda t: layer(t, training=True), weights, tf.constant(z))
    assert all(np.isfinite(g).all() for g in grads)
    assert (grads[0][..., 0] == 0).all()
    z[0, 0, 0, 1] = np.nan
    out = layer(tf.constant(z), training=True)
    assert np.isnan(np.asarray(out[0])).any()  # NaN surfaces, as in stock layers


def test_config_and_saving_round_trip(tmp_path):
    layer, _, _ = _pair("conv-projection", 4)
    config = layer.get_config()
    assert config["return_activation"] and config["projection_use_bias"]
    assert "gamma_initializer" not in config and "naive" not in config
    clone = keras_blpa.ReLUConv2D.from_config(config)
    assert clone.get_config() == config
    inputs = keras.Input(SHAPE[1:])
    out, shortcut, a = layer(inputs)
    model = keras.Model(inputs, [out, shortcut, a])
    z = _input(np.random.default_rng(6))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for a, b in zip(model(z, training=False), loaded(z, training=False)):
        np.testing.assert_array_equal(a, b)
    dense = keras_blpa.ReLUDense(3, pooling="avg", bits=8)
    assert keras_blpa.ReLUDense.from_config(dense.get_config()).get_config() == dense.get_config()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: keras_blpa.ReLUConv2D(4, 3, momentum=0.9), "no 'momentum'"),
        (lambda: keras_blpa.ReLUConv2D(4, 3, naive=True), "no 'naive'"),
        (lambda: keras_blpa.ReLUDense(4, max_value=6.0), "no 'max_value'"),
        (lambda: keras_blpa.ReLUConv2D(4, 3, return_activation=1), "`return_activation`"),
        (lambda: keras_blpa.ReLUConv2D(4, 1, projection_use_bias=True), "projection head"),
        (lambda: keras_blpa.ReLUConv2D(4, 3, bits=3), "bits"),
        (lambda: keras_blpa.ReLUConv2D(4, 3, bits=None, window=6.0), "window"),
        (lambda: keras_blpa.ReLUConv2D(4, 3, data_format="channels_first"), "channels_last"),
    ],
)
def test_bad_arguments_name_the_argument(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_wrong_rank_and_channels():
    layer = keras_blpa.ReLUConv2D(4, 3)
    with pytest.raises(ValueError, match="4-D input"):
        layer(tf.zeros((2, 8, 8)))
    layer(tf.zeros((1, 4, 4, 3)), training=True)
    with pytest.raises(ValueError, match="built for inputs with 3 channels"):
        layer(tf.zeros((1, 4, 4, 5)))
