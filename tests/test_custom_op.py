"""The compiled BLPA op against the pure-TF quantizer: bit for bit, and its fallbacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from keras_blpa import build_ops
from keras_blpa.backend.tensorflow import kernels, quantizer

REPO = Path(__file__).resolve().parent.parent

SHAPES = [
    (1, 1),
    (7, 3),  # odd count: 4-bit padding
    (9, 37),
    (4, 8, 8, 64),
    (3, 5, 5, 3),
    (17, 300),  # more channels than the CPU kernel's parameter period
    (3, 33, 33, 37),  # several CPU blocks, odd count, rows straddle blocks
    (2, 64, 64, 64),
]

# Leaky ReLU slopes: 0 is the ReLU (exact 0.0, never -0.0), the others leaky.
SLOPES = [0.0, 0.2, 0.01]
# The backward tests, which are slower, at the ReLU and one leaky slope.
BN_SLOPES = [0.0, 0.2]


def _slope_id(s: float) -> str:
    return f"slope{s:g}"


def _reference_relu(y: tf.Tensor, slope: float) -> tf.Tensor:
    """TF's own activation: tf.nn.relu at slope 0, tf.nn.leaky_relu otherwise."""
    return tf.nn.relu(y) if slope == 0.0 else tf.nn.leaky_relu(y, alpha=slope)


def _bits_of(t: tf.Tensor) -> np.ndarray:
    return np.asarray(t).view(np.uint32)


def _assert_same_float(actual: tf.Tensor, expected: tf.Tensor) -> None:
    """Bit-exact, so -0.0 vs 0.0 or a different rounding would fail."""
    np.testing.assert_array_equal(_bits_of(actual), _bits_of(expected))


def _make_case(shape, bits, seed, specials=False, kind_offset=0, window=None):
    """x, mean, inv_std, gamma, beta, params with every kind of channel.

    Channel c is of kind (c + kind_offset) % 8, so that a shift gives one or
    three channels every kind too.
    """
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (2.5 * rng.normal(size=shape)).astype(np.float32)
    mean = (0.3 * rng.normal(size=c)).astype(np.float32)
    inv_std = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    gamma = rng.normal(size=c).astype(np.float32)
    beta = rng.normal(size=c).astype(np.float32)
    kind = (np.arange(c) + kind_offset) % 8
    gamma[kind == 1] = -np.abs(gamma[kind == 1])  # mask flips
    gamma[kind == 2] = 0.0  # constant channel, on iff beta > 0
    beta[kind == 3] = 50.0 * np.abs(gamma[kind == 3]) + 1.0  # threshold far below: always on
    beta[kind == 4] = -50.0 * np.abs(gamma[kind == 4]) - 1.0  # far above: always off
    gamma[kind == 5], beta[kind == 5] = 0.0, 0.0  # y == 0 exactly: off
    half = quantizer.resolve_window(bits, window) / 2
    beta[kind == 6] = (half - 0.1) * np.abs(gamma[kind == 6])  # threshold at the window edge
    if specials:
        flat = x.reshape(-1)
        values = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-40, -0.0, 0.0], np.float32)
        flat[::3] = np.resize(values, flat[::3].shape)
        if c > 2:
            mean[0] = np.nan
            inv_std[1] = np.inf
    # Some elements exactly on the threshold, where rounding decides the side.
    t = -beta / np.where(gamma == 0, 1.0, gamma)
    on_edge = (mean + t / inv_std).astype(np.float32)
    flat = x.reshape(-1)
    idx = np.arange(1, flat.size, 5)
    flat[idx] = on_edge[idx % c]
    tensors = [tf.constant(v) for v in (x, mean, inv_std, gamma, beta)]
    params = quantizer.quantizer_params(tensors[3], tensors[4], bits, window)
    return (*tensors, params)


@pytest.mark.parametrize("slope", SLOPES, ids=_slope_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nan_inf"])
def test_encode_decode_bit_exact(op_lib, shape, bits, specials, slope):
    x, mean, inv_std, gamma, beta, params = _make_case(shape, bits, hash(shape) % 1000, specials)
    a_ref, packed_ref = quantizer.bn_relu_encode(
        x, mean, inv_std, gamma, beta, params, bits, slope
    )
    a, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits, slope)
    assert packed.dtype == tf.uint8 and packed.shape == packed_ref.shape
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())
    _assert_same_float(a, a_ref)
    # TF's own activation of the same y, NaN and Inf included.
    _assert_same_float(a, _reference_relu((x - mean) * inv_std * gamma + beta, slope))
    if slope != 0.0:
        # The codes do not depend on the slope (the kink stays at y = 0).
        _, packed_relu = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
        np.testing.assert_array_equal(packed.numpy(), packed_relu.numpy())

    xhat_ref, mask_ref = quantizer.decode(packed_ref, params, x.shape, bits)
    xhat, mask = kernels.decode(packed_ref, params, x.shape, bits)
    assert xhat.shape == x.shape and mask.dtype == tf.bool
    _assert_same_float(xhat, xhat_ref)
    np.testing.assert_array_equal(mask.numpy(), mask_ref.numpy())

    relu = kernels.decode_relu(packed_ref, params, gamma, beta, x.shape, bits, slope)
    _assert_same_float(
        relu, quantizer.relu_from_decoded(xhat_ref, mask_ref, gamma, beta, slope)
    )
    y_ref = xhat_ref * gamma + beta
    _assert_same_float(relu, tf.where(mask_ref, y_ref, 0.0 if slope == 0.0 else y_ref * slope))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("window", [6.0, 7.3, 12.0, 40.0])
def test_windows_bit_exact(op_lib, bits, window):
    """The op's float `window` attribute builds the same grid as Python."""
    shape = (3, 7, 9, 37)
    x, mean, inv_std, gamma, beta, params = _make_case(shape, bits, 11, window=window)
    assert params.window == pytest.approx(window, rel=1e-7)
    a_ref, packed_ref = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    a, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())
    _assert_same_float(a, a_ref)
    xhat_ref, mask_ref = quantizer.decode(packed_ref, params, x.shape, bits)
    xhat, mask = kernels.decode(packed_ref, params, x.shape, bits)
    _assert_same_float(xhat, xhat_ref)
    np.testing.assert_array_equal(mask.numpy(), mask_ref.numpy())
    # A different window really changes the codes (the attribute is not ignored).
    other = params._replace(window=params.window * 2)
    _, packed_other = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, other, bits)
    assert not np.array_equal(packed_other.numpy(), packed.numpy())
    _check_bn_backward(*_bn_case(shape, bits, 12, window=window), bits)


@pytest.mark.parametrize("slope", SLOPES, ids=_slope_id)
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_every_byte_value(op_lib, bits, slope):
    """Random bytes (not just encoder output), so every code and nibble is decoded."""
    shape = (5, 7, 37)
    _, _, _, gamma, beta, params = _make_case(shape, bits, 7)
    n = int(np.prod(shape))
    size = n if bits == 8 else (n + 1) // 2
    rng = np.random.default_rng(3)
    packed = tf.constant(rng.integers(0, 256, size=size, dtype=np.uint8))
    xhat_ref, mask_ref = quantizer.decode(packed, params, shape, bits)
    xhat, mask = kernels.decode(packed, params, list(shape), bits)
    _assert_same_float(xhat, xhat_ref)
    np.testing.assert_array_equal(mask.numpy(), mask_ref.numpy())
    relu = kernels.decode_relu(packed, params, gamma, beta, tf.constant(shape), bits, slope)
    _assert_same_float(
        relu, quantizer.relu_from_decoded(xhat_ref, mask_ref, gamma, beta, slope)
    )


def test_inside_tf_function(op_lib):
    bits = 4
    x, mean, inv_std, gamma, beta, params = _make_case((6, 5, 5, 37), bits, 11)

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 37], tf.float32)])
    def roundtrip(x):
        a, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
        assert a.shape.as_list() == [None, 5, 5, 37]
        xhat, mask = kernels.decode(packed, params, tf.shape(x), bits)
        # The decode's static shape follows from tf.shape(x).
        assert xhat.shape.as_list() == [None, 5, 5, 37]
        return a, packed, xhat, mask

    a, packed, xhat, mask = roundtrip(x)
    graph = roundtrip.get_concrete_function().graph
    op_types = {op.type for op in graph.get_operations()}
    assert {"BlpaBnReluEncode", "BlpaDecode"} <= op_types
    a_ref, packed_ref = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    xhat_ref, mask_ref = quantizer.decode(packed_ref, params, x.shape, bits)
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())
    _assert_same_float(a, a_ref)
    _assert_same_float(xhat, xhat_ref)
    np.testing.assert_array_equal(mask.numpy(), mask_ref.numpy())


def test_static_shapes(op_lib):
    x, mean, inv_std, gamma, beta, params = _make_case((3, 7), 4, 1)

    @tf.function
    def f(x):
        a, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
        assert a.shape == (3, 7) and packed.shape == (11,)
        xhat, mask = kernels.decode(packed, params, [3, 7], 4)
        assert xhat.shape == (3, 7) and mask.shape == (3, 7)
        return xhat

    f(x)


def test_xla_context_uses_pure_tf(op_lib):
    """The op has no XLA kernel: under jit_compile the wrappers emit pure TF.

    XLA itself is not bit-exact with TF's kernels (on CPU it contracts
    `xhat * gamma + beta` into an FMA), so codes may differ by one bin there.
    """
    x, mean, inv_std, gamma, beta, params = _make_case((4, 9, 37), 8, 5)

    @tf.function(jit_compile=True)
    def f(x):
        _, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 8)
        return packed, kernels.decode(packed, params, x.shape, 8)[1]

    packed, mask = f(x)
    ops = {op.type for op in f.get_concrete_function(x).graph.get_operations()}
    assert not any(t.startswith("Blpa") for t in ops), ops
    _, packed_op = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 8)
    diff = np.abs(packed.numpy().astype(int) - packed_op.numpy().astype(int))
    assert diff.max() <= 1
    # XLA's codes decode to the same mask with the op.
    np.testing.assert_array_equal(mask.numpy(), kernels.decode(packed, params, x.shape, 8)[1])


def test_invalid_inputs(op_lib):
    x, mean, inv_std, gamma, beta, params = _make_case((3, 7), 4, 2)
    short = tf.zeros([6])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        kernels.bn_relu_encode(x, short, inv_std, gamma, beta, params, 4)
    _, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        kernels.decode(packed, params, [3, 9], 4)  # wrong channel count
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        kernels.decode(packed, params, [5, 7], 4)  # wrong byte count
    with pytest.raises(ValueError):
        kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 2)


BAD_SLOPES = [-0.1, float("nan"), float("inf"), 1e39]  # 1e39: Inf in float32


@pytest.mark.parametrize("bad", BAD_SLOPES, ids=["negative", "nan", "inf", "f32_overflow"])
def test_invalid_slope_raises(op_lib, bad):
    """The wrappers refuse a bad slope on both paths; the op's kernel too."""
    x, mean, inv_std, gamma, beta, params = _make_case((3, 7), 4, 2)
    _, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    calls = {
        "encode": lambda s: kernels.bn_relu_encode(
            x, mean, inv_std, gamma, beta, params, 4, negative_slope=s
        ),
        "decode_relu": lambda s: kernels.decode_relu(
            packed, params, gamma, beta, x.shape, 4, negative_slope=s
        ),
        "backward": lambda s: kernels.decode_bn_backward(
            x, packed, params, gamma, inv_std, 4, negative_slope=s
        ),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="negative_slope"):
            call(bad)
    # The kernels' own check (the attr reaches them unchecked here).
    lo, k, flip, aligned = params.lo, params.k, params.flip, params.aligned
    no_cap = tf.zeros([0], tf.float32)  # [0]-sized cap inputs: no cap
    raw = [
        lambda: op_lib.blpa_bn_relu_encode(
            x, mean, inv_std, gamma, beta, lo, k, flip, aligned,
            no_cap, no_cap, no_cap, bits=4, negative_slope=bad,
        ),
        lambda: op_lib.blpa_decode_relu(
            packed, lo, k, flip, gamma, beta, tf.constant([3, 7]),
            no_cap, no_cap, bits=4, negative_slope=bad,
        ),
        lambda: op_lib.blpa_decode_bn_backward(
            x, packed, lo, k, flip, gamma, inv_std,
            no_cap, no_cap, bits=4, negative_slope=bad,
        ),
    ]
    for call in raw:
        with pytest.raises(tf.errors.InvalidArgumentError, match="negative_slope"):
            call()


def test_slope_on_the_pure_tf_paths(op_lib, monkeypatch):
    """Disabled op and XLA: the wrappers pass the slope to the pure-TF twins."""
    slope, bits = 0.2, 8
    x, mean, inv_std, gamma, beta, params = _make_case((4, 9, 37), bits, 23)
    g_a = tf.constant(np.random.default_rng(24).normal(size=(4, 9, 37)).astype(np.float32))
    a_ref, packed_ref = quantizer.bn_relu_encode(
        x, mean, inv_std, gamma, beta, params, bits, slope
    )
    xhat_ref, mask_ref = quantizer.decode(packed_ref, params, x.shape, bits)
    ref = (
        a_ref,
        quantizer.relu_from_decoded(xhat_ref, mask_ref, gamma, beta, slope),
        *quantizer.decode_bn_backward(g_a, packed_ref, params, gamma, inv_std, bits, slope),
    )

    def run(x, packed, g_a):  # the decodes from the given codes
        a, _ = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits, slope)
        relu = kernels.decode_relu(packed, params, gamma, beta, x.shape, bits, slope)
        grads = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits, slope)
        return a, relu, *grads

    xla = tf.function(run, jit_compile=True)
    graph = xla.get_concrete_function(x, packed_ref, g_a).graph
    assert not any(op.type.startswith("Blpa") for op in graph.get_operations())
    # XLA may contract into FMAs: close, not bit for bit.
    for actual, expected in zip(xla(x, packed_ref, g_a), ref):
        _assert_close(actual.numpy(), expected.numpy(), rtol=1e-4)
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    for actual, expected in zip(run(x, packed_ref, g_a), ref):
        _assert_same_float(actual, expected)


def test_graph_without_slope_attr_still_runs(op_lib):
    """A GraphDef from before `negative_slope` (no such attr) loads and runs as
    the ReLU: the attr's default fills in."""
    x, mean, inv_std, gamma, beta, params = _make_case((3, 5, 37), 4, 25)

    @tf.function
    def f(x):
        return kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)

    graph_def = f.get_concrete_function(x).graph.as_graph_def()
    stripped = 0
    for node in graph_def.node:
        if node.op == "BlpaBnReluEncode":
            del node.attr["negative_slope"]
            stripped += 1
    assert stripped == 1
    outputs = [n.name for n in graph_def.node if n.op == "BlpaBnReluEncode"]

    def imported(x_in):
        return tf.graph_util.import_graph_def(
            graph_def,
            input_map={"x:0": x_in},
            return_elements=[f"{outputs[0]}:0", f"{outputs[0]}:1"],
        )

    wrapped = tf.compat.v1.wrap_function(imported, [tf.TensorSpec(x.shape, tf.float32)])
    a, packed = wrapped(x)
    a_ref, packed_ref = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    _assert_same_float(a, a_ref)
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())


def test_empty_tensor(op_lib):
    _, mean, inv_std, gamma, beta, params = _make_case((1, 3), 4, 0)
    x = tf.zeros([0, 3])
    a, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    assert a.shape == (0, 3) and packed.shape == (0,)
    xhat, mask = kernels.decode(packed, params, [0, 3], 4)
    assert xhat.shape == (0, 3) and mask.shape == (0, 3)


# ---- fused decode + BN backward ------------------------------------------------

BN_SHAPES = [
    (37,),  # rank 1: a single row
    (1, 1),
    (7, 3),  # odd count: 4-bit padding
    (13, 1),
    (9, 37),
    (5, 64),
    (3, 5, 5, 3),
    (3, 7, 9, 37),  # odd count, rank 4
    (4, 8, 8, 64),
    (2, 9, 7, 1),
    (17, 300),  # more channels than the CPU kernel's parameter period
    (9, 1100),  # past the CPU kernel's float partial sums: double accumulators
    (8, 20000),  # one row spans several CPU blocks
    (3, 33, 33, 37),  # several blocks and pass-1 shards, rows straddle blocks
    (2, 64, 64, 64),
]


def _assert_close(actual, expected, rtol=1e-5, scale=None):
    """Within rtol of the largest magnitude of `expected` (per tensor), or of
    `scale` when given."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if scale is None:
        scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale + 1e-30)


def _leaky_grad_f64(g_a, mask, slope):
    """g_y = where(mask, g_a, g_a * slope) (the float32 product), in float64."""
    g_a = np.asarray(g_a, np.float32)
    off = np.zeros_like(g_a) if slope == 0.0 else g_a * np.float32(slope)
    return np.where(mask, g_a, off).astype(np.float64)


def _sum_scales(g_y, xhat):
    """Largest per-channel sums of |g_y * xhat| and |g_y|: the scale of the
    rounding error of float sums (d_gamma, d_beta), which cancellation leaves
    where the sums themselves are small (a leaky slope's always-off channels)."""
    axes = tuple(range(g_y.ndim - 1))
    return float(np.abs(g_y * xhat).sum(axes).max()), float(np.abs(g_y).sum(axes).max())


def _bn_backward_f64(g_a, packed, params, gamma, inv_std, bits, slope=0.0, scales=None):
    """quantizer.decode_bn_backward in float64 (from the exact decoded xhat).

    `scales`, a list, receives `_sum_scales` of the case."""
    xhat, mask = quantizer.decode(packed, params, tf.shape(g_a), bits)
    xhat = xhat.numpy().astype(np.float64)
    g_y = _leaky_grad_f64(g_a, mask.numpy(), slope)
    if scales is not None:
        scales.extend(_sum_scales(g_y, xhat))
    axes = tuple(range(g_y.ndim - 1))
    count = g_y.size // g_y.shape[-1]
    d_beta, d_gamma = g_y.sum(axes), (g_y * xhat).sum(axes)
    scale = np.asarray(gamma, np.float64) * np.asarray(inv_std, np.float64)
    g_x = scale * (g_y - d_beta / count - xhat * (d_gamma / count))
    return g_x, d_gamma, d_beta


def _bn_case(shape, bits, seed, random_codes=False, kind_offset=0, window=None):
    """g_a (non-zero mean), packed codes, params, gamma, inv_std."""
    x, mean, inv_std, gamma, beta, params = _make_case(
        shape, bits, seed, kind_offset=kind_offset, window=window
    )
    rng = np.random.default_rng(seed + 1)
    if random_codes:  # every code value, not only what the encoder gives
        n = int(np.prod(shape))
        size = n if bits == 8 else (n + 1) // 2
        packed = tf.constant(rng.integers(0, 256, size=size, dtype=np.uint8))
    else:
        _, packed = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    g_a = tf.constant((rng.normal(size=shape) + 0.3).astype(np.float32))
    return g_a, packed, params, gamma, inv_std


def _check_bn_backward(g_a, packed, params, gamma, inv_std, bits, slope=0.0):
    ref = quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits, slope)
    out = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits, slope)
    assert len(out) == 3
    scales = []
    f64 = _bn_backward_f64(g_a, packed, params, gamma, inv_std, bits, slope, scales)
    # Float sums err by up to rtol of the sum of magnitudes (d_gamma, d_beta):
    # the tolerance where a leaky slope's always-off channels cancel. At slope
    # 0 those channels sum to 0 exactly, and the largest sum sets the scale.
    if slope == 0.0:
        scales = [None, None]
    for actual, expected, scale in zip(out, ref, [None, *scales]):
        assert actual.dtype == tf.float32 and actual.shape == expected.shape
        _assert_close(actual.numpy(), expected.numpy(), scale=scale)
    # Sums in double: closer to the exact result than TF's float reductions.
    for actual, expected, scale in zip(out, f64, [None, *scales]):
        _assert_close(actual.numpy().astype(np.float64), expected, rtol=1e-6, scale=scale)
    return out


@pytest.mark.parametrize("slope", BN_SLOPES, ids=_slope_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("codes", ["encoded", "random"])
def test_decode_bn_backward_matches_quantizer(op_lib, shape, bits, codes, slope):
    case = _bn_case(shape, bits, sum(shape) % 1000, random_codes=codes == "random")
    _check_bn_backward(*case, bits, slope)


@pytest.mark.parametrize("slope", BN_SLOPES, ids=_slope_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind_offset", range(8))
def test_decode_bn_backward_channel_kinds(op_lib, channels, bits, kind_offset, slope):
    """Few channels, each kind: gamma < 0 (flipped mask), gamma == 0, thresholds
    outside the window (always on/off) and at its edge."""
    case = _bn_case((5, 7, channels), bits, kind_offset, kind_offset=kind_offset)
    _check_bn_backward(*case, bits, slope)


def test_leaky_backward_differs_from_relu(op_lib):
    """The slope reaches the backward kernel: g_x and both sums change with it."""
    case = _bn_case((4, 9, 37), 4, 21)
    relu = kernels.decode_bn_backward(*case, 4)
    leaky = kernels.decode_bn_backward(*case, 4, negative_slope=0.2)
    for a, b in zip(relu, leaky):
        assert not np.array_equal(a.numpy(), b.numpy())


def test_decode_bn_backward_zero_gamma_gives_zero_gx(op_lib):
    g_a, packed, params, gamma, inv_std = _bn_case((6, 11, 37), 4, 5)
    kind = np.arange(37) % 8
    assert np.all(gamma.numpy()[(kind == 2) | (kind == 5)] == 0.0)
    g_x, d_gamma, d_beta = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)
    zero = (kind == 2) | (kind == 5)
    np.testing.assert_array_equal(np.abs(g_x.numpy()[..., zero]), 0.0)
    assert np.any(d_beta.numpy()[zero] != 0.0)  # parameter gradients are not zero


def test_decode_bn_backward_deterministic(op_lib):
    """Same thread count, same sums (32 CPU blocks: several pass-1 shards)."""
    case = _bn_case((2, 64, 64, 64), 4, 3)
    first = kernels.decode_bn_backward(*case, 4)
    second = kernels.decode_bn_backward(*case, 4)
    for a, b in zip(first, second):
        _assert_same_float(a, b)


def test_decode_bn_backward_inside_tf_function(op_lib):
    bits = 4
    g_a, packed, params, gamma, inv_std = _bn_case((6, 5, 5, 37), bits, 13)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 5, 5, 37], tf.float32),
            tf.TensorSpec([None], tf.uint8),
        ]
    )
    def backward(g_a, packed):
        g_x, d_gamma, d_beta = kernels.decode_bn_backward(
            g_a, packed, params, gamma, inv_std, bits
        )
        assert g_x.shape.as_list() == [None, 5, 5, 37]
        assert d_gamma.shape.as_list() == [37] and d_beta.shape.as_list() == [37]
        return g_x, d_gamma, d_beta

    out = backward(g_a, packed)
    op_types = {op.type for op in backward.get_concrete_function().graph.get_operations()}
    assert "BlpaDecodeBnBackward" in op_types
    ref = quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits)
    for actual, expected in zip(out, ref):
        _assert_close(actual.numpy(), expected.numpy())


def test_decode_bn_backward_static_shapes(op_lib):
    g_a, packed, params, gamma, inv_std = _bn_case((3, 7), 4, 1)

    @tf.function
    def f(g_a, packed):
        g_x, d_gamma, d_beta = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)
        assert g_x.shape == (3, 7) and d_gamma.shape == (7,) and d_beta.shape == (7,)
        return g_x

    f(g_a, packed)


def test_decode_bn_backward_xla_uses_pure_tf(op_lib):
    g_a, packed, params, gamma, inv_std = _bn_case((4, 9, 37), 8, 5)

    @tf.function(jit_compile=True)
    def f(g_a, packed):
        return kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 8)

    out = f(g_a, packed)
    ops = {op.type for op in f.get_concrete_function(g_a, packed).graph.get_operations()}
    assert not any(t.startswith("Blpa") for t in ops), ops
    ref = quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, 8)
    for actual, expected in zip(out, ref):
        _assert_close(actual.numpy(), expected.numpy())


def test_decode_bn_backward_invalid_inputs(op_lib):
    g_a, packed, params, gamma, inv_std = _bn_case((3, 7), 4, 2)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        kernels.decode_bn_backward(g_a, packed[:-1], params, gamma, inv_std, 4)  # bytes
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        kernels.decode_bn_backward(g_a, packed, params, gamma[:6], inv_std, 4)  # channels
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 8)  # 4-bit codes
    with pytest.raises(ValueError):
        kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 2)


def test_decode_bn_backward_empty(op_lib):
    _, _, params, gamma, inv_std = _bn_case((1, 3), 4, 0)
    g_a = tf.zeros([0, 3])
    packed = tf.zeros([0], tf.uint8)
    g_x, d_gamma, d_beta = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)
    assert g_x.shape == (0, 3)
    np.testing.assert_array_equal(d_gamma.numpy(), np.zeros(3, np.float32))
    np.testing.assert_array_equal(d_beta.numpy(), np.zeros(3, np.float32))


def test_decode_bn_backward_disabled_is_pure_tf(monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    g_a, packed, params, gamma, inv_std = _bn_case((3, 5, 5, 37), 4, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)

        @tf.function
        def f(g_a, packed):
            return kernels.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)

        f(g_a, packed)
    assert not [w for w in caught if "keras_blpa" in str(w.message)]
    ops = {op.type for op in f.get_concrete_function(g_a, packed).graph.get_operations()}
    assert not any(t.startswith("Blpa") for t in ops), ops
    ref = quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)
    for actual, expected in zip(out, ref):
        _assert_same_float(actual, expected)


def test_build_is_cached(op_lib):
    if os.environ.get("KERAS_BLPA_OP_LIBRARY"):
        pytest.skip("library path overridden")
    path = build_ops.ensure_built()
    assert path is not None and path.is_file()
    assert path == build_ops.ensure_built()  # no rebuild
    assert tf.__version__ in path.parent.name
    assert build_ops.source_dir().joinpath("shared", "blpa_kernels.h").is_file()


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    x, mean, inv_std, gamma, beta, params = _make_case((5, 3), 4, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.load() is None and not kernels.is_available()
        a, packed = kernels.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
        xhat, mask = kernels.decode(packed, params, x.shape, 4)
    assert not [w for w in caught if "keras_blpa" in str(w.message)]
    a_ref, packed_ref = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())
    _assert_same_float(a, a_ref)


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings
    import numpy as np
    import tensorflow as tf
    from keras_blpa.backend.tensorflow import kernels, quantizer

    x = tf.random.stateless_normal([4, 5], seed=[1, 2])
    c = tf.ones([5])
    params = quantizer.quantizer_params(c, -0.5 * c, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            a, packed = kernels.bn_relu_encode(x, 0 * c, c, c, -0.5 * c, params, 4)
            xhat, mask = kernels.decode(packed, params, x.shape, 4)
            grads = kernels.decode_bn_backward(x, packed, params, c, c, 4)
        assert not kernels.is_available()
    ours = [w for w in caught if "keras_blpa" in str(w.message)]
    ref = quantizer.bn_relu_encode(x, 0 * c, c, c, -0.5 * c, params, 4)[1]
    assert np.array_equal(packed.numpy(), ref.numpy())
    ref_grads = quantizer.decode_bn_backward(x, packed, params, c, c, 4)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(grads, ref_grads))
    print("WARNINGS", len(ours))
    for w in ours:
        print("MESSAGE", w.category.__name__, w.message)
    """
)


def _run_fallback(library: Path | None, **extra_env: str) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra_env)
    env.pop("KERAS_BLPA_DISABLE_CUSTOM_OPS", None)
    env.pop("KERAS_BLPA_OP_LIBRARY", None)
    if library is not None:
        env["KERAS_BLPA_OP_LIBRARY"] = str(library)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _garbage_library(tmp: Path) -> tuple[Path, dict]:
    lib = tmp / "garbage.so"
    lib.write_bytes(b"this is not an ELF file\n" * 10)
    return lib, {}


def _abi_broken_library(tmp: Path) -> tuple[Path, dict] | None:
    """A library with an unresolved symbol, as a mismatched TF ABI gives."""
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        return None
    src = tmp / "broken.cc"
    src.write_text("extern void blpa_missing_symbol();\nvoid f() { blpa_missing_symbol(); }\n")
    lib = tmp / "broken.so"
    subprocess.run([gxx, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return lib, {}


def _missing_library(tmp: Path) -> tuple[Path, dict]:
    return tmp / "does_not_exist.so", {}


def _failed_build(tmp: Path) -> tuple[None, dict]:
    """A compiler that fails."""
    return None, dict(KERAS_BLPA_CACHE_DIR=str(tmp / "cache"), KERAS_BLPA_BUILD_CUDA="0",
                      CXX=shutil.which("false") or "/bin/false")


FALLBACKS = {
    "test_garbage_library_warns_once": _garbage_library,
    "test_abi_broken_library_warns_once": _abi_broken_library,
    "test_missing_library_warns_once": _missing_library,
    "test_failed_build_warns_once": _failed_build,
}


@pytest.fixture(scope="module")
def fallback_runs(request, tmp_path_factory):
    """`_run_fallback` for each selected test's case (None: no C++ compiler),
    in fresh processes run side by side, one per core (each spends seconds
    importing TensorFlow on one core)."""
    selected = [item.originalname for item in request.session.items
                if getattr(item, "originalname", None) in FALLBACKS]
    cases = {name: FALLBACKS[name](tmp_path_factory.mktemp(name)) for name in selected}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {name: case and pool.submit(_run_fallback, case[0], **case[1])
               for name, case in cases.items()}


def test_garbage_library_warns_once(fallback_runs):
    out = fallback_runs["test_garbage_library_warns_once"].result()
    assert "WARNINGS 1" in out, out
    assert "RuntimeWarning" in out and "garbage.so" in out, out


def test_abi_broken_library_warns_once(fallback_runs):
    """A library with an unresolved symbol, as a mismatched TF ABI gives."""
    run = fallback_runs["test_abi_broken_library_warns_once"]
    if run is None:
        pytest.skip("no C++ compiler")
    out = run.result()
    assert "WARNINGS 1" in out, out
    assert "undefined symbol" in out, out


def test_missing_library_warns_once(fallback_runs):
    out = fallback_runs["test_missing_library_warns_once"].result()
    assert "WARNINGS 1" in out and "does_not_exist.so" in out, out


def test_failed_build_warns_once(fallback_runs):
    """A compiler that fails: one warning naming the failed command, then pure TF."""
    out = fallback_runs["test_failed_build_warns_once"].result()
    assert "WARNINGS 1" in out and "command failed" in out, out


def test_the_switch_turns_a_missing_library_into_a_failure(monkeypatch):
    import kernel_requirement

    monkeypatch.setattr(kernel_requirement, "REQUIRE_KERNELS", False)
    with pytest.raises(pytest.skip.Exception):
        kernel_requirement.kernels_unavailable("library missing")
    monkeypatch.setattr(kernel_requirement, "REQUIRE_KERNELS", True)
    with pytest.raises(pytest.fail.Exception, match="KERAS_BLPA_REQUIRE_KERNELS"):
        kernel_requirement.kernels_unavailable("library missing")


LAYER_OPS = {
    "bn_unit_4": (lambda: keras_blpa.BNReLUConv2D(4, 3, bits=4),
                  {"BlpaBnReluEncode", "BlpaDecodeRelu", "BlpaDecodeBnBackward"}),
    "bn_unit_leaky_8": (lambda: keras_blpa.BNReLUConv2D(4, 3, bits=8, negative_slope=0.1),
                        {"BlpaBnReluEncode", "BlpaDecodeRelu", "BlpaDecodeBnBackward"}),
    "bn_unit_exact": (lambda: keras_blpa.BNReLUConv2D(4, 3, bits=None),
                      {"BlpaBnReluExact", "BlpaReluExact", "BlpaBnBackwardExact"}),
    "relu_unit_4": (lambda: keras_blpa.ReLUConv2D(4, 3, bits=4),
                    {"BlpaBnReluEncode", "BlpaDecodeRelu"}),
    "approx_bn_8": (lambda: keras_blpa.ApproxBatchNormalization(bits=8),
                    {"BlpaBnReluEncode", "BlpaDecodeBnBackward"}),
}


@pytest.mark.parametrize("kind", sorted(LAYER_OPS))
def test_layers_run_the_op_in_their_forward_and_backward(kind, op_lib):
    """The traced training step of each uncapped layer calls the op's kernels
    (encode in the forward, decode and BN backward in the backward), not
    their pure-TF twins."""
    make, expected = LAYER_OPS[kind]
    layer = make()
    x = tf.random.normal([2, 6, 6, 4])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, [x, *layer.trainable_weights])

    step(x)
    graph = step.get_concrete_function(x).graph
    op_types = {op.type for op in graph.get_operations()}
    assert expected <= op_types, sorted(t for t in op_types if t.startswith("Blpa"))
