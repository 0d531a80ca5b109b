"""Whole models under XLA (`jit_compile=True`, Keras's default on GPUs) on
TensorFlow: a builder ResNet and a converted keras.applications ResNetV2
against the same weights in stock layers under XLA, and against the gradient
oracle (`tests/gradient_oracle.py`). The ResNetV2 is Keras's own builder and
blocks with two stages of two blocks (every block kind of ResNet50V2: a
projection shortcut, a strided max-pool shortcut, an identity shortcut);
ResNet50V2 itself runs in the slow suite.

- The forward (training mode) equals stock's, at bits=None and 4 bits.
- bits=None gradients equal stock's, variable by variable.
- Inside the compiled model, every unit's gradients (its weights' and the
  one it passes to its input), given the gradient that reached its outputs,
  equal the oracle's (`tests/unit_taps.py`): the exact ones at bits=None,
  those its codes call for at 4 bits, from the codes XLA saved.
- For the builder ResNet, whose float32 rounding stays small end to end, the
  whole model's 4-bit gradients also equal the oracle's model in float64.

Floors against stock come from a spread measured in the same test: stock
eager against stock under XLA, variable by variable. A randomly initialized
ResNet50V2 amplifies float32 rounding (stock eager and stock XLA differ by
up to 8% in some BN gradients, and biases that feed a BN have a gradient of
zero plus rounding), which is why its gradients are checked unit by unit.
"""

import gradient_oracle as oracle
import keras
import numpy as np
import pytest
import tensorflow as tf
import unit_taps

import keras_blpa
from keras_blpa.models import preact_resnet_cifar


def _resnet_v2_mini():
    """`keras.applications.ResNet50V2` with two stages of two blocks instead of
    four of 3, 4, 6, 3: Keras's builder and blocks, as ResNet50V2 calls them.
    Each stage's first block has the projection shortcut, its last the stride:
    a max-pool shortcut in the first stage, the identity in the last (at
    stride 1, as in ResNet50V2's last stage)."""
    from keras.src.applications import resnet

    def stack_fn(x):
        x = resnet.stack_residual_blocks_v2(x, 64, 2, name="conv2")
        return resnet.stack_residual_blocks_v2(x, 128, 2, stride1=1, name="conv3")

    return resnet.ResNet(stack_fn, True, True, weights=None, input_shape=(32, 32, 3),
                         classes=10, classifier_activation=None, name="resnet_v2_mini")


def _step(model, x, y, jit: bool, taps=None):
    """Outputs (training mode) and gradients of a cross-entropy loss by
    variable path; with `taps` (`unit_taps.install`), also the units' records."""

    def step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True))
        return out, tape.gradient(loss, model.trainable_variables)

    if taps is None:
        out, grads = tf.function(step, jit_compile=jit)(tf.constant(x), tf.constant(y))
    else:
        (out, grads), tapped = unit_taps.traced(step, taps, jit)(tf.constant(x),
                                                                  tf.constant(y))
    grads = {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}
    if taps is None:
        return out.numpy(), grads
    return out.numpy(), grads, unit_taps.resolve(model, tapped, taps)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _model(kind, rng):
    if kind == "resnet11":
        fused_exact = preact_resnet_cifar(11, classes=10, input_shape=(16, 16, 3), bits=None)
        x = rng.normal(size=(8, 16, 16, 3)).astype("float32")
    else:
        base = (_resnet_v2_mini() if kind == "resnetv2_mini" else
                keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3),
                                              classes=10, classifier_activation=None))
        fused_exact = keras_blpa.convert(base, bits=None)
        x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    # Distinct values everywhere (BN's ones and zeros too), so that each
    # weight's stock twin, and each unit's codes, are found by value.
    for v in fused_exact.trainable_variables:
        v.assign(v + rng.normal(0, 0.05, v.shape).astype("float32"))
    return fused_exact, x


@pytest.mark.parametrize("kind", [
    "resnet11", "resnetv2_mini", pytest.param("resnet50v2", marks=pytest.mark.slow)])
def test_whole_models_under_xla(kind, monkeypatch):
    rng = np.random.default_rng(0)
    fused_exact, x = _model(kind, rng)
    y = (np.arange(len(x)) % 10).astype("int32")
    stock = keras_blpa.to_standard(fused_exact)
    fused_4 = keras_blpa.convert(stock, bits=4)

    stock_out_eager, stock_eager = _step(stock, x, y, jit=False)
    stock_out, stock_grads = _step(stock, x, y, jit=True)
    out_floor = max(20 * _rel(stock_out, stock_out_eager), 1e-5)
    floors = {k: max(20 * _rel(stock_grads[k], stock_eager[k]), 1e-5) for k in stock_grads}

    taps = unit_taps.install(monkeypatch)
    out, grads, records = _step(fused_exact, x, y, jit=True, taps=taps)
    out_4, grads_4, records_4 = _step(fused_4, x, y, jit=True, taps=taps)
    # The forward equals stock's under XLA, at both settings.
    assert _rel(out, stock_out) <= out_floor and _rel(out_4, stock_out) <= out_floor
    # bits=None: stock's gradients, variable by variable, and the exact
    # oracle's unit by unit.
    for fused_path, stock_path in _ordered_like(fused_exact, stock):
        error = _rel(grads[fused_path], stock_grads[stock_path])
        assert error <= floors[stock_path], (fused_path, error, floors[stock_path])
    assert all(r[3] is None for r in records.values())
    unit_taps.check_units(fused_exact, grads, records)
    # 4 bits: the oracle's gradients from the codes XLA saved, unit by unit.
    assert all(r[3] is not None and r[6] for r in records_4.values())  # XLA's words
    unit_taps.check_units(fused_4, grads_4, records_4)
    if kind == "resnet11":
        saved = {n: (r[0], *r[3:]) for n, r in records_4.items()}
        expected = oracle.model_gradients(fused_4, x, y, saved)
        assert set(expected) == set(grads_4)
        errors = {k: _rel(grads_4[k], expected[k]) for k in grads_4}
        assert max(errors.values()) < unit_taps.TOLERANCE, max(errors.items(),
                                                               key=lambda e: e[1])


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
