"""The XLA custom calls (`keras_blpa.backend.jax.kernels`) against the jnp quantizer.

Both run here on CPU: the codes and every elementwise result are bit-exact
(the handlers run the TensorFlow op's kernels; `tests/test_jax_quantizer.py`
checks them against the op itself), the BN sums agree to float rounding (their
order differs). The same for a capped ReLU (`max_value`): the calls take the
cap edge of `quantizer.cap_params`. Also: the unit uses them where registered,
capped or not, a missing library is one warning and the jnp path, and the env
switch forces jnp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keras_blpa.backend.jax import kernels, quantizer

SHAPES = [(4, 5, 5, 8), (3, 7, 16), (6, 10)]


def _inputs(shape, seed=0, special=True):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = rng.normal(size=shape).astype(np.float32) * 2.0
    if special:
        flat = x.reshape(-1)
        flat[:3] = [np.nan, np.inf, -np.inf]
    gamma = rng.normal(size=channels).astype(np.float32)
    gamma[0] = 0.0  # a dead channel
    beta = rng.normal(size=channels).astype(np.float32)
    finite = np.where(np.isfinite(x), x, 0.0)
    axes = tuple(range(len(shape) - 1))
    mean = finite.mean(axes).astype(np.float32)
    inv_std = (1.0 / np.sqrt(finite.var(axes) + 1e-3)).astype(np.float32)
    return tuple(jnp.asarray(v) for v in (x, mean, inv_std, gamma, beta))


def test_the_library_builds_and_registers_for_cpu():
    assert "cpu" in kernels.load(), kernels.load_error()
    assert kernels.load_error() is None


@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_encode_and_decode_are_bit_exact_with_the_jnp_quantizer(shape, bits, slope):
    x, mean, inv_std, gamma, beta = _inputs(shape)
    params = quantizer.quantizer_params(gamma, beta, bits)

    @jax.jit
    def both(x, mean, inv_std, gamma, beta):
        a, codes = kernels.encode(x, mean, inv_std, gamma, beta, params, bits, None, slope)
        decoded = kernels.decode_relu(codes, params, gamma, beta, shape, bits, None, slope, x)
        xhat, on, a_ref = quantizer.normalize_relu(x, mean, inv_std, gamma, beta, slope)
        codes_ref = quantizer.encode(xhat, on, params, bits)
        centres, mask = quantizer.decode(codes_ref, params, shape, bits)
        decoded_ref = quantizer.relu_from_decoded(centres, mask, gamma, beta, slope)
        return a, codes, decoded, a_ref, codes_ref, decoded_ref

    a, codes, decoded, a_ref, codes_ref, decoded_ref = both(x, mean, inv_std, gamma, beta)
    assert codes.shape == (shape[0], np.prod(shape[1:]) * bits // 8)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), np.asarray(codes_ref))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_ref))  # NaN at the same places
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(decoded_ref))
    assert not np.array_equal(np.asarray(codes), np.zeros_like(codes))  # real codes


@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("bits", [4, 8, None])
def test_bn_backward_matches_the_jnp_quantizer(bits, slope):
    shape = (6, 5, 5, 16)
    x, mean, inv_std, gamma, beta = _inputs(shape, seed=1, special=False)
    g_a = jnp.asarray(np.random.default_rng(2).normal(size=shape).astype(np.float32))
    params = None if bits is None else quantizer.quantizer_params(gamma, beta, bits)

    @jax.jit
    def both(x, g_a):
        if bits is None:
            a, xhat = kernels.exact_forward(x, mean, inv_std, gamma, beta, slope)
            rebuilt = kernels.exact_relu(xhat, gamma, beta, slope, g_a)
            got = kernels.exact_bn_backward(g_a, xhat, gamma, beta, inv_std, slope)
            xhat_ref, on, a_ref = quantizer.normalize_relu(x, mean, inv_std, gamma, beta, slope)
            want = quantizer.relu_bn_backward(
                g_a, xhat_ref, quantizer.exact_mask(xhat_ref, gamma, beta), gamma, inv_std,
                slope)
            rebuilt_ref = quantizer.relu_exact(xhat_ref, gamma, beta, slope)
            return (a, rebuilt, xhat), (a_ref, rebuilt_ref, xhat_ref), got, want
        _, codes = kernels.encode(x, mean, inv_std, gamma, beta, params, bits, None, slope)
        got = kernels.decode_bn_backward(g_a, codes, params, gamma, inv_std, bits, None, slope)
        xhat, on, _ = quantizer.normalize_relu(x, mean, inv_std, gamma, beta, slope)
        words = quantizer.pack_words(quantizer.encode_codes(xhat, on, params, bits), bits)
        want = quantizer.decode_bn_backward(g_a, words, params, gamma, inv_std, bits, slope)
        return (), (), got, want

    exact, exact_ref, got, want = both(x, g_a)
    for value, ref in zip(exact, exact_ref):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref))
    for value, ref in zip(got, want):  # g_x, d_gamma, d_beta
        scale = float(np.max(np.abs(np.asarray(ref)))) or 1.0
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref), rtol=0, atol=2e-5 * scale)


# (gamma, beta) per channel of the capped tests at a cap of 1.5 (scaled with
# the cap, so that the kinks stay where they are in xhat): both kinks inside
# the window, gamma < 0, gamma == 0 (on, at the cap, off), kinks outside the
# window (always saturated, always off, on but never saturated).
CAP_CHANNELS = [(1.0, 0.0), (-1.0, 0.5), (2.0, -1.0), (-0.25, 1.4), (0.0, 1.0), (0.0, None),
                (0.0, -1.0), (0.5, 10.0), (0.5, -10.0), (0.125, 0.5)]
CAP_SHAPES = [(64, 10), (4, 4, 4, 10), (8, 8, 10)]


def _capped_inputs(shape, max_value: float, seed=0, normalized=True):
    """`(x, mean, inv_std, gamma, beta)` whose `y` hits 0 and `max_value`
    exactly and one ulp to either side on every channel with a kink, plus
    the window's edges, NaN, +-Inf and random values. `normalized`: mean 0
    and inv_std 1 (so xhat is x and every y is as planned), else a random
    affine normalization in front of the same y."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    rows = int(np.prod(shape[:-1]))
    scale = max_value / 1.5
    gamma = np.array([g * scale for g, _ in CAP_CHANNELS], np.float32)
    beta = np.array([max_value if b is None else b * scale for _, b in CAP_CHANNELS],
                    np.float32)
    xhat = (rng.normal(size=(rows, channels)) * 2.5).astype(np.float32)
    for c in range(channels):
        special = [np.nan, np.inf, -np.inf, 0.0, -3.5, 3.5, -20.0, 20.0]
        if gamma[c] != 0.0:
            for y in (0.0, max_value):
                t = np.float32((np.float32(y) - beta[c]) / gamma[c])
                special += [t, np.nextafter(t, np.float32(np.inf)),
                            np.nextafter(t, np.float32(-np.inf))]
        xhat[:len(special), c] = special
    xhat = xhat[rng.permutation(rows)]  # the specials land in every sample
    if normalized:
        mean, inv_std, x = np.zeros(channels), np.ones(channels), xhat
    else:
        mean = rng.normal(size=channels).astype(np.float32)
        inv_std = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        x = xhat / inv_std + mean
    return tuple(jnp.asarray(np.asarray(v, np.float32))
                 for v in (x.reshape(shape), mean, inv_std, gamma, beta))


@pytest.mark.parametrize("normalized", [True, False], ids=["xhat", "affine"])
@pytest.mark.parametrize("max_value", [1.5, 6.0])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", CAP_SHAPES, ids=str)
def test_capped_encode_and_decode_are_bit_exact_with_the_jnp_quantizer(shape, bits, max_value,
                                                                       normalized):
    x, mean, inv_std, gamma, beta = _capped_inputs(shape, max_value, normalized=normalized)
    params = quantizer.quantizer_params(gamma, beta, bits, max_value=max_value)
    cap = quantizer.cap_params(gamma, beta, params, bits, max_value)
    assert "cpu" in kernels.load(), kernels.load_error()

    @jax.jit
    def both(x):
        a, codes = kernels.encode(x, mean, inv_std, gamma, beta, params, bits, None, 0.0, cap)
        decoded = kernels.decode_relu(codes, params, gamma, beta, shape, bits, None, 0.0, x, cap)
        xhat, on, saturated, a_ref = quantizer.normalize_relu_capped(x, mean, inv_std, gamma,
                                                                     beta, max_value)
        q = quantizer.encode_codes(xhat, on, params, bits, cap, saturated)
        q_uncapped = quantizer.encode_codes(xhat, on, params, bits)
        centres, mask, saturated_q = quantizer.centres_and_masks_capped(q, params, cap, bits)
        decoded_ref = quantizer.relu_from_decoded_capped(centres, mask, saturated_q, gamma, beta,
                                                         max_value)
        return (a, codes, decoded), (a_ref, quantizer.pack(q, bits), decoded_ref), (
            q, q_uncapped, saturated, saturated_q)

    (a, codes, decoded), (a_ref, codes_ref, decoded_ref), (q, q_uncapped, sat, sat_q) = both(x)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), np.asarray(codes_ref))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_ref))  # NaN at the same places
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(decoded_ref))
    # The inputs exercise the cap: saturated elements decode to the cap, and
    # the cap edge moved codes (a handler that ignored it would differ).
    assert np.any(np.asarray(sat)) and np.any(~np.asarray(sat))
    assert np.any(np.asarray(decoded)[np.asarray(sat_q)] == np.float32(max_value))
    assert np.any(np.asarray(q) != np.asarray(q_uncapped))


@pytest.mark.parametrize("max_value", [1.5, 6.0])
def test_capped_exact_forward_and_relu_are_bit_exact_with_the_jnp_quantizer(max_value):
    shape = (4, 4, 4, 10)
    x, mean, inv_std, gamma, beta = _capped_inputs(shape, max_value, normalized=False)
    assert "cpu" in kernels.load(), kernels.load_error()

    @jax.jit
    def both(x):
        a, xhat = kernels.exact_forward(x, mean, inv_std, gamma, beta, 0.0, max_value)
        rebuilt = kernels.exact_relu(xhat, gamma, beta, 0.0, x, max_value)
        xhat_ref, _, saturated, a_ref = quantizer.normalize_relu_capped(x, mean, inv_std, gamma,
                                                                        beta, max_value)
        rebuilt_ref = quantizer.relu_exact_capped(xhat_ref, gamma, beta, max_value)
        return (a, xhat, rebuilt), (a_ref, xhat_ref, rebuilt_ref), saturated

    got, want, saturated = both(x)
    for value, ref in zip(got, want):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref))
    assert np.all(np.asarray(got[0])[np.asarray(saturated)] == np.float32(max_value))


@pytest.mark.parametrize("max_value", [1.5, 6.0])
@pytest.mark.parametrize("bits", [4, 8, None])
def test_capped_bn_backward_matches_the_jnp_quantizer(bits, max_value):
    shape = (4, 4, 4, 10)
    x, mean, inv_std, gamma, beta = _capped_inputs(shape, max_value, normalized=False)
    finite = np.isfinite(np.asarray(x))
    x = jnp.where(finite, x, 0.0)  # finite sums to compare
    g_a = jnp.asarray(np.random.default_rng(2).normal(size=shape).astype(np.float32))
    params = None if bits is None else quantizer.quantizer_params(gamma, beta, bits,
                                                                  max_value=max_value)
    cap = None if bits is None else quantizer.cap_params(gamma, beta, params, bits, max_value)
    assert "cpu" in kernels.load(), kernels.load_error()

    @jax.jit
    def both(x, g_a):
        xhat, on, saturated, _ = quantizer.normalize_relu_capped(x, mean, inv_std, gamma, beta,
                                                                 max_value)
        if bits is None:
            _, saved = kernels.exact_forward(x, mean, inv_std, gamma, beta, 0.0, max_value)
            got = kernels.exact_bn_backward(g_a, saved, gamma, beta, inv_std, 0.0, max_value)
            mask = quantizer.exact_masks_capped(xhat, gamma, beta, max_value)[0]
        else:
            _, codes = kernels.encode(x, mean, inv_std, gamma, beta, params, bits, None, 0.0,
                                      cap)
            got = kernels.decode_bn_backward(g_a, codes, params, gamma, inv_std, bits, None, 0.0,
                                             cap)
            q = quantizer.encode_codes(xhat, on, params, bits, cap, saturated)
            # The jnp unit's own backward, which reduces over the integer codes.
            words = quantizer.pack_words(q, bits)
            got = got + quantizer.decode_bn_backward(g_a, words, params, gamma, inv_std, bits,
                                                     0.0, cap)
            xhat, mask, _ = quantizer.centres_and_masks_capped(q, params, cap, bits)
        want = quantizer.relu_bn_backward(g_a, xhat, mask, gamma, inv_std)
        # Without the cap's mask: what a handler that ignored the cap returns.
        on_only = quantizer.relu_bn_backward(g_a, xhat, on, gamma, inv_std)
        return got, want, on_only

    got, want, on_only = both(x, g_a)
    assert len(got) == (3 if bits is None else 6)
    for value, ref, wrong in zip(got, want * 2, on_only * 2):  # g_x, d_gamma, d_beta
        scale = float(np.max(np.abs(np.asarray(ref)))) or 1.0
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref), rtol=0, atol=2e-5 * scale)
        assert np.max(np.abs(np.asarray(wrong) - np.asarray(ref))) > 1e-3 * scale


def _step_text(bits, max_value=None):
    from keras_blpa.backend.jax import linear, unit

    shape = (4, 6, 6, 8)
    x, _, _, gamma, beta = _inputs(shape, special=False)
    kernel = jnp.ones((3, 3, 8, 4), jnp.float32) * 0.1
    conv = linear.Conv2DMap((1, 1), "same", (1, 1), False, None)

    def loss(x, kernel):
        outputs, _, _ = unit.bn_relu_linear(x, gamma, beta, [kernel], linear=conv, bits=bits,
                                            naive=False, epsilon=1e-3, max_value=max_value)
        return jnp.sum(outputs[0] ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return step.lower(x, kernel).as_text(), step(x, kernel)


@pytest.mark.parametrize("max_value", [None, 0.5], ids=["relu", "capped"])
@pytest.mark.parametrize("bits", [4, None])
def test_the_unit_runs_custom_calls_unless_disabled(bits, max_value, monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS", "1")
    text, grads = _step_text(bits, max_value)
    # A capped unit's calls carry the cap (and its edge, f32[C] operands).
    capped_attr = "max_value = 5.000000e-01" if max_value else "max_value = 0.000000e+00"
    if bits is None:
        targets = ("blpa_exact_forward", "blpa_exact_relu", "blpa_exact_sums",
                   "blpa_exact_input_grad")
    else:
        targets = ("blpa_encode", "blpa_decode_relu", "blpa_bn_sums", "blpa_bn_input_grad")
    for target in targets:
        calls = [line for line in text.splitlines() if f"@{target}" in line]
        assert calls and all(capped_attr in line for line in calls), (target, calls)
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    jnp_text, jnp_grads = _step_text(bits, max_value)
    assert "@blpa_" not in jnp_text
    for value, ref in zip(grads, jnp_grads):
        scale = float(np.max(np.abs(np.asarray(ref))))
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref), atol=1e-5 * scale)


def test_odd_samples_at_four_bits_stay_on_the_jnp_path(monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS", "1")
    assert kernels.usable((4, 3, 3, 5), 4) is False  # 45 codes a sample: half a byte
    assert kernels.usable((4, 3, 3, 5), 8) is True
    assert kernels.usable((4, 3, 3, 6), 4) is True
    assert kernels.usable((0, 4), 4) is False


def test_a_missing_library_warns_once_and_falls_back_to_jnp(tmp_path):
    script = textwrap.dedent(
        """
        import os, warnings
        os.environ["KERAS_BACKEND"] = "jax"
        os.environ["KERAS_BLPA_JAX_LIBRARY"] = "/nonexistent/libblpa_jax.so"
        os.environ["KERAS_BLPA_JAX_CUSTOM_CALLS"] = "1"
        import numpy as np, keras
        from keras_blpa import BNReLUConv2D
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype("float32")
            # Plain and capped units, coded and exact: one warning in all.
            for options in ({}, {"max_value": 6.0}, {"max_value": 0.5, "bits": None}):
                layer = BNReLUConv2D(4, 3, **{"bits": 4, **options})
                for _ in range(2):
                    y = layer(x, training=True)
                assert np.all(np.isfinite(np.asarray(y)))
        ours = [w for w in caught if "custom calls for JAX unavailable" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "KERAS_BLPA_JAX_LIBRARY" in str(ours[0].message)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BLPA_DISABLE_CUSTOM_OPS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def _raw_encode(x, vectors, cap_vectors, **attrs):
    """The encode handler called directly (no validation on the Python side)."""
    call = jax.ffi.ffi_call(
        "blpa_encode",
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((2, 2), jnp.uint8)),
    )
    attrs = {"bits": np.int32(4), "window": np.float32(6.0),
             "negative_slope": np.float32(0.0), "max_value": np.float32(0.0),
             **{k: (np.int32 if k == "bits" else np.float32)(v) for k, v in attrs.items()}}
    return jax.block_until_ready(call(x, *vectors, *cap_vectors, **attrs))


def test_handlers_reject_bad_attributes():
    assert "cpu" in kernels.load(), kernels.load_error()
    x, mean, inv_std, gamma, beta = _inputs((2, 4), special=False)
    params = quantizer.quantizer_params(gamma, beta, 4, max_value=1.5)
    caps = quantizer.cap_params(gamma, beta, params, 4, 1.5)
    vectors = (mean, inv_std, gamma, beta, params.lo, params.k, params.flip, params.aligned)
    no_cap, cap = (jnp.zeros((0,), jnp.float32),) * 3, (caps.kc, caps.flip, caps.aligned)
    _raw_encode(x, vectors, no_cap)  # well-formed calls run, capped or not
    _raw_encode(x, vectors, cap, max_value=1.5)
    with pytest.raises(Exception, match="bits must be 4 or 8"):
        _raw_encode(x, vectors, no_cap, bits=3)
    with pytest.raises(Exception, match="per-channel operands"):
        _raw_encode(x, (*vectors[:-1], vectors[-1][:2]), no_cap)
    # The cap edge and max_value come together, and a cap takes no slope.
    with pytest.raises(Exception, match="cap operands must have 4 elements"):
        _raw_encode(x, vectors, no_cap, max_value=1.5)
    with pytest.raises(Exception, match="cap operands must have 0 elements"):
        _raw_encode(x, vectors, cap)
    with pytest.raises(Exception, match="cap operands must have 4 elements"):
        _raw_encode(x, vectors, (*cap[:2], cap[2][:3]), max_value=1.5)
    with pytest.raises(Exception, match="max_value must be a finite number"):
        _raw_encode(x, vectors, cap, max_value=-1.0)
    with pytest.raises(Exception, match="max_value must be a finite number"):
        _raw_encode(x, vectors, cap, max_value=np.inf)
    with pytest.raises(Exception, match="takes no negative_slope"):
        _raw_encode(x, vectors, cap, max_value=1.5, negative_slope=0.1)


def test_the_switch_picks_where_custom_calls_run(monkeypatch):
    monkeypatch.delenv("KERAS_BLPA_JAX_CUSTOM_CALLS", raising=False)
    assert kernels.enabled("cpu") and not kernels.enabled("gpu") and not kernels.enabled("tpu")
    assert kernels.usable((4, 3, 3, 6), 4) is True  # CPU: on by default
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS", "1")
    assert kernels.enabled("gpu")
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS", "0")
    assert not kernels.enabled("cpu") and kernels.usable((4, 3, 3, 6), 4) is False
    monkeypatch.setenv("KERAS_BLPA_JAX_CUSTOM_CALLS", "sometimes")
    with pytest.raises(ValueError, match="KERAS_BLPA_JAX_CUSTOM_CALLS='sometimes'.*use 1"):
        kernels.enabled("cpu")
