"""The fused layers honour Keras's regularizers, constraints and initializers
as the stock layers they replace do."""

import keras
import numpy as np
import pytest

import keras_blpa


def _fused_and_stock(kind: str, **options):
    """A fused layer and its stock twin (`to_standard`) in models, same weights."""
    inputs = keras.Input((6, 6, 4))
    if kind == "conv":
        layer = keras_blpa.BNReLUConv2D(3, 3, bits=4, **options)
    else:
        layer = keras_blpa.BNReLUDense(3, pooling="avg", bits=4, **options)
    fused = keras.Model(inputs, layer(inputs))
    return fused, layer, keras_blpa.to_standard(fused)


REGULARIZED = dict(kernel_regularizer=keras.regularizers.L2(0.1),
                   bias_regularizer=keras.regularizers.L1(0.2),
                   gamma_regularizer=keras.regularizers.L2(0.3),
                   beta_regularizer=keras.regularizers.L1(0.4))


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_regularization_losses_equal_the_stock_layers(kind):
    fused, layer, stock = _fused_and_stock(kind, **REGULARIZED)
    rng = np.random.default_rng(0)
    for v in fused.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    stock = keras_blpa.to_standard(fused)
    x = rng.normal(size=(2, 6, 6, 4)).astype("float32")
    fused(x, training=True)
    stock(x, training=True)
    assert len(fused.losses) == 4
    np.testing.assert_allclose(sorted(float(v) for v in fused.losses),
                               sorted(float(v) for v in stock.losses), rtol=1e-6)
    expected = (0.1 * np.sum(np.square(layer.kernel)) + 0.2 * np.sum(np.abs(layer.bias))
                + 0.3 * np.sum(np.square(layer.gamma)) + 0.4 * np.sum(np.abs(layer.beta)))
    np.testing.assert_allclose(sum(float(v) for v in fused.losses), expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_constraints_hold_after_a_training_step(kind):
    fused, layer, _ = _fused_and_stock(
        kind, kernel_constraint=keras.constraints.NonNeg(),
        gamma_constraint=keras.constraints.MaxNorm(0.5, axis=0),
    )
    fused.compile(keras.optimizers.SGD(1.0), "mse")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6, 6, 4)).astype("float32")
    y = rng.normal(size=fused.output_shape[1:]).astype("float32")[None].repeat(8, 0)
    before = layer.kernel.numpy().copy()
    fused.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(layer.kernel.numpy(), before)  # it did train
    assert (layer.kernel.numpy() >= 0).all()
    assert np.linalg.norm(layer.gamma.numpy()) <= 0.5 + 1e-5


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_initializers_set_the_weights(kind):
    _, layer, _ = _fused_and_stock(
        kind, kernel_initializer="ones", bias_initializer=keras.initializers.Constant(0.25),
        gamma_initializer=keras.initializers.Constant(2.0), beta_initializer="ones",
        moving_variance_initializer=keras.initializers.Constant(4.0),
    )
    assert (layer.kernel.numpy() == 1).all() and (layer.bias.numpy() == 0.25).all()
    assert (layer.gamma.numpy() == 2).all() and (layer.beta.numpy() == 1).all()
    assert (layer.moving_variance.numpy() == 4).all()
