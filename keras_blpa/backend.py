"""The seam between the layers and a Keras backend.

The layers (`keras_blpa.layers`), builders and conversion are written once
against Keras; what a unit computes, and how it keeps only codes for the
backward pass, is backend code behind three names:

- `unit()`: the module with `bn_relu_linear` (training, custom gradient) and
  `bn_relu_linear_inference`: `keras_blpa.unit` on TensorFlow
  (`tf.custom_gradient`, the compiled op or pure TF),
  `keras_blpa.jax_backend.unit` on JAX (`jax.custom_vjp`, jnp).
- `linear()`: the module with the `Conv2DMap` and `DenseMap` linear maps.
- `check(what)`: a clear error on a backend with no implementation.

Modules are imported on first use, so that on JAX nothing imports TensorFlow.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import keras

SUPPORTED = ("tensorflow", "jax")
_UNIT = {"tensorflow": "keras_blpa.unit", "jax": "keras_blpa.jax_backend.unit"}
_LINEAR = {"tensorflow": "keras_blpa.linear", "jax": "keras_blpa.jax_backend.linear"}


def name() -> str:
    """Keras's backend: "tensorflow", "jax", ..."""
    return keras.backend.backend()


def check(what: str) -> str:
    """The backend's name; a RuntimeError naming KERAS_BACKEND unless supported."""
    backend = name()
    if backend not in SUPPORTED:
        raise RuntimeError(
            f"{what} needs Keras's TensorFlow or JAX backend, but Keras runs on "
            f"{backend!r}. Set the environment variable KERAS_BACKEND=tensorflow "
            "or KERAS_BACKEND=jax before Keras is first imported (the PyTorch "
            "backend is not supported yet)."
        )
    return backend


def unit() -> ModuleType:
    """The unit module of the current backend."""
    return importlib.import_module(_UNIT[check("keras_blpa's fused units")])


def linear() -> ModuleType:
    """The linear-map module of the current backend."""
    return importlib.import_module(_LINEAR[check("keras_blpa's fused units")])
