"""Whole models under XLA (`jit_compile=True`, Keras's default on GPUs) on
TensorFlow: a builder ResNet and a converted ResNet50V2 against the same
weights in stock layers under XLA. The forward is exact; bits=None gradients
equal stock's; 4-bit gradients under XLA equal the same model's eager ones
(which `tests/test_gradient_oracle.py` checks unit by unit against the
oracle). Every floor comes from a spread measured in the same test: stock
layers eager against stock layers under XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from keras_blpa.models import preact_resnet_cifar


def _step(model, x, y, jit: bool):
    """Outputs (training mode) and gradients of a cross-entropy loss."""

    def step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True))
        return out, tape.gradient(loss, model.trainable_variables)

    out, grads = tf.function(step, jit_compile=jit)(tf.constant(x), tf.constant(y))
    return out.numpy(), {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _worst(grads, reference, names=None) -> float:
    names = names or {k: k for k in grads}
    return max(_rel(grads[k], reference[names[k]]) for k in grads)


def _compare(fused, stock, x, y):
    """Spread of stock eager vs XLA, then fused vs stock under XLA."""
    stock_out_eager, stock_eager = _step(stock, x, y, jit=False)
    stock_out, stock_xla = _step(stock, x, y, jit=True)
    spread = max(_worst(stock_xla, stock_eager), _rel(stock_out, stock_out_eager))
    floor = max(20 * spread, 1e-5)
    out, grads = _step(fused, x, y, jit=True)
    return spread, floor, out, grads, stock_out, stock_xla


@pytest.mark.parametrize("kind", ["resnet11", "resnet50v2"])
def test_whole_models_under_xla_match_stock_under_xla(kind):
    rng = np.random.default_rng(0)
    if kind == "resnet11":
        fused_exact = preact_resnet_cifar(11, classes=10, input_shape=(16, 16, 3), bits=None)
        x = rng.normal(size=(8, 16, 16, 3)).astype("float32")
    else:
        base = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3),
                                             classes=10, classifier_activation=None)
        fused_exact = keras_blpa.convert(base, bits=None)
        x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    y = (np.arange(len(x)) % 10).astype("int32")
    # Distinct values everywhere (BN's ones and zeros too), so that each
    # weight's stock twin is found by its value.
    for v in fused_exact.trainable_variables:
        v.assign(v + rng.normal(0, 0.05, v.shape).astype("float32"))
    stock = keras_blpa.to_standard(fused_exact)
    fused_4 = keras_blpa.convert(stock, bits=4)

    spread, floor, out, grads, stock_out, stock_grads = _compare(fused_exact, stock, x, y)
    # The forward (training mode) equals stock's under XLA, at both settings.
    assert _rel(out, stock_out) <= floor, (spread, _rel(out, stock_out))
    out_4, grads_4_xla = _step(fused_4, x, y, jit=True)
    assert _rel(out_4, stock_out) <= floor, (spread, _rel(out_4, stock_out))
    # bits=None: the gradients are stock's, weight for weight.
    ordered = _ordered_like(fused_exact, stock)
    worst = max(_rel(grads[f], stock_grads[s]) for f, s in ordered)
    assert worst <= floor, (spread, worst)
    # 4 bits: under XLA as eagerly (the same codes but for values exactly on a
    # ReLU threshold, where XLA's fused multiply-add may round across).
    _, grads_4_eager = _step(fused_4, x, y, jit=False)
    worst_4 = _worst(grads_4_xla, grads_4_eager)
    assert worst_4 <= max(floor, 1e-4), (spread, worst_4)


def _ordered_like(fused, stock) -> list[tuple[str, str]]:
    """(fused path, stock path) pairs holding the same weight values."""
    fused_vals = {v.path: v.numpy() for v in fused.trainable_variables}
    stock_vals = {v.path: v.numpy() for v in stock.trainable_variables}
    assert len(fused_vals) == len(stock_vals)
    pairs, free = [], list(stock_vals)
    for path in fused_vals:
        match = next(s for s in free if stock_vals[s].shape == fused_vals[path].shape
                     and np.array_equal(stock_vals[s], fused_vals[path]))
        free.remove(match)
        pairs.append((path, match))
    return pairs
