"""Loader and wrappers for the compiled BLPA op, with the pure-TF quantizer as fallback.

The library (sources in `custom_ops/`) is built on first use by
`keras_blpa.build_ops` and loaded once. The wrappers here have exactly the
signatures and results of the same-named functions in `keras_blpa.backend.tensorflow.quantizer`
(bit for bit, except `decode_bn_backward`, whose per-channel sums are
accumulated in double and so agree with TF's float reductions only to float
rounding), and use that pure-TF code whenever the op cannot be used:

- `KERAS_BLPA_DISABLE_CUSTOM_OPS=1` (checked on every call): always pure TF,
  silently;
- the library is missing, fails to build or to load (ABI mismatch): one
  `RuntimeWarning` naming the cause, then pure TF for the rest of the process;
- inside an XLA-compiled function (`jit_compile=True`, TPU): the op has no XLA
  kernel, and the pure-TF code compiles.

The wrappers that produce an activation or a backward take `negative_slope`
(leaky ReLU, default 0: the ReLU), passed to the op as an attr and to the
pure-TF twin alike; it must be a finite number >= 0.

`KERAS_BLPA_OP_LIBRARY=/path/to/lib.so` loads that file instead of building.
The ops have no registered gradient: they are meant for the forward and
backward passes of a `tf.custom_gradient` unit.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import tensorflow as tf

from keras_blpa import build_ops
from keras_blpa.backend.tensorflow import quantizer, xla
from keras_blpa.backend.tensorflow.quantizer import CapParams, QuantParams

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_error: str | None = None
_REQUIRED_OPS = (
    "blpa_bn_relu_encode",
    "blpa_decode",
    "blpa_decode_relu",
    "blpa_decode_bn_backward",
    "blpa_bn_relu_exact",
    "blpa_relu_exact",
    "blpa_bn_backward_exact",
)
# The ops with the leaky ReLU's `negative_slope` attr (all but the plain decode).
_SLOPE_OPS = tuple(name for name in _REQUIRED_OPS if name != "blpa_decode")
# The ops with a capped ReLU's `max_value` attr.
_CAP_OPS = ("blpa_bn_relu_encode", "blpa_decode_relu")


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
    stale = [
        name
        for name in _SLOPE_OPS
        if "negative_slope" not in inspect.signature(getattr(module, name)).parameters
    ]
    if stale:
        # Built from sources older than the leaky ReLU (KERAS_BLPA_OP_LIBRARY).
        raise RuntimeError(
            f"{path} is stale: {', '.join(stale)} lack the `negative_slope` attr"
        )
    stale = [
        name
        for name in _CAP_OPS
        if "max_value" not in inspect.signature(getattr(module, name)).parameters
    ]
    if stale:
        raise RuntimeError(f"{path} is stale: {', '.join(stale)} lack the `max_value` attr")
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


def _check_channels(channels, **per_channel) -> None:
    """Static check that every per-channel tensor is `[channels]`.

    Both implementations need it: the op would fail with a positional index,
    pure TF would broadcast silently or fail deep inside.
    """
    if channels is None:
        return
    for name, tensor in per_channel.items():
        shape = tf.TensorShape(getattr(tensor, "shape", None))
        if shape.rank is not None and shape.as_list() not in ([channels], [None]):
            raise ValueError(
                f"`{name}` must have shape [{channels}] (one value per channel of "
                f"the last axis); received shape {shape.as_list()}."
            )


def _check_input(x: tf.Tensor) -> None:
    if x.shape.rank == 0:
        raise ValueError(
            "`x` must have rank >= 1 with channels on the last axis; received a scalar."
        )


def _check_packed(packed: tf.Tensor, shape, bits: int) -> None:
    """uint8, and (when both are static) as many bytes as `shape` needs."""
    if tf.as_dtype(packed.dtype) != tf.uint8:
        raise ValueError(
            "`packed` must be the uint8 codes returned by `bn_relu_encode` or "
            f"`encode`; received dtype {tf.as_dtype(packed.dtype).name}."
        )
    dims = tf.get_static_value(shape) if isinstance(shape, tf.Tensor) else shape
    if dims is None or packed.shape.rank != 1 or packed.shape[0] is None:
        return
    dims = tf.TensorShape([int(d) for d in dims] if isinstance(dims, np.ndarray) else dims)
    if dims.is_fully_defined():
        expected = -(-dims.num_elements() * bits // 8)
        if packed.shape[0] != expected:
            raise ValueError(
                f"`packed` holds {packed.shape[0]} bytes, but {bits}-bit codes of "
                f"shape {dims.as_list()} take {expected}: check `shape` and `bits` "
                "against the encode call."
            )


def _static_channels(shape) -> int | None:
    if isinstance(shape, tf.Tensor):
        value = tf.get_static_value(shape)
        return None if value is None or len(value) == 0 else int(value[-1])
    dims = tf.TensorShape(shape)
    return None if dims.rank in (None, 0) else dims[-1]


def _slope(negative_slope) -> float:
    """The leaky ReLU slope as the op sees it (a float32 attr), validated.

    Rounded to float32 here for both paths, so that a slope that rounds to 0
    is the exact ReLU on both (the pure-TF twin tests the Python float).
    """
    try:
        with np.errstate(over="ignore"):  # a finite double past float32: Inf, refused
            value = float(np.float32(negative_slope))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`negative_slope` must be a Python number, got {negative_slope!r}"
        ) from err
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(
            f"`negative_slope` must be a finite number >= 0 (in float32); received "
            f"{negative_slope!r}."
        )
    return 0.0 if value == 0.0 else value


def _params_tensors(params: QuantParams) -> dict:
    return {"params.lo": params.lo, "params.k": params.k, "params.flip": params.flip}


def _cap_tensors(cap: CapParams | None) -> dict:
    return {} if cap is None else {"cap.kc": cap.kc, "cap.flip": cap.flip}


def _cap_inputs(cap: CapParams | None, aligned: bool) -> list[tf.Tensor]:
    """The op's cap inputs: `[kc, flip(, aligned)]`, `[0]`-sized for no cap."""
    if cap is None:
        empty = tf.zeros([0], tf.float32)
        return [empty] * (3 if aligned else 2)
    tensors = [cap.kc, cap.flip] + ([cap.aligned] if aligned else [])
    return [_f32(t) for t in tensors]


def _cap_attr(cap: CapParams | None, negative_slope: float) -> float:
    """The op's `max_value` attr (0: no cap); a cap refuses a leaky slope."""
    if cap is None:
        return 0.0
    if negative_slope != 0.0:
        raise ValueError(
            "`max_value` (a capped ReLU) cannot be combined with a nonzero "
            f"`negative_slope` ({negative_slope!r}); use one or the other."
        )
    return float(cap.max_value)


def bn_relu_encode(
    x: tf.Tensor,
    mean: tf.Tensor,
    inv_std: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    params: QuantParams,
    bits: int,
    negative_slope: float = 0.0,
    cap: CapParams | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same as `quantizer.bn_relu_encode`: `(a, packed)`, one fused pass.

    With a `cap` (`quantizer.cap_params`): `quantizer.bn_relu_encode_capped`.
    """
    quantizer.check_bits(bits, allow_none=False)
    negative_slope = _slope(negative_slope)
    max_value = _cap_attr(cap, negative_slope)
    # Both paths take any float dtype and compute in float32, as the op does.
    x, mean, inv_std, gamma, beta = (_f32(t) for t in (x, mean, inv_std, gamma, beta))
    _check_input(x)
    _check_channels(
        x.shape[-1], mean=mean, inv_std=inv_std, gamma=gamma, beta=beta,
        **_params_tensors(params), **_cap_tensors(cap),
    )
    mod = _op()
    if mod is None and cap is not None:
        return quantizer.bn_relu_encode_capped(
            x, mean, inv_std, gamma, beta, params, cap, bits
        )
    if mod is None:
        return quantizer.bn_relu_encode(
            x, mean, inv_std, gamma, beta, params, bits, negative_slope
        )
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
        *_cap_inputs(cap, aligned=True),
        bits=bits,
        window=params.window,
        negative_slope=negative_slope,
        max_value=max_value,
    )


def decode(
    packed: tf.Tensor,
    params: QuantParams,
    shape: tf.TensorShape | list | tf.Tensor,
    bits: int,
    cap: CapParams | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same as `quantizer.decode`: `(xhat, mask)` of `shape` (channels last).

    With a `cap`, the mask is the capped ReLU's `0 < y < max_value`
    (`quantizer.decode_capped`'s first two results).
    """
    quantizer.check_bits(bits, allow_none=False)
    _check_packed(packed, shape, bits)
    _check_channels(
        _static_channels(shape), **_params_tensors(params), **_cap_tensors(cap)
    )
    mod = _op()
    if mod is None and cap is not None:
        return quantizer.decode_capped(packed, params, cap, shape, bits)[:2]
    if mod is None:
        return quantizer.decode(packed, params, shape, bits)
    return mod.blpa_decode(
        packed,
        _f32(params.lo),
        _f32(params.k),
        _f32(params.flip),
        _shape_tensor(shape),
        *_cap_inputs(cap, aligned=False),
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
    negative_slope: float = 0.0,
    cap: CapParams | None = None,
) -> tf.Tensor:
    """Rebuilt (leaky) ReLU output `where(mask, y, negative_slope * y)`,
    `y = xhat * gamma + beta`, in one pass (`quantizer.relu_from_decoded`);
    with a `cap`, `quantizer.relu_from_decoded_capped`."""
    quantizer.check_bits(bits, allow_none=False)
    negative_slope = _slope(negative_slope)
    max_value = _cap_attr(cap, negative_slope)
    _check_packed(packed, shape, bits)
    _check_channels(
        _static_channels(shape), gamma=gamma, beta=beta, **_params_tensors(params),
        **_cap_tensors(cap),
    )
    gamma, beta = _f32(gamma), _f32(beta)
    mod = _op()
    if mod is None and cap is not None:
        return quantizer.relu_from_decoded_capped(
            *quantizer.decode_capped(packed, params, cap, shape, bits), gamma, beta,
            cap.max_value,
        )
    if mod is None:
        xhat, mask = quantizer.decode(packed, params, shape, bits)
        return quantizer.relu_from_decoded(xhat, mask, gamma, beta, negative_slope)
    return mod.blpa_decode_relu(
        packed,
        _f32(params.lo),
        _f32(params.k),
        _f32(params.flip),
        _f32(gamma),
        _f32(beta),
        _shape_tensor(shape),
        *_cap_inputs(cap, aligned=False),
        bits=bits,
        window=params.window,
        negative_slope=negative_slope,
        max_value=max_value,
    )


def decode_bn_backward(
    g_a: tf.Tensor,
    packed: tf.Tensor,
    params: QuantParams,
    gamma: tf.Tensor,
    inv_std: tf.Tensor,
    bits: int,
    negative_slope: float = 0.0,
    cap: CapParams | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same as `quantizer.decode_bn_backward`: `(g_x, d_gamma, d_beta)`, fused.

    Decodes the codes on the fly in both of its passes (per-channel sums, then
    the input gradient), so neither `xhat`, the mask nor the masked gradient
    is materialized. The sums are accumulated in double: results agree with
    the pure-TF function to float rounding, not bit for bit. With a `cap`,
    the gradient mask is the capped ReLU's `0 < y < max_value`.
    """
    quantizer.check_bits(bits, allow_none=False)
    negative_slope = _slope(negative_slope)
    _cap_attr(cap, negative_slope)
    g_a, gamma, inv_std = _f32(g_a), _f32(gamma), _f32(inv_std)
    _check_packed(packed, g_a.shape, bits)
    _check_input(g_a)
    _check_channels(
        g_a.shape[-1], gamma=gamma, inv_std=inv_std, **_params_tensors(params),
        **_cap_tensors(cap),
    )
    mod = _op()
    if mod is None and cap is not None:
        xhat, mask, _ = quantizer.decode_capped(packed, params, cap, tf.shape(g_a), bits)
        return quantizer.relu_bn_backward(g_a, xhat, mask, gamma, inv_std)
    if mod is None:
        return quantizer.decode_bn_backward(
            g_a, packed, params, gamma, inv_std, bits, negative_slope
        )
    g_x, d_gamma, d_beta = mod.blpa_decode_bn_backward(
        _f32(g_a),
        packed,
        _f32(params.lo),
        _f32(params.k),
        _f32(params.flip),
        _f32(gamma),
        _f32(inv_std),
        *_cap_inputs(cap, aligned=False),
        bits=bits,
        window=params.window,
        negative_slope=negative_slope,
    )
    return g_x, d_gamma, d_beta


def bn_relu_exact(
    x: tf.Tensor,
    mean: tf.Tensor,
    inv_std: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same as `quantizer.bn_relu_exact`: `(a, xhat)` in one pass (bits=None).

    The op writes `xhat` into `x`'s buffer when nothing else holds `x`.
    """
    negative_slope = _slope(negative_slope)
    x, mean, inv_std, gamma, beta = (_f32(t) for t in (x, mean, inv_std, gamma, beta))
    _check_input(x)
    _check_channels(x.shape[-1], mean=mean, inv_std=inv_std, gamma=gamma, beta=beta)
    mod = _op()
    if mod is None:
        return quantizer.bn_relu_exact(x, mean, inv_std, gamma, beta, negative_slope)
    return mod.blpa_bn_relu_exact(
        x, mean, inv_std, gamma, beta, negative_slope=negative_slope
    )


def relu_exact(
    xhat: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, negative_slope: float = 0.0
) -> tf.Tensor:
    """Same as `quantizer.relu_exact`, in one pass."""
    negative_slope = _slope(negative_slope)
    xhat, gamma, beta = _f32(xhat), _f32(gamma), _f32(beta)
    _check_input(xhat)
    _check_channels(xhat.shape[-1], gamma=gamma, beta=beta)
    mod = _op()
    if mod is None:
        return quantizer.relu_exact(xhat, gamma, beta, negative_slope)
    return mod.blpa_relu_exact(xhat, gamma, beta, negative_slope=negative_slope)


def bn_backward_exact(
    g_a: tf.Tensor,
    xhat: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    inv_std: tf.Tensor,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same as `quantizer.bn_backward_exact`: `(g_x, d_gamma, d_beta)`, fused.

    Two passes (per-channel sums in double, then the input gradient, written
    into `g_a`'s buffer when nothing else holds it); neither the mask nor the
    masked gradient is materialized. Agrees with the pure-TF function to
    float rounding, not bit for bit (the sums' order differs).
    """
    negative_slope = _slope(negative_slope)
    g_a, xhat, gamma, beta, inv_std = (_f32(t) for t in (g_a, xhat, gamma, beta, inv_std))
    _check_input(g_a)
    if g_a.shape.rank is not None and not g_a.shape.is_compatible_with(xhat.shape):
        raise ValueError(
            f"`xhat` must have the shape of `g_a`, {g_a.shape.as_list()}; received "
            f"{xhat.shape.as_list()}."
        )
    _check_channels(g_a.shape[-1], gamma=gamma, beta=beta, inv_std=inv_std)
    mod = _op()
    if mod is None:
        return quantizer.bn_backward_exact(g_a, xhat, gamma, beta, inv_std, negative_slope)
    return mod.blpa_bn_backward_exact(
        g_a, xhat, gamma, beta, inv_std, negative_slope=negative_slope
    )
