"""The fused layers on Keras's JAX backend against stock Keras layers on JAX.

Outputs, gradients (exact at bits=None, close at 4 and 8 bits), BN's moving
statistics, naive inference, dtypes and errors, for the options of both
layers. Gradients come from `jax.value_and_grad` of `stateless_call` under
`jax.jit`, as `model.fit` computes them.
"""

from __future__ import annotations

import gradient_oracle as oracle
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from stock import StockUnit, cosine, fused_weights, randomize_bn

import keras_blpa

CONV_CASES = {
    "same3x3": dict(filters=6, kernel_size=3),
    "valid_stride2": dict(filters=5, kernel_size=3, strides=2, padding="valid"),
    "explicit_pad": dict(filters=4, kernel_size=3, padding=((1, 0), (2, 1))),
    "dilated": dict(filters=4, kernel_size=3, dilation_rate=2),
    "groups": dict(filters=6, kernel_size=3, groups=2),
    "no_bias_center_scale": dict(filters=4, kernel_size=1, use_bias=False, center=False,
                                 scale=False),
    "leaky": dict(filters=4, kernel_size=3, negative_slope=0.2),
    "relu6": dict(filters=4, kernel_size=3, max_value=6.0),
    "capped": dict(filters=4, kernel_size=3, strides=2, max_value=1.5),
}
DENSE_CASES = {
    "rank2": (dict(units=5), (16, 12)),
    "rank3": (dict(units=3), (4, 6, 12)),
    "pooled": (dict(units=7, pooling="avg"), (4, 6, 6, 12)),
    "capped": (dict(units=5, max_value=1.0), (16, 12)),
}


def _model(layer, shape):
    inputs = keras.Input(shape[1:])
    return keras.Model(inputs, layer(inputs))


def _loss_and_grads(model, x, seed):
    """`sum(outputs * seed)` and its gradients w.r.t. the trainable variables
    (jitted), and the non-trainable variables after the step."""
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        y, new_fixed = model.stateless_call(trainable, fixed, x, training=True)
        return jnp.sum(y * seed), new_fixed

    (value, new_fixed), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return float(value), [np.asarray(g) for g in grads], [np.asarray(v) for v in new_fixed]


def _stock_model(fused, shape):
    unit = StockUnit(fused, shape)
    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, unit(inputs, training=None))
    return unit, model


def _pair(make, shape, bits, seed=0):
    rng = np.random.default_rng(seed)
    fused = make(bits)
    fused.build(shape)
    randomize_bn(fused, shape[-1], rng)
    unit, stock = _stock_model(fused, shape)
    return _model(fused, shape), fused, stock, unit, rng


def _conv(case):
    return lambda bits: keras_blpa.BNReLUConv2D(bits=bits, **CONV_CASES[case])


def _dense(case):
    return lambda bits: keras_blpa.BNReLUDense(bits=bits, **DENSE_CASES[case][0])


CASES = [(f"conv_{c}", _conv(c), (4, 9, 9, 8 if c != "groups" else 8)) for c in CONV_CASES] + [
    (f"dense_{c}", _dense(c), DENSE_CASES[c][1]) for c in DENSE_CASES
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_matches_stock_layers(name, make, shape, bits):
    model, fused, stock, unit, rng = _pair(make, shape, bits)
    x = (2.0 * rng.normal(size=shape) + 0.5).astype("float32")
    # The forward pass is exact at every bit width, in training and inference.
    for training in (True, False):
        np.testing.assert_allclose(
            model(x, training=training), stock(x, training=training), rtol=1e-5, atol=1e-5
        )
    out_shape = tuple(stock(x, training=False).shape)
    seed = rng.normal(size=out_shape).astype("float32")
    value, grads, fixed = _loss_and_grads(model, x, seed)
    stock_value, stock_grads, stock_fixed = _loss_and_grads(stock, x, seed)
    np.testing.assert_allclose(value, stock_value, rtol=1e-4, atol=1e-4)
    # Variables in the same order: gamma, beta, kernel, bias (as present).
    assert [g.shape for g in grads] == [g.shape for g in stock_grads]
    assert [w.shape for w in fused_weights(fused)] == [w.shape for w in unit.weights]
    for g, s in zip(grads, stock_grads):
        if bits is None:
            np.testing.assert_allclose(g, s, rtol=2e-4, atol=2e-4 * np.abs(s).max())
        else:
            assert cosine(g, s) > (0.999 if bits == 8 else 0.98), (name, cosine(g, s))
    # Moving statistics after the step: those of stock BN.
    for f, s in zip(fixed, stock_fixed):
        np.testing.assert_allclose(f, s, rtol=1e-5, atol=1e-6)


def test_projection_head_matches_two_stock_convolutions():
    shape = (4, 8, 8, 6)
    fused = keras_blpa.BNReLUConv2D(5, 3, strides=2, projection_filters=7, bits=None)
    fused.build(shape)
    rng = np.random.default_rng(3)
    randomize_bn(fused, 6, rng)
    x = rng.normal(size=shape).astype("float32")
    inputs = keras.Input(shape[1:])
    bn = keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3)
    a = keras.layers.ReLU()(bn(inputs))
    conv = keras.layers.Conv2D(5, 3, strides=2, padding="same")
    proj = keras.layers.Conv2D(7, 1, strides=2, use_bias=False)
    stock = keras.Model(inputs, [conv(a), proj(a)])
    for w in ("gamma", "beta", "moving_mean", "moving_variance"):
        getattr(bn, w).assign(getattr(fused, w))
    conv.kernel.assign(fused.kernel)
    conv.bias.assign(fused.bias)
    proj.kernel.assign(fused.projection_kernel)
    fused_model = _model(fused, shape)
    for training in (True, False):
        for f, s in zip(fused_model(x, training=training), stock(x, training=training)):
            np.testing.assert_allclose(f, s, rtol=1e-5, atol=1e-5)

    def total(model):
        trainable = [v.value for v in model.trainable_variables]
        fixed = [v.value for v in model.non_trainable_variables]

        def loss(trainable):
            out, _ = model.stateless_call(trainable, fixed, x, training=True)
            return jnp.sum(out[0] ** 2) + jnp.sum(jnp.sin(out[1]))

        return jax.jit(jax.grad(loss))(trainable)

    by_path = {v.path.split("/")[-1]: g for v, g in zip(fused_model.trainable_variables,
                                                         total(fused_model))}
    stock_grads = dict(zip(["gamma", "beta", "kernel", "bias", "proj"], total(stock)))
    np.testing.assert_allclose(by_path["projection_kernel"], stock_grads["proj"],
                               rtol=2e-4, atol=2e-5)
    for name in ("gamma", "beta", "kernel", "bias"):
        np.testing.assert_allclose(by_path[name], stock_grads[name], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("bits,max_value", [(4, None), (8, None), (4, 1.5), (8, 6.0)])
def test_naive_inference_quantizes_with_the_moving_statistics(bits, max_value):
    shape = (4, 6, 6, 8)
    fused = keras_blpa.BNReLUConv2D(4, 3, bits=bits, naive=True, use_bias=False,
                                    max_value=max_value)
    fused.build(shape)
    rng = np.random.default_rng(5)
    randomize_bn(fused, 8, rng)
    # An input whose codes are known without the library's encoder.
    x, codes = oracle.bin_centred_input(fused, shape, rng)
    expected = oracle.naive_inference(fused, codes)
    np.testing.assert_allclose(fused(x, training=False), expected, rtol=1e-5, atol=1e-5)
    exact = keras_blpa.BNReLUConv2D.from_config({**fused.get_config(), "naive": False})
    exact.build(shape)
    exact.set_weights(fused.get_weights())
    assert not np.allclose(exact(x, training=False), expected, atol=1e-3)


@pytest.mark.parametrize("max_value", [None, 1.5])
def test_naive_training_follows_exact_training(max_value):
    """A naive model trains with `fit` on JAX: its losses stay finite and near
    the exact model's from the same weights (4 bits: one rounding per unit
    in the forward, no drift in three units); its weights do move."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = (x.mean(axis=(1, 2)) @ rng.normal(size=(3, 2))).astype("float32")
    losses, models = [], []
    for naive in (True, False):
        keras.utils.set_random_seed(3)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
        for _ in range(3):
            h = keras_blpa.BNReLUConv2D(8, 3, bits=4, naive=naive, max_value=max_value)(h)
        model = keras.Model(inputs, keras_blpa.BNReLUDense(2, pooling="avg", bits=4,
                                                           naive=naive)(h))
        model.compile(keras.optimizers.SGD(0.05), "mse")
        start = [w.copy() for w in model.get_weights()]
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
        losses.append(history.history["loss"])
        models.append((model, start))
    assert np.isfinite(losses[0]).all()
    np.testing.assert_allclose(losses[0], losses[1], rtol=0.1)
    assert losses[0][-1] < losses[0][0]
    model, start = models[0]
    assert any(not np.array_equal(w, s) for w, s in zip(model.get_weights(), start))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("bits", [None, 4])
def test_mixed_precision_computes_bn_in_float32(policy, bits):
    shape = (4, 8, 8, 8)
    x = np.random.default_rng(7).normal(size=shape).astype("float32")
    reference = keras_blpa.BNReLUConv2D(4, 3, bits=bits)
    reference.build(shape)
    keras.mixed_precision.set_global_policy(policy)
    layer = keras_blpa.BNReLUConv2D(4, 3, bits=bits)
    layer.build(shape)
    keras.mixed_precision.set_global_policy("float32")
    layer.set_weights(reference.get_weights())
    assert layer.gamma.dtype == "float32" and layer.kernel.dtype == "float32"
    model = _model(layer, shape)
    out = model(x, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == policy.removeprefix("mixed_")
    tolerance = 3e-2 if policy == "mixed_bfloat16" else 3e-3
    np.testing.assert_allclose(np.asarray(out, "float32"), reference(x, training=True),
                               rtol=tolerance, atol=tolerance)
    seed = np.ones(out.shape, "float32")
    _, grads, fixed = _loss_and_grads(model, x, seed)
    assert all(np.isfinite(g).all() for g in grads)
    assert [g.dtype for g in grads] == ["float32"] * len(grads)
    assert all(f.dtype == np.float32 for f in fixed)


@pytest.mark.parametrize("make,shape,match", [
    (lambda: keras_blpa.BNReLUConv2D(4, 3), (4, 8, 8), "4-D input"),
    (lambda: keras_blpa.BNReLUDense(4, pooling="avg"), (4, 8), "4-D input"),
])
def test_wrong_rank_is_a_clear_error(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make()(np.zeros(shape, "float32"))


def test_integer_input_is_a_clear_error():
    layer = keras_blpa.BNReLUConv2D(4, 3)
    with pytest.raises(ValueError, match="Unsupported input dtype int32.*cast the input"):
        layer(np.zeros((2, 4, 4, 3), "int32"))


def test_channels_first_is_a_clear_error():
    with pytest.raises(ValueError, match="channels_last"):
        keras_blpa.BNReLUConv2D(4, 3, data_format="channels_first")


def test_synchronized_layers_build_and_train_as_unsynchronized_ones():
    """Stock BatchNormalization(synchronized=True) raises on JAX (Keras 3.15);
    ours is accepted, so that files saved on TensorFlow load: under jit the
    batch moments are the global batch's anyway."""
    shape = (4, 6, 6, 5)
    x = np.random.default_rng(9).normal(size=shape).astype("float32")
    plain = keras_blpa.BNReLUConv2D(3, 3, bits=4)
    plain.build(shape)
    synced = keras_blpa.BNReLUConv2D.from_config({**plain.get_config(), "synchronized": True})
    synced.build(shape)
    synced.set_weights(plain.get_weights())
    seed = np.ones((4, 6, 6, 3), "float32")
    a = _loss_and_grads(_model(plain, shape), x, seed)
    b = _loss_and_grads(_model(synced, shape), x, seed)
    np.testing.assert_array_equal(a[0], b[0])
    for g, h in zip(a[1] + a[2], b[1] + b[2]):
        np.testing.assert_array_equal(g, h)


@pytest.mark.parametrize("custom_calls", ["1", "0"], ids=["custom-calls", "jnp"])
@pytest.mark.parametrize("bits", [None, 4])
def test_second_order_gradients_raise_a_clear_error(bits, custom_calls, monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS", custom_calls)
    layer = keras_blpa.BNReLUConv2D(3, 3, bits=bits, name="unit")
    model = _model(layer, (2, 5, 5, 4))
    x = np.random.default_rng(11).normal(size=(2, 5, 5, 4)).astype("float32")
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(x):
        return jnp.sum(model.stateless_call(trainable, fixed, x, training=True)[0] ** 2)

    assert np.isfinite(np.asarray(jax.grad(loss)(x))).all()  # first order works
    with pytest.raises(NotImplementedError, match="Second-order gradients.*'unit'"):
        jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x)
