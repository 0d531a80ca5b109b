"""The JAX backend's jnp quantizer against the TensorFlow quantizer and the
compiled op: the same codes, bit for bit, for the same inputs.

Runs in the TensorFlow suite, where both libraries are importable (the JAX
functions are called directly; Keras's backend does not matter to them).
Each jnp function runs eagerly and under `jax.jit` (as a unit runs it).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from kernel_requirement import REQUIRE_KERNELS
from test_custom_op import SHAPES, _make_case

from keras_blpa.backend.tensorflow import kernels, quantizer

jax = pytest.importorskip("jax")
jnp = jax.numpy
jq = pytest.importorskip("keras_blpa.backend.jax.quantizer")

MODES = ["eager", "jit"]


def _run(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


def _np(t) -> np.ndarray:
    return np.asarray(t)


def _same_float(a, b) -> None:
    """Bit for bit (so -0.0 vs 0.0 or one ulp fails); NaNs only need to be
    NaN in both (`rounded` may flip a NaN's lowest payload bit)."""
    a, b = _np(a), _np(b)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    finite = ~np.isnan(a)
    np.testing.assert_array_equal(a[finite].view(np.uint32), b[finite].view(np.uint32))


def _jax_params(params):
    return quantizer.QuantParams(*(jnp.asarray(_np(p)) for p in params[:4]), params.window)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [4, 8])
def test_grid_parameters_bit_exact(bits, mode):
    _, _, _, gamma, beta, params = _make_case((64,), bits, 11)
    got = _run(lambda g, b: jq.quantizer_params(g, b, bits)[:4], mode)(
        jnp.asarray(_np(gamma)), jnp.asarray(_np(beta)))
    for mine, theirs in zip(got, params[:4]):
        _same_float(mine, theirs)
    assert jq.quantizer_params(_np(gamma), _np(beta), bits).window == params.window


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nan_inf"])
def test_codes_and_activation_bit_exact(shape, bits, specials, slope, mode):
    x, mean, inv_std, gamma, beta, params = _make_case(shape, bits, hash(shape) % 1000, specials)
    a_tf, packed_tf = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits, slope)
    jparams = _jax_params(params)
    inputs = [jnp.asarray(_np(t)) for t in (x, mean, inv_std, gamma, beta)]

    def encode(x, mean, inv_std, gamma, beta):
        xhat, on, a = jq.normalize_relu(x, mean, inv_std, gamma, beta, slope)
        codes = jq.encode_codes(xhat, on, jparams, bits)
        return a, jq.pack(codes, bits), codes

    a, packed, codes = _run(encode, mode)(*inputs)
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(_np(packed), _np(packed_tf))
    _same_float(a, a_tf)
    if kernels.load() is not None:
        _, packed_op = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits, slope)
        np.testing.assert_array_equal(_np(packed), _np(packed_op))
    elif REQUIRE_KERNELS:
        pytest.fail(f"the TF op did not load: {kernels.load_error()}")

    xhat, mask = _run(lambda p: jq.decode(p, jparams, shape, bits), mode)(packed)
    xhat_tf, mask_tf = quantizer.decode(packed_tf, params, shape, bits)
    _same_float(xhat, xhat_tf)
    np.testing.assert_array_equal(_np(mask), _np(mask_tf))
    relu = jq.relu_from_decoded(xhat, mask, inputs[3], inputs[4], slope)
    _same_float(relu, quantizer.relu_from_decoded(xhat_tf, mask_tf, gamma, beta, slope))

    # The word layout a unit keeps under jit: TF's layout, the same codes.
    words = _run(lambda c: jq.pack_words(c, bits), mode)(codes)
    words_tf = quantizer.pack_words(tf.constant(_np(codes)), bits)
    assert words.dtype == jnp.uint32 and words.shape == tuple(words_tf.shape)
    assert words.shape == jq.words_shape(shape, bits)
    np.testing.assert_array_equal(_np(words), _np(words_tf))
    unpacked = _run(lambda w: jq.unpack_words(w, shape, bits), mode)(words)
    np.testing.assert_array_equal(_np(unpacked), _np(codes).astype(np.uint32))


@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(9, 37), (4, 8, 8, 64), (3, 33, 33, 37)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bn_backward_from_words_agrees_with_tensorflow(shape, bits, slope):
    """The reduction over integer codes (`decode_bn_backward`) equals TF's
    reduction over decoded values up to float rounding."""
    x, mean, inv_std, gamma, beta, params = _make_case(shape, bits, 3)
    _, packed = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    g_a = tf.constant(np.random.default_rng(4).normal(size=shape).astype(np.float32))
    expected = quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits, slope)
    codes = jq.unpack(jnp.asarray(_np(packed)), shape, bits)
    words = jq.pack_words(codes, bits)
    got = jax.jit(lambda g, w, gm, s: jq.decode_bn_backward(
        g, w, _jax_params(params), gm, s, bits, slope))(
        jnp.asarray(_np(g_a)), words, jnp.asarray(_np(gamma)), jnp.asarray(_np(inv_std)))
    for mine, theirs in zip(got, expected):
        scale = np.abs(_np(theirs)).max()
        np.testing.assert_allclose(_np(mine), _np(theirs), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nan_inf"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) > 1 and s[0] > 1],
                         ids=lambda s: "x".join(map(str, s)))
def test_custom_calls_give_the_compiled_ops_bytes(shape, bits, specials, slope):
    """The JAX custom calls (`backend.jax.kernels`) against the TensorFlow op: the
    same encode bytes and ReLU output, the same rebuilt activation."""
    jax_kernels = pytest.importorskip("keras_blpa.backend.jax.kernels")
    if "cpu" not in jax_kernels.load():
        pytest.fail(f"the custom calls did not load: {jax_kernels.load_error()}")
    per_sample = int(np.prod(shape[1:]))
    if bits == 4 and per_sample % 2:
        pytest.skip("odd codes per sample at 4 bits run on the jnp path")
    if kernels.load() is None:
        pytest.fail(f"the TensorFlow op did not load: {kernels.load_error()}")
    x, mean, inv_std, gamma, beta, params = _make_case(shape, bits, 5, specials)
    a_op, packed_op = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits, slope)
    relu_op = kernels.decode_relu(packed_op, params, gamma, beta, shape, bits, slope)
    jparams = _jax_params(params)
    inputs = [jnp.asarray(_np(t)) for t in (x, mean, inv_std, gamma, beta)]

    @jax.jit
    def run(x, mean, inv_std, gamma, beta):
        window = params.window
        a, codes = jax_kernels.encode(x, mean, inv_std, gamma, beta, jparams, bits, window,
                                      slope)
        relu = jax_kernels.decode_relu(codes, jparams, gamma, beta, shape, bits, window, slope,
                                       x)
        return a, codes, relu

    a, codes, relu = run(*inputs)
    np.testing.assert_array_equal(_np(codes).reshape(-1), _np(packed_op))
    _same_float(a, a_op)
    _same_float(relu, relu_op)
