"""The compiled BLPA op against the pure-TF quantizer: bit for bit, and its fallbacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_blpa import build_ops, custom_op, quantizer

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


@pytest.fixture(scope="module")
def op_lib():
    if custom_op.disabled():
        pytest.skip("KERAS_BLPA_DISABLE_CUSTOM_OPS is set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = custom_op.load()
    if module is None:
        pytest.skip(f"custom op library unavailable: {custom_op.load_error()}")
    return module


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


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nan_inf"])
def test_encode_decode_bit_exact(op_lib, shape, bits, specials):
    x, mean, inv_std, gamma, beta, params = _make_case(shape, bits, hash(shape) % 1000, specials)
    a_ref, packed_ref = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    a, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    assert packed.dtype == tf.uint8 and packed.shape == packed_ref.shape
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())
    _assert_same_float(a, a_ref)

    xhat_ref, mask_ref = quantizer.decode(packed_ref, params, x.shape, bits)
    xhat, mask = custom_op.decode(packed_ref, params, x.shape, bits)
    assert xhat.shape == x.shape and mask.dtype == tf.bool
    _assert_same_float(xhat, xhat_ref)
    np.testing.assert_array_equal(mask.numpy(), mask_ref.numpy())

    relu = custom_op.decode_relu(packed_ref, params, gamma, beta, x.shape, bits)
    _assert_same_float(relu, tf.where(mask_ref, xhat_ref * gamma + beta, 0.0))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("window", [6.0, 7.3, 12.0, 40.0])
def test_windows_bit_exact(op_lib, bits, window):
    """The op's float `window` attribute builds the same grid as Python."""
    shape = (3, 7, 9, 37)
    x, mean, inv_std, gamma, beta, params = _make_case(shape, bits, 11, window=window)
    assert params.window == pytest.approx(window, rel=1e-7)
    a_ref, packed_ref = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    a, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())
    _assert_same_float(a, a_ref)
    xhat_ref, mask_ref = quantizer.decode(packed_ref, params, x.shape, bits)
    xhat, mask = custom_op.decode(packed_ref, params, x.shape, bits)
    _assert_same_float(xhat, xhat_ref)
    np.testing.assert_array_equal(mask.numpy(), mask_ref.numpy())
    # A different window really changes the codes (the attribute is not ignored).
    other = params._replace(window=params.window * 2)
    _, packed_other = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, other, bits)
    assert not np.array_equal(packed_other.numpy(), packed.numpy())
    _check_bn_backward(*_bn_case(shape, bits, 12, window=window), bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_every_byte_value(op_lib, bits):
    """Random bytes (not just encoder output), so every code and nibble is decoded."""
    shape = (5, 7, 37)
    _, _, _, gamma, beta, params = _make_case(shape, bits, 7)
    n = int(np.prod(shape))
    size = n if bits == 8 else (n + 1) // 2
    rng = np.random.default_rng(3)
    packed = tf.constant(rng.integers(0, 256, size=size, dtype=np.uint8))
    xhat_ref, mask_ref = quantizer.decode(packed, params, shape, bits)
    xhat, mask = custom_op.decode(packed, params, list(shape), bits)
    _assert_same_float(xhat, xhat_ref)
    np.testing.assert_array_equal(mask.numpy(), mask_ref.numpy())
    relu = custom_op.decode_relu(packed, params, gamma, beta, tf.constant(shape), bits)
    _assert_same_float(relu, tf.where(mask_ref, xhat_ref * gamma + beta, 0.0))


def test_inside_tf_function(op_lib):
    bits = 4
    x, mean, inv_std, gamma, beta, params = _make_case((6, 5, 5, 37), bits, 11)

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 37], tf.float32)])
    def roundtrip(x):
        a, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
        assert a.shape.as_list() == [None, 5, 5, 37]
        xhat, mask = custom_op.decode(packed, params, tf.shape(x), bits)
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
        a, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
        assert a.shape == (3, 7) and packed.shape == (11,)
        xhat, mask = custom_op.decode(packed, params, [3, 7], 4)
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
        _, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 8)
        return packed, custom_op.decode(packed, params, x.shape, 8)[1]

    packed, mask = f(x)
    ops = {op.type for op in f.get_concrete_function(x).graph.get_operations()}
    assert not any(t.startswith("Blpa") for t in ops), ops
    _, packed_op = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 8)
    diff = np.abs(packed.numpy().astype(int) - packed_op.numpy().astype(int))
    assert diff.max() <= 1
    # XLA's codes decode to the same mask with the op.
    np.testing.assert_array_equal(mask.numpy(), custom_op.decode(packed, params, x.shape, 8)[1])


def test_invalid_inputs(op_lib):
    x, mean, inv_std, gamma, beta, params = _make_case((3, 7), 4, 2)
    short = tf.zeros([6])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        custom_op.bn_relu_encode(x, short, inv_std, gamma, beta, params, 4)
    _, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        custom_op.decode(packed, params, [3, 9], 4)  # wrong channel count
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        custom_op.decode(packed, params, [5, 7], 4)  # wrong byte count
    with pytest.raises(ValueError):
        custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 2)


def test_empty_tensor(op_lib):
    _, mean, inv_std, gamma, beta, params = _make_case((1, 3), 4, 0)
    x = tf.zeros([0, 3])
    a, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    assert a.shape == (0, 3) and packed.shape == (0,)
    xhat, mask = custom_op.decode(packed, params, [0, 3], 4)
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


def _assert_close(actual, expected, rtol=1e-5):
    """Within rtol of the largest magnitude of `expected` (per tensor)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale + 1e-30)


def _bn_backward_f64(g_a, packed, params, gamma, inv_std, bits):
    """quantizer.decode_bn_backward in float64 (from the exact decoded xhat)."""
    xhat, mask = quantizer.decode(packed, params, tf.shape(g_a), bits)
    xhat = xhat.numpy().astype(np.float64)
    g_y = np.where(mask.numpy(), np.asarray(g_a, np.float64), 0.0)
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


def _check_bn_backward(g_a, packed, params, gamma, inv_std, bits):
    ref = quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits)
    out = custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits)
    assert len(out) == 3
    for actual, expected in zip(out, ref):
        assert actual.dtype == tf.float32 and actual.shape == expected.shape
        _assert_close(actual.numpy(), expected.numpy())
    # Sums in double: closer to the exact result than TF's float reductions.
    for actual, expected in zip(out, _bn_backward_f64(g_a, packed, params, gamma, inv_std, bits)):
        _assert_close(actual.numpy().astype(np.float64), expected, rtol=1e-6)
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("codes", ["encoded", "random"])
def test_decode_bn_backward_matches_quantizer(op_lib, shape, bits, codes):
    case = _bn_case(shape, bits, sum(shape) % 1000, random_codes=codes == "random")
    _check_bn_backward(*case, bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind_offset", range(8))
def test_decode_bn_backward_channel_kinds(op_lib, channels, bits, kind_offset):
    """Few channels, each kind: gamma < 0 (flipped mask), gamma == 0, thresholds
    outside the window (always on/off) and at its edge."""
    case = _bn_case((5, 7, channels), bits, kind_offset, kind_offset=kind_offset)
    _check_bn_backward(*case, bits)


def test_decode_bn_backward_zero_gamma_gives_zero_gx(op_lib):
    g_a, packed, params, gamma, inv_std = _bn_case((6, 11, 37), 4, 5)
    kind = np.arange(37) % 8
    assert np.all(gamma.numpy()[(kind == 2) | (kind == 5)] == 0.0)
    g_x, d_gamma, d_beta = custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)
    zero = (kind == 2) | (kind == 5)
    np.testing.assert_array_equal(np.abs(g_x.numpy()[..., zero]), 0.0)
    assert np.any(d_beta.numpy()[zero] != 0.0)  # parameter gradients are not zero


def test_decode_bn_backward_deterministic(op_lib):
    """Same thread count, same sums (32 CPU blocks: several pass-1 shards)."""
    case = _bn_case((2, 64, 64, 64), 4, 3)
    first = custom_op.decode_bn_backward(*case, 4)
    second = custom_op.decode_bn_backward(*case, 4)
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
        g_x, d_gamma, d_beta = custom_op.decode_bn_backward(
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
        g_x, d_gamma, d_beta = custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)
        assert g_x.shape == (3, 7) and d_gamma.shape == (7,) and d_beta.shape == (7,)
        return g_x

    f(g_a, packed)


def test_decode_bn_backward_xla_uses_pure_tf(op_lib):
    g_a, packed, params, gamma, inv_std = _bn_case((4, 9, 37), 8, 5)

    @tf.function(jit_compile=True)
    def f(g_a, packed):
        return custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 8)

    out = f(g_a, packed)
    ops = {op.type for op in f.get_concrete_function(g_a, packed).graph.get_operations()}
    assert not any(t.startswith("Blpa") for t in ops), ops
    ref = quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, 8)
    for actual, expected in zip(out, ref):
        _assert_close(actual.numpy(), expected.numpy())


def test_decode_bn_backward_invalid_inputs(op_lib):
    g_a, packed, params, gamma, inv_std = _bn_case((3, 7), 4, 2)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        custom_op.decode_bn_backward(g_a, packed[:-1], params, gamma, inv_std, 4)  # bytes
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        custom_op.decode_bn_backward(g_a, packed, params, gamma[:6], inv_std, 4)  # channels
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 8)  # 4-bit codes
    with pytest.raises(ValueError):
        custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 2)


def test_decode_bn_backward_empty(op_lib):
    _, _, params, gamma, inv_std = _bn_case((1, 3), 4, 0)
    g_a = tf.zeros([0, 3])
    packed = tf.zeros([0], tf.uint8)
    g_x, d_gamma, d_beta = custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)
    assert g_x.shape == (0, 3)
    np.testing.assert_array_equal(d_gamma.numpy(), np.zeros(3, np.float32))
    np.testing.assert_array_equal(d_beta.numpy(), np.zeros(3, np.float32))


def test_decode_bn_backward_disabled_is_pure_tf(monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    g_a, packed, params, gamma, inv_std = _bn_case((3, 5, 5, 37), 4, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)

        @tf.function
        def f(g_a, packed):
            return custom_op.decode_bn_backward(g_a, packed, params, gamma, inv_std, 4)

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
    assert build_ops.source_dir().joinpath("blpa_kernels.h").is_file()


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    x, mean, inv_std, gamma, beta, params = _make_case((5, 3), 4, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert custom_op.load() is None and not custom_op.is_available()
        a, packed = custom_op.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
        xhat, mask = custom_op.decode(packed, params, x.shape, 4)
    assert not [w for w in caught if "keras_blpa" in str(w.message)]
    a_ref, packed_ref = quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, 4)
    np.testing.assert_array_equal(packed.numpy(), packed_ref.numpy())
    _assert_same_float(a, a_ref)


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings
    import numpy as np
    import tensorflow as tf
    from keras_blpa import custom_op, quantizer

    x = tf.random.stateless_normal([4, 5], seed=[1, 2])
    c = tf.ones([5])
    params = quantizer.quantizer_params(c, -0.5 * c, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            a, packed = custom_op.bn_relu_encode(x, 0 * c, c, c, -0.5 * c, params, 4)
            xhat, mask = custom_op.decode(packed, params, x.shape, 4)
            grads = custom_op.decode_bn_backward(x, packed, params, c, c, 4)
        assert not custom_op.is_available()
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


def test_garbage_library_warns_once(tmp_path):
    lib = tmp_path / "garbage.so"
    lib.write_bytes(b"this is not an ELF file\n" * 10)
    out = _run_fallback(lib)
    assert "WARNINGS 1" in out, out
    assert "RuntimeWarning" in out and "garbage.so" in out, out


def test_abi_broken_library_warns_once(tmp_path):
    """A library with an unresolved symbol, as a mismatched TF ABI gives."""
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "broken.cc"
    src.write_text("extern void blpa_missing_symbol();\nvoid f() { blpa_missing_symbol(); }\n")
    lib = tmp_path / "broken.so"
    subprocess.run([gxx, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    out = _run_fallback(lib)
    assert "WARNINGS 1" in out, out
    assert "undefined symbol" in out, out


def test_missing_library_warns_once(tmp_path):
    out = _run_fallback(tmp_path / "does_not_exist.so")
    assert "WARNINGS 1" in out and "does_not_exist.so" in out, out


def test_failed_build_warns_once(tmp_path):
    """A compiler that fails: one warning naming the failed command, then pure TF."""
    out = _run_fallback(
        None,
        KERAS_BLPA_CACHE_DIR=str(tmp_path / "cache"),
        KERAS_BLPA_BUILD_CUDA="0",
        CXX=shutil.which("false") or "/bin/false",
    )
    assert "WARNINGS 1" in out and "command failed" in out, out
