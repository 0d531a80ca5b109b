"""The BLPA kernels as XLA custom calls (`jax.ffi`), with jnp as the fallback.

The handlers (`custom_ops/jax_ffi/jax_ffi.cc`) run the TensorFlow op's own CPU loops
and CUDA kernels, so their codes are the op's, bit for bit. The library is
built on first use (`keras_blpa.build_ops.jax_library`) and loaded once; each
handler is registered for "cpu" and, when the library has CUDA kernels, for
"CUDA" under one target name. The unit (`keras_blpa.backend.jax.unit`) uses
them where `usable` says so, and the jnp quantizer everywhere else (TPU,
ROCm) and whenever the library is unavailable:

- where: on CPU by default; `KERAS_BLPA_JAX_CUSTOM_CALLS=1` also on CUDA
  (whose handlers compile but have not yet run on a GPU), `=0` nowhere;
- `KERAS_BLPA_DISABLE_CUSTOM_OPS=1` (read on every call): jnp, silently;
- the library is missing, fails to build or to load: one `RuntimeWarning`
  naming the cause, then jnp for the rest of the process.

`KERAS_BLPA_JAX_LIBRARY=/path/to/libblpa_jax.so` loads that file instead of
building. Layout: the codes of an activation `[N, ..., C]` are `uint8[N, B]`,
`B` bytes per sample; flattened, they are the TensorFlow op's bytes.

A capped ReLU (`max_value`, ReLU6) runs the same handlers, as the TensorFlow
op does: the coded calls also take the cap edge's per-channel `kc`, `flip`
(and, to encode, `aligned`) of `quantizer.cap_params` with the attribute
`max_value`, or empty operands and `max_value=0` without a cap; the exact
calls take `max_value` alone.

Under `keras.distribution.DataParallel` with several devices, every call is
mapped over the batch shards with `jax.shard_map`: each device runs the
handler on its own rows, and only the per-channel BN sums are added over
devices (what stock BN's batch statistics need). Nothing is gathered.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.grid import CapParams, QuantParams, resolve_window

# target name -> handler symbol stem (the library exports <stem>Cpu, <stem>Gpu)
TARGETS = {
    "blpa_encode": "BlpaEncode",
    "blpa_decode_relu": "BlpaDecodeRelu",
    "blpa_bn_sums": "BlpaBnSums",
    "blpa_bn_input_grad": "BlpaBnInputGrad",
    "blpa_exact_forward": "BlpaExactForward",
    "blpa_exact_relu": "BlpaExactRelu",
    "blpa_exact_sums": "BlpaExactSums",
    "blpa_exact_input_grad": "BlpaExactInputGrad",
}

_lock = threading.Lock()
_tried = False
_platforms: frozenset[str] = frozenset()
_error: str | None = None


def disabled() -> bool:
    """True when `KERAS_BLPA_DISABLE_CUSTOM_OPS` asks for the jnp path."""
    value = os.environ.get("KERAS_BLPA_DISABLE_CUSTOM_OPS", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _library_path() -> Path:
    override = os.environ.get("KERAS_BLPA_JAX_LIBRARY")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"KERAS_BLPA_JAX_LIBRARY={override} does not exist")
        return path
    from keras_blpa.build_ops.jax_library import build_jax

    return build_jax(verbose=False)


def _register() -> frozenset[str]:
    library = ctypes.CDLL(str(_library_path()))
    missing = [stem + "Cpu" for stem in TARGETS.values() if not hasattr(library, stem + "Cpu")]
    if missing:
        raise RuntimeError(f"the library does not export {', '.join(missing)}")
    cuda = all(hasattr(library, stem + "Gpu") for stem in TARGETS.values())
    for target, stem in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, stem + "Cpu")),
                                    platform="cpu")
        if cuda:
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(library, stem + "Gpu")), platform="CUDA"
            )
    return frozenset({"cpu", "cuda"} if cuda else {"cpu"})


def load() -> frozenset[str]:
    """The platforms the custom calls are registered for (empty when disabled
    or unavailable; warns once)."""
    global _tried, _platforms, _error
    if disabled():
        return frozenset()
    if _tried:
        return _platforms
    with _lock:
        if not _tried:
            try:
                _platforms = _register()
            except Exception as err:  # noqa: BLE001 - any failure means fallback
                text = f"{type(err).__name__}: {err}".strip()
                _error = text if len(text) <= 600 else text[:600] + " ..."
                warnings.warn(
                    f"keras_blpa: BLPA custom calls for JAX unavailable ({_error}); using "
                    "the jnp quantizer instead (same codes, more memory on CPU). Set "
                    "KERAS_BLPA_DISABLE_CUSTOM_OPS=1 to skip them.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _platforms


def load_error() -> str | None:
    """Why the library could not be loaded (None if it loaded or was not tried)."""
    return _error


def platform() -> str:
    """The platform the unit is traced for: the devices of the active Keras
    distribution, else JAX's default backend ("cpu", "gpu", "tpu")."""
    found = _batch_mesh()
    if found is not None:
        return found[0].devices.flat[0].platform
    return jax.default_backend()


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Where the custom calls run unless told otherwise: platforms they have been
# run and checked on (bit-exact with the jnp path, compiled-program checks).
# The CUDA handlers compile but have not run on a GPU yet.
_DEFAULT_PLATFORMS = ("cpu",)


def enabled(here: str | None = None) -> bool:
    """Whether the units use the custom calls on platform `here` (default:
    `platform()`). `KERAS_BLPA_JAX_CUSTOM_CALLS=1` turns them on wherever the
    library registered (CPU and CUDA), `=0` off; unset, they run on CPU only."""
    value = os.environ.get("KERAS_BLPA_JAX_CUSTOM_CALLS", "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value not in ("", "auto"):
        raise ValueError(
            f"KERAS_BLPA_JAX_CUSTOM_CALLS={value!r}: use 1 (custom calls wherever the "
            "library registered), 0 (the jnp quantizer) or auto (unset: CPU only)."
        )
    return (here or platform()) in _DEFAULT_PLATFORMS


def usable(shape, bits: int | None) -> bool:
    """True when this unit's kernels run as custom calls: `enabled` for the
    platform, the library is registered for it, the activation has a batch
    axis and at 4 bits an even number of elements per sample (whole bytes
    per sample)."""
    here = platform()
    if not enabled(here):
        return False
    registered = load()
    if not registered:
        return False
    if ("cuda" if here == "gpu" else here) not in registered:
        return False
    if len(shape) < 2 or 0 in shape:
        return False
    per_sample = int(np.prod(shape[1:]))
    return bits in (None, 8) or per_sample % 2 == 0


# ---- batch sharding ----------------------------------------------------------


def _batch_mesh():
    """The jax Mesh of an active Keras data-parallel distribution over more
    than one device, else None."""
    try:
        import keras

        dist = keras.distribution.distribution()
    except Exception:  # noqa: BLE001 - no distribution API: single device
        return None
    if dist is None or getattr(dist, "batch_dim_name", None) is None:
        return None
    device_mesh = dist.device_mesh
    if int(np.prod(device_mesh.shape)) <= 1:
        return None
    devices = np.array([_jax_device(d) for d in np.ravel(device_mesh.devices)])
    return jax.sharding.Mesh(
        devices.reshape(device_mesh.shape), tuple(device_mesh.axis_names)
    ), dist.batch_dim_name


def batch_sharded() -> bool:
    """True under a Keras data-parallel distribution over several devices
    (the calls then run per batch shard)."""
    return _batch_mesh() is not None


def _jax_device(device):
    if isinstance(device, str):  # Keras spells devices "cpu:0", "gpu:1"
        kind, _, index = device.partition(":")
        return jax.devices(kind)[int(index or 0)]
    return device


def _mapped(fn, batch_args: tuple, shared_args: tuple, batch_results: int, sums: bool = False):
    """`fn(*batch_args, *shared_args)`, run per batch shard when a data-parallel
    distribution is active. `batch_args` and the first `batch_results`
    results are split along axis 0; `shared_args` (per-channel) are
    replicated. With `sums`, the one result is per-shard BN sums `[1, 2, C]`,
    stacked over shards and added here (the all-reduce)."""
    found = _batch_mesh()
    if found is None:
        out = fn(*batch_args, *shared_args)
        return out.sum(axis=0) if sums else out
    mesh, axis = found
    spec = jax.sharding.PartitionSpec(axis)
    replicated = jax.sharding.PartitionSpec()
    in_specs = (spec,) * len(batch_args) + (replicated,) * len(shared_args)
    out_specs = spec if batch_results == 1 else (spec,) * batch_results
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # jax < 0.7 kept it in experimental
        from jax.experimental.shard_map import shard_map
    mapped = shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    out = mapped(*batch_args, *shared_args)
    return out.sum(axis=0) if sums else out


# ---- the custom calls ----------------------------------------------------------


def _grid_attrs(bits: int, window: float | None, slope: float,
                cap: CapParams | None = None) -> dict:
    # Attributes must be numpy scalars of the handler's exact C types.
    return {
        "bits": np.int32(bits),
        "window": np.float32(resolve_window(bits, window)),
        **_exact_attrs(slope, None if cap is None else cap.max_value),
    }


def _exact_attrs(slope: float, max_value: float | None) -> dict:
    return {"negative_slope": np.float32(slope),
            "max_value": np.float32(0.0 if max_value is None else max_value)}


_NO_CAP = np.zeros((0,), np.float32)


def _cap_vectors(cap: CapParams | None, encode: bool = False) -> tuple:
    """The cap edge's per-channel operands, empty ones without a cap (the
    handlers read `max_value > 0` as the cap)."""
    if cap is None:
        return (_NO_CAP,) * (3 if encode else 2)
    vectors = (cap.kc, cap.flip, cap.aligned) if encode else (cap.kc, cap.flip)
    return tuple(jnp.asarray(v, jnp.float32) for v in vectors)


def _codes_shape(shape, bits: int) -> tuple[int, int]:
    per_sample = int(np.prod(shape[1:]))
    return (shape[0], per_sample if bits == 8 else per_sample // 2)


def _f32(shape):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def encode(x, mean, inv_std, gamma, beta, params: QuantParams, bits: int,
           window: float | None, slope: float, cap: CapParams | None = None):
    """`(a, codes)`: the (leaky or capped) ReLU output and the packed codes of
    x (float32)."""
    attrs = _grid_attrs(bits, window, slope, cap)

    def run(x, *vectors):
        call = jax.ffi.ffi_call(
            "blpa_encode",
            (_f32(x.shape), jax.ShapeDtypeStruct(_codes_shape(x.shape, bits), jnp.uint8)),
        )
        return tuple(call(x, *vectors, **attrs))

    vectors = (mean, inv_std, gamma, beta, params.lo, params.k, params.flip, params.aligned,
               *_cap_vectors(cap, encode=True))
    return _mapped(run, (x,), vectors, 2)


def decode_relu(codes, params: QuantParams, gamma, beta, shape, bits: int,
                window: float | None, slope: float, gate, cap: CapParams | None = None):
    """The (leaky or capped) ReLU output rebuilt from the codes; runs only
    once `gate` (an array of the upstream gradient's batch) exists."""
    attrs = _grid_attrs(bits, window, slope, cap)

    def run(codes, gate, *vectors):
        local = (codes.shape[0], *shape[1:])
        call = jax.ffi.ffi_call("blpa_decode_relu", _f32(local))
        return call(codes, *vectors, _gate(gate), **attrs)

    vectors = (params.lo, params.k, params.flip, gamma, beta, *_cap_vectors(cap))
    return _mapped(run, (codes, gate), vectors, 1)


def _gate(gradient):
    """A scalar that exists only once `gradient` does (the decodes' operand)."""
    return jnp.sum(gradient.astype(jnp.float32)).reshape(())


def _coefficients(gamma, inv_std, d_beta, d_gamma, count: float):
    # blpa_kernels.h's MakeBnCoef, float32 in TF's order.
    return jnp.stack([gamma * inv_std, d_beta / count, d_gamma / count])


def decode_bn_backward(g_a, codes, params: QuantParams, gamma, inv_std, bits: int,
                       window: float | None, slope: float, cap: CapParams | None = None):
    """`(g_x, d_gamma, d_beta)`: the ReLU (capped: gradient only where
    `0 < y < max_value`) and BN backward from the codes."""
    attrs = _grid_attrs(bits, window, slope, cap)
    channels = g_a.shape[-1]

    def sums(g_a, codes, lo, k, flip, kc, cap_flip):
        call = jax.ffi.ffi_call("blpa_bn_sums", _f32((1, 2, channels)))
        return call(g_a, codes, lo, k, flip, kc, cap_flip, **attrs)

    def grad(g_a, codes, lo, k, flip, kc, cap_flip, coef):
        call = jax.ffi.ffi_call("blpa_bn_input_grad", _f32(g_a.shape))
        return call(g_a, codes, lo, k, flip, kc, cap_flip, coef, **attrs)

    vectors = (params.lo, params.k, params.flip, *_cap_vectors(cap))
    d_beta, d_gamma = _mapped(sums, (g_a, codes), vectors, 1, sums=True)
    coef = _coefficients(gamma, inv_std, d_beta, d_gamma, float(np.prod(g_a.shape[:-1])))
    g_x = _mapped(grad, (g_a, codes), (*vectors, coef), 1)
    return g_x, d_gamma, d_beta


def exact_forward(x, mean, inv_std, gamma, beta, slope: float, max_value: float | None = None):
    """`(a, xhat)` of the exact path (bits=None); `a` capped at `max_value`."""
    attrs = _exact_attrs(slope, max_value)

    def run(x, *vectors):
        call = jax.ffi.ffi_call("blpa_exact_forward", (_f32(x.shape), _f32(x.shape)))
        return tuple(call(x, *vectors, **attrs))

    return _mapped(run, (x,), (mean, inv_std, gamma, beta), 2)


def exact_relu(xhat, gamma, beta, slope: float, gate, max_value: float | None = None):
    """The (leaky or capped) ReLU output rebuilt from xhat, once `gate` exists."""
    attrs = _exact_attrs(slope, max_value)

    def run(xhat, gate, gamma, beta):
        call = jax.ffi.ffi_call("blpa_exact_relu", _f32(xhat.shape))
        return call(xhat, gamma, beta, _gate(gate), **attrs)

    return _mapped(run, (xhat, gate), (gamma, beta), 1)


def exact_bn_backward(g_a, xhat, gamma, beta, inv_std, slope: float,
                      max_value: float | None = None):
    """`(g_x, d_gamma, d_beta)` of the exact path (capped at `max_value`)."""
    attrs = _exact_attrs(slope, max_value)
    channels = g_a.shape[-1]

    def sums(g_a, xhat, gamma, beta):
        call = jax.ffi.ffi_call("blpa_exact_sums", _f32((1, 2, channels)))
        return call(g_a, xhat, gamma, beta, **attrs)

    def grad(g_a, xhat, gamma, beta, coef):
        call = jax.ffi.ffi_call("blpa_exact_input_grad", _f32(g_a.shape))
        return call(g_a, xhat, gamma, beta, coef, **attrs)

    d_beta, d_gamma = _mapped(sums, (g_a, xhat), (gamma, beta), 1, sums=True)
    coef = _coefficients(gamma, inv_std, d_beta, d_gamma, float(np.prod(g_a.shape[:-1])))
    g_x = _mapped(grad, (g_a, xhat), (gamma, beta, coef), 1)
    return g_x, d_gamma, d_beta
