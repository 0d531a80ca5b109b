"""The compiled op with a capped ReLU (`max_value`, ReLU6) against the pure-TF
quantizer: encode, decode and the fused decode + ReLU bit for bit (NaN and
Inf included), the fused BN backward to float rounding, the op's own checks
of its cap inputs, and a capped layer that runs the op."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from keras_blpa.backend.tensorflow import kernels, quantizer
from keras_blpa.layers import BNReLUConv2D
from tests.test_capped_quantizer import _channels, _values

# (rows, C): one CPU block and a parameter period of several channels; many
# blocks with C above the period; C = 1.
SHAPES = [(96, 2048), (700, 37), (3000, 1), (64, 300)]


def _case(shape, bits, cap, seed, specials=True):
    """x, mean, inv_std, gamma, beta, params, caps: channels of every kind
    (`_channels`), values on and beside both kinks, NaN and Inf in x and in
    the statistics."""
    rng = np.random.default_rng(seed)
    rows, c = shape
    gamma, beta = _channels(rng, max(c, 4), bits, 6.0, cap)
    xhat = _values(rng, gamma, beta, cap, max(rows, 8), 6.0)
    xhat, gamma, beta = xhat[:rows, :c], gamma[:c], beta[:c]
    if c == 1:  # one channel: both kinks inside the window, not a degenerate one
        gamma, beta = np.float32([(cap + 0.5) / 1.5]), np.float32([-0.5])  # kink at 1.5
    mean = (0.3 * rng.normal(size=c)).astype(np.float32)
    inv_std = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    x = (xhat / inv_std + mean).astype(np.float32)
    if specials and c > 3:
        mean[1], inv_std[2] = np.nan, np.inf
        gamma[3] = np.nan
    gamma, beta = tf.constant(gamma), tf.constant(beta)
    params = quantizer.quantizer_params(gamma, beta, bits, max_value=cap)
    caps = quantizer.cap_params(gamma, beta, params, bits, cap)
    return tf.constant(x), tf.constant(mean), tf.constant(inv_std), gamma, beta, params, caps


def _same(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype == np.float32:  # bit for bit: -0.0 and NaN payloads count
        actual, expected = actual.view(np.uint32), expected.view(np.uint32)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("cap", [6.0, 0.37])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_capped_encode_and_decodes_are_bit_exact(op_lib, shape, bits, cap):
    x, mean, inv_std, gamma, beta, params, caps = _case(shape, bits, cap, seed=bits)
    a, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits, cap=caps)
    a_ref, packed_ref = quantizer.bn_relu_encode_capped(
        x, mean, inv_std, gamma, beta, params, caps, bits
    )
    _same(packed, packed_ref)
    _same(a, a_ref)
    # The forward output is keras's ReLU(max_value=cap) of the BN output.
    y = ((x - mean) * inv_std) * gamma + beta
    _same(a, tf.where(y <= 0.0, 0.0, tf.where(y >= caps.max_value, caps.max_value, y)))
    xhat, mask = kernels.decode(packed, params, x.shape, bits, cap=caps)
    xhat_ref, mask_ref, saturated = quantizer.decode_capped(packed, params, caps, x.shape, bits)
    _same(xhat, xhat_ref)
    _same(mask, mask_ref)
    assert np.any(saturated) and np.any(mask) and np.any(~(mask | saturated))
    relu = kernels.decode_relu(packed, params, gamma, beta, x.shape, bits, cap=caps)
    _same(relu, quantizer.relu_from_decoded_capped(
        xhat_ref, mask_ref, saturated, gamma, beta, caps.max_value))


@pytest.mark.parametrize("bits", [4, 8])
def test_every_code_decodes_as_pure_tf(op_lib, bits):
    # Codes the encoder would never give a channel (the op must not assume).
    x, mean, inv_std, gamma, beta, params, caps = _case((64, 300), bits, 6.0, seed=5)
    n = 64 * 300
    rng = np.random.default_rng(7)
    packed = tf.constant(rng.integers(0, 256, n if bits == 8 else n // 2, dtype=np.uint8))
    relu = kernels.decode_relu(packed, params, gamma, beta, x.shape, bits, cap=caps)
    ref = quantizer.relu_from_decoded_capped(
        *quantizer.decode_capped(packed, params, caps, x.shape, bits), gamma, beta,
        caps.max_value,
    )
    _same(relu, ref)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(96, 2048), (700, 37), (64, 300)], ids=str)
def test_capped_bn_backward_matches_pure_tf(op_lib, shape, bits):
    x, mean, inv_std, gamma, beta, params, caps = _case(shape, bits, 6.0, seed=3,
                                                        specials=False)
    _, packed = quantizer.bn_relu_encode_capped(x, mean, inv_std, gamma, beta, params, caps,
                                                bits)
    g_a = tf.constant(np.random.default_rng(1).normal(size=shape).astype(np.float32) + 0.3)
    out = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits, cap=caps)
    xhat, mask, saturated = quantizer.decode_capped(packed, params, caps, shape, bits)
    ref = quantizer.relu_bn_backward(g_a, xhat, mask, gamma, inv_std)
    for actual, expected in zip(out, ref):
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)
    # The saturated elements pass no gradient: the plain ReLU's backward differs.
    plain = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits)
    assert np.any(saturated) and not np.allclose(plain[2], out[2])


def test_the_op_checks_its_cap_inputs(op_lib):
    x, mean, inv_std, gamma, beta, params, caps = _case((8, 16), 4, 6.0, seed=1)
    common = [x, mean, inv_std, gamma, beta, params.lo, params.k, params.flip,
              params.aligned]
    empty = tf.zeros([0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_value must be > 0"):
        op_lib.blpa_bn_relu_encode(*common, caps.kc, caps.flip, caps.aligned, bits=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs the cap inputs"):
        op_lib.blpa_bn_relu_encode(*common, empty, empty, empty, bits=4, max_value=6.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="no negative_slope"):
        op_lib.blpa_bn_relu_encode(*common, caps.kc, caps.flip, caps.aligned, bits=4,
                                   max_value=6.0, negative_slope=0.1)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"cap input 10 must have shape"):
        op_lib.blpa_bn_relu_encode(*common, caps.kc, empty, caps.aligned, bits=4,
                                   max_value=6.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_value must be a finite"):
        op_lib.blpa_bn_relu_encode(*common, caps.kc, caps.flip, caps.aligned, bits=4,
                                   max_value=float("nan"))
    with pytest.raises(ValueError, match="negative_slope"):
        kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4,
                               negative_slope=0.1, cap=caps)
    with pytest.raises(ValueError, match=r"`cap.kc` must have shape \[16\]"):
        kernels.decode(tf.zeros([64], tf.uint8), params, [8, 16], 4,
                       cap=caps._replace(kc=caps.kc[:3]))


def test_a_capped_layer_runs_the_op_and_matches_pure_tf(op_lib, monkeypatch):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 9, 9, 8)).astype(np.float32) * 2)
    layer = BNReLUConv2D(16, 3, padding="same", bits=4, max_value=6.0)
    layer.build(x.shape)
    layer.gamma.assign(rng.uniform(1, 4, 8).astype(np.float32))  # many saturate
    layer.beta.assign(rng.uniform(0, 4, 8).astype(np.float32))

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * tf.cos(out))
        return out, tape.gradient(loss, [x, *layer.trainable_weights])

    graph_ops = tf.function(lambda: layer(x, training=True)).get_concrete_function()
    names = {op.type for op in graph_ops.graph.get_operations()}
    assert "BlpaBnReluEncode" in names  # the cap no longer bypasses the op
    out, grads = run()
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    out_tf, grads_tf = run()
    _same(out, out_tf)
    for g, g_tf in zip(grads, grads_tf):
        np.testing.assert_allclose(g, g_tf, rtol=0, atol=2e-5 * float(np.abs(g_tf).max()))
