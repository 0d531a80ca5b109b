"""Public quantizer ops: sign-preserving 4/8-bit codes for BN-normalized activations.

TensorFlow code: `bn_relu_encode`, `decode` and `decode_relu` run the compiled
custom op when it is available (eager and `tf.function` without XLA) and the
bit-identical pure-TensorFlow code otherwise (`jit_compile=True`, TPU,
`KERAS_BLPA_DISABLE_CUSTOM_OPS=1`, or no compiled library); `implementation()`
tells which one is active. The grid and its guarantees are documented in
`keras_blpa.backend.tensorflow.quantizer`.

The names load on first use, so that this module imports without TensorFlow;
on Keras's JAX backend without TensorFlow, using one raises an ImportError
that names the jnp twin, `keras_blpa.backend.jax.quantizer`.
"""

from __future__ import annotations

import importlib

_SOURCES = {
    "bn_relu_encode": "kernels",
    "decode": "kernels",
    "decode_relu": "kernels",
    "DEFAULT_WINDOW": "quantizer",
    "QuantParams": "quantizer",
    "bin_width": "quantizer",
    "encode": "quantizer",
    "quantizer_params": "quantizer",
    "resolve_window": "quantizer",
}

__all__ = sorted([*_SOURCES, "implementation"])


def _tensorflow_module(role: str):
    try:
        return importlib.import_module(f"keras_blpa.backend.tensorflow.{role}")
    except ImportError as err:
        raise ImportError(
            f"keras_blpa.ops is the TensorFlow quantizer and needs TensorFlow ({err}). "
            "On Keras's JAX backend the same quantizer, bit for bit, is "
            "keras_blpa.backend.jax.quantizer."
        ) from err


def implementation() -> str:
    """"custom_op" when the compiled op is loaded and enabled, else "pure_tf".

    Inside an XLA-compiled function the pure-TF code is used either way.
    """
    return "custom_op" if _tensorflow_module("kernels").is_available() else "pure_tf"


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(_tensorflow_module(_SOURCES[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'keras_blpa.ops' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
