"""The seam between the front-ends and a Keras backend.

The layers (`keras_blpa.layers`), builders and conversion are written once
against Keras. What a unit computes, and how it keeps only codes for the
backward pass, is backend code: one package per backend, with the same
module name for the same role in each (as `keras/src/backend/` does):

| module      | role                                        | tensorflow | jax |
|-------------|---------------------------------------------|------------|-----|
| `unit`      | BN -> ReLU -> linear, custom gradient       | yes        | yes |
| `relu_unit` | ReLU -> linear (no BN), custom gradient     | yes        | -   |
| `bn_unit`   | BN whose backward reads a code of its input | yes        | -   |
| `pooling`   | padded max pooling that re-pads in backward | yes        | -   |
| `quantizer` | the sign-preserving grid, pure code         | yes        | yes |
| `kernels`   | loader of the compiled library, fallbacks   | TF op      | XLA custom calls |
| `linear`    | Conv2D / Dense maps and their gradients     | yes        | yes |
| `xla`       | XLA structure helpers (barriers, ordering)  | yes        | yes |
| `autodiff`  | custom gradients of the transformer units   | yes        | yes |
| `row_kernels` | compiled codes of those units (graph mode) | yes      | -   |

`module(role)` imports the current backend's module on first use, so that on
JAX nothing imports TensorFlow (`tests/test_layout.py` checks that).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import keras

SUPPORTED = ("tensorflow", "jax")
ROLES = {
    "tensorflow": ("unit", "relu_unit", "bn_unit", "pooling", "quantizer", "kernels", "linear",
                   "xla", "autodiff", "row_kernels"),
    "jax": ("unit", "relu_unit", "bn_unit", "pooling", "quantizer", "kernels", "linear",
            "xla", "autodiff"),
}


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


def module(role: str) -> ModuleType:
    """The current backend's module for `role` (a key of the table above)."""
    backend = check("keras_blpa's fused units")
    if role not in ROLES[backend]:
        raise NotImplementedError(
            f"keras_blpa has no {role!r} module for Keras's {backend!r} backend yet; "
            f"it exists for: {', '.join(b for b in SUPPORTED if role in ROLES[b])}."
        )
    return importlib.import_module(f"keras_blpa.backend.{backend}.{role}")


def unit() -> ModuleType:
    """The unit module of the current backend (`module("unit")`)."""
    return module("unit")


def linear() -> ModuleType:
    """The linear-map module of the current backend (`module("linear")`)."""
    return module("linear")
