"""Loader and wrappers for the compiled BLPA op, with the pure-TF quantizer as fallback.

The library (sources in `custom_ops/`) is built on first use by
`keras_blpa.build_ops` and loaded once. The wrappers here have exactly the
signatures and results of the same-named functions in `keras_blpa.quantizer`
(bit for bit, except `decode_bn_backward`, whose per-channel sums are
accumulated in double and so agree with TF's float reductions only to float
rounding), and use that pure-TF code whenever the op cannot be used:

- `KERAS_BLPA_DISABLE_CUSTOM_OPS=1` (checked on every call): always pure TF,
  silently;
- the library is missing, fails to build or to load (ABI mismatch): one
  `RuntimeWarning` naming the cause, then pure TF for the rest of the process;
- inside an XLA-compiled function (`jit_compile=True`, TPU): the op has no XLA
  kernel, and the pure-TF code compiles.

`KERAS_BLPA_OP_LIBRARY=/path/to/lib.so` loads that file instead of building.
The ops have no registered gradient: they are meant for the forward and
backward passes of a `tf.custom_gradient` unit.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import tensorflow as tf

from keras_blpa import build_ops, quantizer, xla
from keras_blpa.quantizer import QuantParams

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_error: str | None = None
_REQUIRED_OPS = (
    "blpa_bn_relu_encode",
    "blpa_decode",
    "blpa_decode_relu",
    "blpa_decode_bn_backward",
)


def disabled() -> bool:
    """True when `KERAS_BLPA_DISABLE_CUSTOM_OPS` asks for the pure-TF path."""
    value = os.environ.get("KERAS_BLPA_DISABLE_CUSTOM_OPS", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def _load_library() -> ModuleType:
    override = os.environ.get("KERAS_BLPA_OP_LIBRARY")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"KERAS_BLPA_OP_LIBRARY={override} does not exist")
    else:
        path = build_ops.build_or_raise()
    module = tf.load_op_library(str(path))
    missing = [name for name in _REQUIRED_OPS if not hasattr(module, name)]
    if missing:
        # A stale library, or these ops were already registered by another one.
        raise RuntimeError(f"{path} does not define {', '.join(missing)}")
    return module


def load() -> ModuleType | None:
    """The loaded op module, or None (disabled, or unavailable: warns once)."""
    global _tried, _module, _error
    if disabled():
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = _load_library()
            except Exception as err:  # noqa: BLE001 - any failure means fallback
                _error = _short(err)
                warnings.warn(
                    f"keras_blpa: compiled BLPA op unavailable ({_error}); using the "
                    "pure-TensorFlow quantizer instead (same results, slower). Set "
                    "KERAS_BLPA_DISABLE_CUSTOM_OPS=1 to skip the op.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _module


def is_available() -> bool:
    """True when the compiled op is loaded (and not disabled)."""
    return load() is not None


def load_error() -> str | None:
    """Why the library could not be loaded (None if it loaded or was not tried)."""
    return _error


def _op() -> ModuleType | None:
    # No XLA kernel for the op: under jit_compile the pure-TF code is the route.
    if xla.in_xla_context():
        return None
    return load()


def _f32(t: tf.Tensor) -> tf.Tensor:
    return tf.cast(t, tf.float32)


def _shape_tensor(shape: tf.TensorShape | list | tf.Tensor) -> tf.Tensor:
    if isinstance(shape, tf.TensorShape):
        if not shape.is_fully_defined():
            raise ValueError(f"decode needs a fully defined shape, got {shape}")
        shape = shape.as_list()
    shape = tf.convert_to_tensor(shape, dtype_hint=tf.int32)
    if shape.dtype not in (tf.int32, tf.int64):
        shape = tf.cast(shape, tf.int64)
    return shape


def bn_relu_encode(
    x: tf.Tensor,
    mean: tf.Tensor,
    inv_std: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    params: QuantParams,
    bits: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same as `quantizer.bn_relu_encode`: `(a, packed)`, one fused pass."""
    quantizer.check_bits(bits, allow_none=False)
    mod = _op()
    if mod is None:
        return quantizer.bn_relu_encode(x, mean, inv_std, gamma, beta, params, bits)
    return mod.blpa_bn_relu_encode(
        _f32(x),
        _f32(mean),
        _f32(inv_std),
        _f32(gamma),
        _f32(beta),
        _f32(params.lo),
        _f32(params.k),
        _f32(params.flip),
        _f32(params.aligned),
        bits=bits,
        window=params.window,
    )


def decode(
    packed: tf.Tensor,
    params: QuantParams,
    shape: tf.TensorShape | list | tf.Tensor,
    bits: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same as `quantizer.decode`: `(xhat, mask)` of `shape` (channels last)."""
    quantizer.check_bits(bits, allow_none=False)
    mod = _op()
    if mod is None:
        return quantizer.decode(packed, params, shape, bits)
    return mod.blpa_decode(
        packed,
        _f32(params.lo),
        _f32(params.k),
        _f32(params.flip),
        _shape_tensor(shape),
        bits=bits,
        window=params.window,
    )


def decode_relu(
    packed: tf.Tensor,
    params: QuantParams,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    shape: tf.TensorShape | list | tf.Tensor,
    bits: int,
) -> tf.Tensor:
    """Rebuilt ReLU output `where(mask, xhat * gamma + beta, 0)` in one pass."""
    quantizer.check_bits(bits, allow_none=False)
    mod = _op()
    if mod is None:
        xhat, mask = quantizer.decode(packed, params, shape, bits)
        return tf.where(mask, xhat * _f32(gamma) + _f32(beta), 0.0)
    return mod.blpa_decode_relu(
        packed,
        _f32(params.lo),
        _f32(params.k),
        _f32(params.flip),
        _f32(gamma),
        _f32(beta),
        _shape_tensor(shape),
        bits=bits,
        window=params.window,
    )


def decode_bn_backward(
    g_a: tf.Tensor,
    packed: tf.Tensor,
    params: QuantParams,
    gamma: tf.Tensor,
    inv_std: tf.Tensor,
    bits: int,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same as `quantizer.decode_bn_backward`: `(g_x, d_gamma, d_beta)`, fused.

    Decodes the codes on the fly in both of its passes (per-channel sums, then
    the input gradient), so neither `xhat`, the mask nor the masked gradient
    is materialized. The sums are accumulated in double: results agree with
    the pure-TF function to float rounding, not bit for bit.
    """
    quantizer.check_bits(bits, allow_none=False)
    mod = _op()
    if mod is None:
        return quantizer.decode_bn_backward(g_a, packed, params, gamma, inv_std, bits)
    g_x, d_gamma, d_beta = mod.blpa_decode_bn_backward(
        _f32(g_a),
        packed,
        _f32(params.lo),
        _f32(params.k),
        _f32(params.flip),
        _f32(gamma),
        _f32(inv_std),
        bits=bits,
        window=params.window,
    )
    return g_x, d_gamma, d_beta
