"""BLPA's gradients on JAX against the exact oracle (`tests/gradient_oracle.py`):
the codes each unit saved (sent out of the traced step with
`jax.debug.callback`), decoded independently in float64, on the XLA custom
calls and on the jnp quantizer, under `jax.jit` as `model.fit` runs them."""

from __future__ import annotations

import gradient_oracle as oracle
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_blpa.backend.jax import kernels, quantizer

TOLERANCE = 1e-5  # as on TensorFlow (tests/test_gradient_oracle.py)


@pytest.fixture(params=["custom_calls", "jnp"])
def path(request, monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS",
                       "1" if request.param == "custom_calls" else "0")
    if request.param == "custom_calls" and "cpu" not in kernels.load():
        pytest.fail(f"the custom calls did not load: {kernels.load_error()}")
    return request.param


@pytest.fixture
def saved_codes(monkeypatch):
    """Every unit's saved codes: `(codes, words)`, host copies."""
    captured = []

    def record(words):
        def send(saved):
            jax.debug.callback(lambda s: captured.append((np.asarray(s), words)), saved)
        return send

    encode, pack_words = kernels.encode, quantizer.pack_words

    def encode_recording(*args, **kwargs):
        a, saved = encode(*args, **kwargs)
        record(False)(saved)
        return a, saved

    def pack_recording(*args, **kwargs):
        saved = pack_words(*args, **kwargs)
        record(True)(saved)
        return saved

    monkeypatch.setattr(kernels, "encode", encode_recording)
    monkeypatch.setattr(quantizer, "pack_words", pack_recording)
    return captured


def _check(layer, x, upstream, saved_codes, expect_words: bool):
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]

    def loss(x, trainable):
        outputs, _ = layer.stateless_call(trainable, fixed, x, training=True)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        return sum(jnp.sum(o * g) for o, g in zip(outputs, upstream))

    del saved_codes[:]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), trainable)
    jax.effects_barrier()
    (codes, words), = saved_codes
    assert words == expect_words
    grads = [np.asarray(grads[0]), *(np.asarray(g) for g in grads[1])]
    bits, cap_value = layer.bits, layer.max_value
    gamma, beta = np.asarray(layer.gamma), np.asarray(layer.beta)
    params = quantizer.quantizer_params(gamma, beta, bits, layer.window, max_value=cap_value)
    cap = None if cap_value is None else quantizer.cap_params(gamma, beta, params, bits,
                                                               cap_value)
    params = params._replace(lo=np.asarray(params.lo), k=np.asarray(params.k),
                             flip=np.asarray(params.flip))
    if cap is not None:
        cap = cap._replace(kc=np.asarray(cap.kc), flip=np.asarray(cap.flip))
    q = oracle.unpack(codes, x.shape, bits, words)
    oracle.check_codes(q, params, bits, x, gamma, beta, layer.epsilon, cap)
    expected = oracle.bn_unit_gradients(layer, x, upstream, q, params, bits, cap)
    errors = oracle.relative_errors(grads, expected)
    names = ["input"] + [v.name for v in layer.trainable_variables]
    assert max(errors) < TOLERANCE, dict(zip(names, errors))


LAYERS = oracle.BN_UNITS


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_bn_units_compute_blpas_gradient(kind, bits, path, saved_codes):
    layer = LAYERS[kind](bits)
    x, upstream = oracle.random_bn_unit(layer, (4, 8, 8, 8))
    # Capped units run the jnp quantizer on both paths (the custom calls have no cap).
    words = path == "jnp" or kind == "conv_capped"
    _check(layer, x, upstream, saved_codes, expect_words=words)


def test_the_oracle_fails_on_a_decoder_one_bin_off(monkeypatch, saved_codes):
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS", "0")
    original = quantizer.centres_and_mask

    def one_bin_off(codes, params, bits):
        xhat, mask = original(codes, params, bits)
        return xhat + quantizer.bin_width(bits, params.window), mask

    layer = LAYERS["conv"](4)
    x, upstream = oracle.random_bn_unit(layer, (4, 8, 8, 8))
    _check(layer, x, upstream, saved_codes, expect_words=True)
    monkeypatch.setattr(quantizer, "centres_and_mask", one_bin_off)
    keras.backend.clear_session()
    with pytest.raises(AssertionError, match="input"):
        _check(layer, x, upstream, saved_codes, expect_words=True)
