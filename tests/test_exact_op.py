"""The compiled exact-path ops (bits=None) against their pure-TF twins.

Forward and rebuild are elementwise and so bit for bit; the fused backward's
sums are in double, so it agrees to float rounding (and with a float64
reference more closely). The ops write into an input's buffer when nothing
else holds it: the tests check that a buffer someone still reads is never
overwritten.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_custom_op import (
    BAD_SLOPES,
    BN_SHAPES,
    BN_SLOPES,
    SHAPES,
    SLOPES,
    _assert_close,
    _assert_same_float,
    _leaky_grad_f64,
    _make_case,
    _reference_relu,
    _slope_id,
    _sum_scales,
)

from keras_blpa.backend.tensorflow import kernels, quantizer


@pytest.fixture(scope="module", autouse=True)
def op_lib():
    if kernels.disabled() or not kernels.is_available():
        pytest.skip(f"custom op library unavailable: {kernels.load_error()}")


def _case(shape, seed, specials=False):
    x, mean, inv_std, gamma, beta, _ = _make_case(shape, 4, seed, specials=specials)
    return x, mean, inv_std, gamma, beta


@pytest.mark.parametrize("slope", SLOPES, ids=_slope_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nan_inf"])
def test_forward_and_rebuild_bit_exact(shape, specials, slope):
    x, mean, inv_std, gamma, beta = _case(shape, 3, specials)
    a, xhat = kernels.bn_relu_exact(x, mean, inv_std, gamma, beta, slope)
    a_ref, xhat_ref = quantizer.bn_relu_exact(x, mean, inv_std, gamma, beta, slope)
    _assert_same_float(a, a_ref)
    _assert_same_float(xhat, xhat_ref)
    # NaN passes through the forward's ReLU, as tf.nn.relu's does; and the
    # activation is TF's own (tf.nn.relu, or tf.nn.leaky_relu), bit for bit.
    y = (x - mean) * inv_std * gamma + beta
    np.testing.assert_array_equal(np.isnan(a), np.isnan(y))
    _assert_same_float(a, _reference_relu(y, slope))
    rebuilt = kernels.relu_exact(xhat, gamma, beta, slope)
    _assert_same_float(rebuilt, quantizer.relu_exact(xhat_ref, gamma, beta, slope))
    # The rebuilt activation is the forward's exactly, wherever that is a number.
    finite = np.isfinite(a.numpy())
    _assert_same_float(rebuilt.numpy()[finite], a.numpy()[finite])


def _bn_backward_f64(g_a, xhat, gamma, beta, inv_std, slope=0.0):
    xhat64 = np.asarray(xhat, np.float64)
    mask = quantizer.exact_mask(xhat, gamma, beta).numpy()
    g_y = _leaky_grad_f64(g_a, mask, slope)
    axes = tuple(range(g_y.ndim - 1))
    count = g_y.size // g_y.shape[-1]
    d_beta, d_gamma = g_y.sum(axes), (g_y * xhat64).sum(axes)
    scale = np.asarray(gamma, np.float64) * np.asarray(inv_std, np.float64)
    return scale * (g_y - d_beta / count - xhat64 * (d_gamma / count)), d_gamma, d_beta


@pytest.mark.parametrize("slope", BN_SLOPES, ids=_slope_id)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_backward_matches_quantizer(shape, slope):
    x, mean, inv_std, gamma, beta = _case(shape, 5)
    _, xhat = quantizer.bn_relu_exact(x, mean, inv_std, gamma, beta)
    rng = np.random.default_rng(6)
    g_a = tf.constant((rng.normal(size=shape) + 0.3).astype(np.float32))
    out = kernels.bn_backward_exact(g_a, xhat, gamma, beta, inv_std, slope)
    ref = quantizer.bn_backward_exact(g_a, xhat, gamma, beta, inv_std, slope)
    # Float sums err by up to rtol of the sum of magnitudes; a leaky slope's
    # always-off channels cancel (see test_custom_op._check_bn_backward).
    scales = [None, None]
    if slope != 0.0:
        mask = quantizer.exact_mask(xhat, gamma, beta).numpy()
        scales = _sum_scales(_leaky_grad_f64(g_a, mask, slope), np.asarray(xhat, np.float64))
    for actual, expected, scale in zip(out, ref, [None, *scales]):
        assert actual.dtype == tf.float32 and actual.shape == expected.shape
        _assert_close(actual.numpy(), expected.numpy(), scale=scale)
    f64 = _bn_backward_f64(g_a, xhat, gamma, beta, inv_std, slope)
    for actual, expected, scale in zip(out, f64, [None, *scales]):
        _assert_close(actual.numpy().astype(np.float64), expected, rtol=1e-6, scale=scale)


@pytest.mark.parametrize("slope", BN_SLOPES, ids=_slope_id)
def test_inputs_read_later_are_not_overwritten(slope):
    """x and g_a read after the op keep their values (no forwarding then)."""
    x, mean, inv_std, gamma, beta = _case((4, 8, 8, 16), 7)
    g_a = tf.constant(np.random.default_rng(8).normal(size=(4, 8, 8, 16)).astype(np.float32))

    @tf.function
    def run(x, g_a):
        x2 = x * 2.0  # produced here: its buffer is forwardable
        g2 = g_a * 2.0
        a, xhat = kernels.bn_relu_exact(x2, mean, inv_std, gamma, beta, slope)
        g_x, _, _ = kernels.bn_backward_exact(g2, xhat, gamma, beta, inv_std, slope)
        with tf.control_dependencies([a, g_x]):
            return a, xhat, g_x, tf.identity(x2), tf.identity(g2)

    a, xhat, g_x, x2, g2 = run(x, g_a)
    np.testing.assert_array_equal(x2, x.numpy() * 2)
    np.testing.assert_array_equal(g2, g_a.numpy() * 2)
    a_ref, xhat_ref = quantizer.bn_relu_exact(x * 2.0, mean, inv_std, gamma, beta, slope)
    _assert_same_float(a, a_ref)
    _assert_same_float(xhat, xhat_ref)
    ref = quantizer.bn_backward_exact(g_a * 2.0, xhat_ref, gamma, beta, inv_std, slope)[0]
    _assert_close(g_x.numpy(), ref.numpy())


@pytest.mark.parametrize("slope", BN_SLOPES, ids=_slope_id)
def test_forwarded_buffers_give_the_same_results(slope):
    """Inputs only the op reads (forwardable) give the same numbers."""
    x, mean, inv_std, gamma, beta = _case((4, 8, 8, 16), 9)
    g_a = tf.constant(np.random.default_rng(10).normal(size=(4, 8, 8, 16)).astype(np.float32))

    @tf.function
    def run(x, g_a):
        a, xhat = kernels.bn_relu_exact(x + 1.0, mean, inv_std, gamma, beta, slope)
        grads = kernels.bn_backward_exact(g_a + 1.0, xhat, gamma, beta, inv_std, slope)
        return (a, xhat, *grads)

    a, xhat, *grads = run(x, g_a)
    a_ref, xhat_ref = quantizer.bn_relu_exact(x + 1.0, mean, inv_std, gamma, beta, slope)
    _assert_same_float(a, a_ref)
    _assert_same_float(xhat, xhat_ref)
    ref = quantizer.bn_backward_exact(g_a + 1.0, xhat_ref, gamma, beta, inv_std, slope)
    for actual, expected in zip(grads, ref):
        _assert_close(actual.numpy(), expected.numpy())


@pytest.mark.parametrize("bad", BAD_SLOPES, ids=["negative", "nan", "inf", "f32_overflow"])
def test_invalid_slope_raises(bad):
    """The wrappers refuse a bad slope (on every path); the kernels too."""
    x, mean, inv_std, gamma, beta = _case((3, 7), 15)
    for call in (
        lambda s: kernels.bn_relu_exact(x, mean, inv_std, gamma, beta, negative_slope=s),
        lambda s: kernels.relu_exact(x, gamma, beta, negative_slope=s),
        lambda s: kernels.bn_backward_exact(x, x, gamma, beta, inv_std, negative_slope=s),
    ):
        with pytest.raises(ValueError, match="negative_slope"):
            call(bad)
    mod = kernels.load()
    for call in (
        lambda: mod.blpa_bn_relu_exact(x, mean, inv_std, gamma, beta, negative_slope=bad),
        lambda: mod.blpa_relu_exact(x, gamma, beta, negative_slope=bad),
        lambda: mod.blpa_bn_backward_exact(x, x, gamma, beta, inv_std, negative_slope=bad),
    ):
        with pytest.raises(tf.errors.InvalidArgumentError, match="negative_slope"):
            call()


def test_slope_reaches_the_fallback(monkeypatch):
    """Disabled op: the wrappers give the pure-TF twins' leaky results."""
    slope = 0.2
    x, mean, inv_std, gamma, beta = _case((4, 5, 5, 8), 16, specials=True)
    g_a = tf.constant(np.random.default_rng(17).normal(size=(4, 5, 5, 8)).astype(np.float32))
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    a, xhat = kernels.bn_relu_exact(x, mean, inv_std, gamma, beta, slope)
    out = (a, xhat, kernels.relu_exact(xhat, gamma, beta, slope),
           *kernels.bn_backward_exact(g_a, xhat, gamma, beta, inv_std, slope))
    a_ref, xhat_ref = quantizer.bn_relu_exact(x, mean, inv_std, gamma, beta, slope)
    ref = (a_ref, xhat_ref, quantizer.relu_exact(xhat_ref, gamma, beta, slope),
           *quantizer.bn_backward_exact(g_a, xhat_ref, gamma, beta, inv_std, slope))
    for actual, expected in zip(out, ref):
        _assert_same_float(actual, expected)
    assert np.any(a.numpy() < 0)  # leaky: negative activations exist


def test_invalid_inputs_name_the_argument():
    x, mean, inv_std, gamma, beta = _case((3, 7), 11)
    with pytest.raises(ValueError, match="`gamma` must have shape \\[7\\]"):
        kernels.bn_relu_exact(x, mean, inv_std, tf.zeros([6]), beta)
    with pytest.raises(ValueError, match="`beta` must have shape \\[7\\]"):
        kernels.relu_exact(x, gamma, tf.zeros([8]))
    with pytest.raises(ValueError, match="`xhat` must have the shape of `g_a`"):
        kernels.bn_backward_exact(x, tf.zeros([3, 6]), gamma, beta, inv_std)
    with pytest.raises(ValueError, match="rank >= 1"):
        kernels.relu_exact(tf.constant(1.0), gamma[:1], beta[:1])


def test_empty_tensors():
    _, mean, inv_std, gamma, beta = _case((1, 3), 12)
    x = tf.zeros([0, 3])
    a, xhat = kernels.bn_relu_exact(x, mean, inv_std, gamma, beta)
    assert a.shape == (0, 3) and xhat.shape == (0, 3)
    assert kernels.relu_exact(xhat, gamma, beta).shape == (0, 3)
    g_x, d_gamma, d_beta = kernels.bn_backward_exact(x, xhat, gamma, beta, inv_std)
    assert g_x.shape == (0, 3)
    np.testing.assert_array_equal(d_gamma, np.zeros(3))
    np.testing.assert_array_equal(d_beta, np.zeros(3))


def test_xla_uses_pure_tf():
    x, mean, inv_std, gamma, beta = _case((4, 5, 5, 8), 13)

    @tf.function(jit_compile=True)
    def run(x):
        a, xhat = kernels.bn_relu_exact(x, mean, inv_std, gamma, beta)
        return (kernels.relu_exact(xhat, gamma, beta),
                *kernels.bn_backward_exact(a, xhat, gamma, beta, inv_std))

    hlo = run.experimental_get_compiler_ir(x)(stage="hlo")
    assert "Blpa" not in hlo
    rebuilt, g_x, _, _ = run(x)
    a_ref, xhat_ref = quantizer.bn_relu_exact(x, mean, inv_std, gamma, beta)
    _assert_close(rebuilt.numpy(), a_ref.numpy())
    ref = quantizer.bn_backward_exact(a_ref, xhat_ref, gamma, beta, inv_std)[0]
    _assert_close(g_x.numpy(), ref.numpy(), rtol=1e-4)


def test_disabled_switch_gives_pure_tf(monkeypatch):
    x, mean, inv_std, gamma, beta = _case((4, 5, 5, 8), 14)

    @tf.function
    def run(x):
        return kernels.bn_relu_exact(x, mean, inv_std, gamma, beta)

    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    graph = run.get_concrete_function(x).graph.as_graph_def()
    assert not any(node.op.startswith("Blpa") for node in graph.node)
    monkeypatch.delenv("KERAS_BLPA_DISABLE_CUSTOM_OPS")
    run2 = tf.function(run.python_function)
    graph = run2.get_concrete_function(x).graph.as_graph_def()
    assert any(node.op == "BlpaBnReluExact" for node in graph.node)


def test_gpu_selftest_host_checks(tmp_path):
    """The CUDA self-test's host half (spec vs per-element functions, exact
    path included) builds with nvcc and passes; its device half needs a GPU."""
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    sources = Path(__file__).resolve().parent.parent / "custom_ops"
    binary = tmp_path / "gpu_selftest"
    subprocess.run(
        [nvcc, "-std=c++17", "-O1", "--fmad=false", "-Xcompiler", "-ffp-contract=off",
         "-arch=sm_75", f"-I{sources}", "-o", str(binary),
         str(sources / "cuda" / "gpu_selftest.cu")],
        check=True, capture_output=True, timeout=600,
    )
    result = subprocess.run([str(binary), "--host-only"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.strip().endswith(" 0 failed")
