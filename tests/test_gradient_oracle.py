"""BLPA's gradients against an exact oracle (`tests/gradient_oracle.py`) on
TensorFlow: the codes each layer saved, decoded independently in float64,
give the gradient BLPA is meant to compute; the layer's must equal it to
float32 rounding, on the compiled op, pure TF and XLA. The last tests show
that the comparison fails on a decoder one bin off and on one wrong mask bit.
"""

import gradient_oracle as oracle
import numpy as np
import pytest
import tensorflow as tf

from keras_blpa import ApproxBatchNormalization, BNReLUDense
from keras_blpa.backend.tensorflow import quantizer, unit

# float32 against float64: measured at most 5e-7 over these cases (every path),
# while a decoder one bin off, or one wrong mask bit of 2,048, gives 1e-2 or
# more (`test_the_oracle_fails_on_a_broken_decoder`).
TOLERANCE = 1e-5


@pytest.fixture
def saved_codes(monkeypatch):
    """The `(codes, params, cap, words)` of every unit encoded while it is active."""
    captured = []
    encode = unit._Codes.encode

    def recording(self, x32, mean, inv_std, gamma, beta):
        a, saved = encode(self, x32, mean, inv_std, gamma, beta)
        captured.append((saved, self.params, self.cap, self.words, (gamma, beta)))
        return a, saved

    monkeypatch.setattr(unit._Codes, "encode", recording)
    return captured


def _layer_gradients(layer, x, upstream, saved_codes, mode: str):
    """The layer's gradients (input first, then its trainable weights) and the
    codes it saved, eagerly, in a tf.function, or XLA-compiled."""

    def step(x, *upstream):
        del saved_codes[:]
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, training=True)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            loss = sum(tf.reduce_sum(o * g) for o, g in zip(outputs, upstream))
        grads = tape.gradient(loss, [x, *layer.trainable_weights])
        saved, params, cap, _, encoder_grid = saved_codes[0]
        grid_tensors = [params.lo, params.k, params.flip, *encoder_grid]
        if cap is not None:
            grid_tensors += [cap.kc, cap.flip]
        return grads, saved, grid_tensors

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    grads, codes, grid_tensors = step(tf.constant(x), *[tf.constant(g) for g in upstream])
    _, params, cap, words, _ = saved_codes[0]
    values = [np.asarray(t) for t in grid_tensors]
    params = params._replace(lo=values[0], k=values[1], flip=values[2])
    if cap is not None:
        cap = cap._replace(kc=values[5], flip=values[6])
    grads = [g.numpy() for g in grads]
    return grads, codes.numpy(), params, cap, words, values[3:5]


def _check(layer, x, upstream, saved_codes, mode):
    grads, codes, params, cap, words, _ = _layer_gradients(layer, x, upstream, saved_codes,
                                                           mode)
    q = oracle.unpack(codes, x.shape, layer.bits, words)
    oracle.check_codes(q, params, layer.bits, x, layer.gamma, layer.beta, layer.epsilon, cap)
    expected = oracle.bn_unit_gradients(layer, x, upstream, q, params, layer.bits, cap)
    errors = oracle.relative_errors(grads, expected)
    names = ["input"] + [w.name for w in layer.trainable_weights]
    assert max(errors) < TOLERANCE, dict(zip(names, errors))
    return errors


LAYERS = oracle.BN_UNITS


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_bn_units_compute_blpas_gradient(kind, bits, mode, implementation, saved_codes):
    layer = LAYERS[kind](bits)
    x, upstream = oracle.random_bn_unit(layer, (4, 8, 8, 8))
    _check(layer, x, upstream, saved_codes, mode)


def test_dense_unit_on_a_matrix(implementation, saved_codes):
    layer = BNReLUDense(5, bits=4)
    x, upstream = oracle.random_bn_unit(layer, (64, 12))
    _check(layer, x, upstream, saved_codes, "eager")


def _broken_decoder(monkeypatch, how: str):
    original = quantizer._centres_and_mask

    def broken(codes, params, bits):
        xhat, mask = original(codes, params, bits)
        if how == "one_bin_off":
            return xhat + quantizer.bin_width(bits, params.window), mask
        flat = tf.reshape(mask, [-1])
        flat = tf.tensor_scatter_nd_update(flat, [[5]], tf.logical_not(flat[5:6]))
        return xhat, tf.reshape(flat, tf.shape(mask))

    monkeypatch.setattr(quantizer, "_centres_and_mask", broken)


@pytest.mark.parametrize("how", ["one_bin_off", "one_mask_bit"])
def test_the_oracle_fails_on_a_broken_decoder(how, monkeypatch, saved_codes):
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")  # the pure-TF decoder
    layer = LAYERS["conv"](4)
    x, upstream = oracle.random_bn_unit(layer, (4, 8, 8, 8))
    errors = _check(layer, x, upstream, saved_codes, "eager")  # intact: passes
    _broken_decoder(monkeypatch, how)
    with pytest.raises(AssertionError, match="input"):
        _check(layer, x, upstream, saved_codes, "eager")
    assert max(errors) < TOLERANCE


def test_the_code_check_fails_on_an_encoder_one_bin_off(monkeypatch, saved_codes):
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    original = quantizer.encode_codes

    def shifted(*args, **kwargs):
        codes = original(*args, **kwargs)
        return tf.clip_by_value(codes + 1.0, 0.0, 15.0)

    monkeypatch.setattr(quantizer, "encode_codes", shifted)
    layer = LAYERS["conv"](4)
    x, upstream = oracle.random_bn_unit(layer, (4, 8, 8, 8))
    with pytest.raises(AssertionError, match="mask bits wrong|bins from xhat"):
        _check(layer, x, upstream, saved_codes, "eager")


RELU_LAYERS = oracle.RELU_UNITS


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", sorted(RELU_LAYERS))
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_relu_units_compute_blpas_gradient(kind, bits, mode, implementation, saved_codes):
    layer = RELU_LAYERS[kind](bits)
    rng = np.random.default_rng(1)
    shape = (64, 8) if kind == "relu_dense" else (4, 8, 8, 8)
    z = (rng.normal(size=shape) + rng.normal(size=8)).astype("float32")
    outputs = layer(tf.constant(z), training=False)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    upstream = [rng.normal(size=o.shape).astype("float32") for o in outputs]
    grads, codes, params, _, words, (gamma, beta) = _layer_gradients(
        layer, z, upstream, saved_codes, mode)
    q = oracle.unpack(codes, z.shape, bits, words)
    oracle.check_relu_codes(q, params, bits, z, gamma, beta)
    expected = oracle.relu_unit_gradients(layer, z, upstream, q, params, bits, gamma, beta)
    errors = oracle.relative_errors(grads, expected)
    assert max(errors) < TOLERANCE, errors


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_approx_batch_normalization_computes_its_meant_gradient(bits, mode, implementation,
                                                                  saved_codes):
    layer = ApproxBatchNormalization(bits=bits)
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(4, 8, 8, 8)) * rng.uniform(0.5, 3, 8) + 1.0).astype("float32")
    layer.build(x.shape)
    layer.gamma.assign(rng.uniform(-1.5, 1.5, 8).astype("float32"))
    upstream = [rng.normal(size=x.shape).astype("float32")]
    grads, codes, params, _, words, _ = _layer_gradients(layer, x, upstream, saved_codes, mode)
    q = oracle.unpack(codes, x.shape, bits, words)
    # The centred grid: every value inside it within half a bin.
    ones, window = np.ones(8), params.window
    oracle.check_codes(q, params, bits, x, ones, np.full(8, window), layer.epsilon)
    expected = oracle.approx_bn_gradients(layer, x, upstream, q, params, bits)
    errors = oracle.relative_errors(grads, expected)
    assert max(errors) < TOLERANCE, errors
