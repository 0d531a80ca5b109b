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

import keras_blpa
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


def _on_host(params):
    """A grid's per-channel arrays as NumPy (the oracle decodes in NumPy)."""
    return params._replace(lo=np.asarray(params.lo), k=np.asarray(params.k),
                           flip=np.asarray(params.flip))


def _check(layer, x, upstream, saved_codes, expect_words: bool):
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]

    def loss(x, trainable):
        outputs, _ = layer.stateless_call(trainable, fixed, x, training=True)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        return sum(jnp.sum(o * g) for o, g in zip(outputs, upstream))

    del saved_codes[:]
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.asarray(x), trainable)
    # The step that ran is the step checked: custom calls on that path only.
    text = lowered.as_text()
    cap = f"max_value = {layer.max_value or 0.0:e}"  # a capped unit's calls carry its cap
    for target in ("blpa_encode", "blpa_decode_relu", "blpa_bn_sums", "blpa_bn_input_grad"):
        calls = [line for line in text.splitlines() if f"@{target}" in line]
        assert bool(calls) == (not expect_words), target
        assert all(cap in line for line in calls), calls
    grads = lowered.compile()(jnp.asarray(x), trainable)
    jax.effects_barrier()
    (codes, words), = saved_codes
    assert words == expect_words
    grads = [np.asarray(grads[0]), *(np.asarray(g) for g in grads[1])]
    bits, cap_value = layer.bits, layer.max_value
    gamma, beta = np.asarray(layer.gamma), np.asarray(layer.beta)
    params = quantizer.quantizer_params(gamma, beta, bits, layer.window, max_value=cap_value)
    cap = None if cap_value is None else quantizer.cap_params(gamma, beta, params, bits,
                                                               cap_value)
    params = _on_host(params)
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
    _check(layer, x, upstream, saved_codes, expect_words=path == "jnp")


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


RELU_LAYERS = oracle.RELU_UNITS


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", sorted(RELU_LAYERS))
def test_relu_units_compute_blpas_gradient(kind, bits, path, saved_codes):
    from keras_blpa.backend.jax import relu_unit

    layer = RELU_LAYERS[kind](bits)
    rng = np.random.default_rng(1)
    shape = (64, 8) if kind == "relu_dense" else (4, 8, 8, 8)
    z = (rng.normal(size=shape) + rng.normal(size=8)).astype("float32")
    outputs = layer(z, training=False)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    upstream = [rng.normal(size=o.shape).astype("float32") for o in outputs]
    trainable = [v.value for v in layer.trainable_variables]

    def loss(z, trainable):
        outs, _ = layer.stateless_call(trainable, [], z, training=True)
        outs = outs if isinstance(outs, list) else [outs]
        return sum(jnp.sum(o * g) for o, g in zip(outs, upstream))

    del saved_codes[:]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(z), trainable)
    jax.effects_barrier()
    (codes, words), = saved_codes
    assert words == (path == "jnp")
    grads = [np.asarray(grads[0]), *(np.asarray(g) for g in grads[1])]
    # The grid from the batch's moments (the library's), the rest independent.
    _, _, gamma, beta = (np.asarray(v) for v in relu_unit.relu_grid(jnp.asarray(z), bits,
                                                                      layer.window))
    params = quantizer.quantizer_params(gamma, beta, bits, layer.window)
    params = _on_host(params)
    q = oracle.unpack(codes, z.shape, bits, words)
    oracle.check_relu_codes(q, params, bits, z, gamma, beta)
    expected = oracle.relu_unit_gradients(layer, z, upstream, q, params, bits, gamma, beta)
    errors = oracle.relative_errors(grads, expected)
    assert max(errors) < TOLERANCE, errors


@pytest.mark.parametrize("bits", [4, 8])
def test_approx_batch_normalization_computes_its_meant_gradient(bits, path, saved_codes):
    layer = keras_blpa.ApproxBatchNormalization(bits=bits)
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(4, 8, 8, 8)) * rng.uniform(0.5, 3, 8) + 1.0).astype("float32")
    layer.build(x.shape)
    layer.gamma.assign(rng.uniform(-1.5, 1.5, 8).astype("float32"))
    upstream = rng.normal(size=x.shape).astype("float32")
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]

    def loss(x, trainable):
        out, _ = layer.stateless_call(trainable, fixed, x, training=True)
        return jnp.sum(out * upstream)

    del saved_codes[:]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), trainable)
    jax.effects_barrier()
    (codes, words), = saved_codes
    assert words == (path == "jnp")
    grads = [np.asarray(grads[0]), *(np.asarray(g) for g in grads[1])]
    window = keras_blpa.grid.resolve_window(bits, None)
    ones, offset = np.ones(8, np.float32), np.full(8, window, np.float32)
    params = quantizer.quantizer_params(ones, offset, bits, None)
    params = _on_host(params)
    q = oracle.unpack(codes, x.shape, bits, words)
    oracle.check_codes(q, params, bits, x, ones, offset, layer.epsilon)
    expected = oracle.approx_bn_gradients(layer, x, [upstream], q, params, bits)
    errors = oracle.relative_errors(grads, expected)
    assert max(errors) < TOLERANCE, errors


def test_padded_max_pooling_equals_stock_and_keeps_no_padded_copy():
    pool = keras_blpa.PaddedMaxPooling2D(padding=1, pool_size=3, strides=2)
    stock = keras.Sequential([keras.layers.ZeroPadding2D(1),
                              keras.layers.MaxPooling2D(3, strides=2)])
    x = np.random.default_rng(4).normal(size=(2, 9, 9, 4)).astype("float32")
    g = np.random.default_rng(5).normal(size=(2, 5, 5, 4)).astype("float32")

    def grad_of(layer):
        return jax.jit(jax.grad(lambda x: jnp.sum(layer(x) * g)))(jnp.asarray(x))

    np.testing.assert_array_equal(pool(x), stock(x))
    np.testing.assert_array_equal(grad_of(pool), grad_of(stock))
    # What the backward keeps from the forward: the input alone.
    _, residuals = jax.vjp(lambda x: pool(x), jnp.asarray(x))
    kept = [leaf.shape for leaf in jax.tree_util.tree_leaves(residuals)
            if hasattr(leaf, "shape") and leaf.ndim == 4]
    assert (2, 11, 11, 4) not in kept and (2, 9, 9, 4) in kept, kept
