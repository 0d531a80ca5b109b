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


def _make_case(shape, bits, seed, specials=False):
    """x, mean, inv_std, gamma, beta, params with every kind of channel."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (2.5 * rng.normal(size=shape)).astype(np.float32)
    mean = (0.3 * rng.normal(size=c)).astype(np.float32)
    inv_std = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    gamma = rng.normal(size=c).astype(np.float32)
    beta = rng.normal(size=c).astype(np.float32)
    kind = np.arange(c) % 8
    gamma[kind == 1] = -np.abs(gamma[kind == 1])  # mask flips
    gamma[kind == 2] = 0.0  # constant channel, on iff beta > 0
    beta[kind == 3] = 50.0 * np.abs(gamma[kind == 3]) + 1.0  # threshold far below: always on
    beta[kind == 4] = -50.0 * np.abs(gamma[kind == 4]) - 1.0  # far above: always off
    gamma[kind == 5], beta[kind == 5] = 0.0, 0.0  # y == 0 exactly: off
    beta[kind == 6] = 2.9 * np.abs(gamma[kind == 6])  # threshold at the window edge
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
    params = quantizer.quantizer_params(tensors[3], tensors[4], bits)
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
        assert not custom_op.is_available()
    ours = [w for w in caught if "keras_blpa" in str(w.message)]
    ref = quantizer.bn_relu_encode(x, 0 * c, c, c, -0.5 * c, params, 4)[1]
    assert np.array_equal(packed.numpy(), ref.numpy())
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
