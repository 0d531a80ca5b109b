"""Module paths that moved in 0.2 (one package per backend), still importable
for one release: each old path is the new module itself, with a FutureWarning
that names where it lives now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "keras_blpa.unit": "keras_blpa.backend.tensorflow.unit",
    "keras_blpa.relu_unit": "keras_blpa.backend.tensorflow.relu_unit",
    "keras_blpa.bn_unit": "keras_blpa.backend.tensorflow.bn_unit",
    "keras_blpa.quantizer": "keras_blpa.backend.tensorflow.quantizer",
    "keras_blpa.custom_op": "keras_blpa.backend.tensorflow.kernels",
    "keras_blpa.linear": "keras_blpa.backend.tensorflow.linear",
    "keras_blpa.xla": "keras_blpa.backend.tensorflow.xla",
    "keras_blpa.jax_backend": "keras_blpa.backend.jax",
    "keras_blpa.jax_backend.unit": "keras_blpa.backend.jax.unit",
    "keras_blpa.jax_backend.quantizer": "keras_blpa.backend.jax.quantizer",
    "keras_blpa.jax_backend.ffi": "keras_blpa.backend.jax.kernels",
    "keras_blpa.jax_backend.linear": "keras_blpa.backend.jax.linear",
    "keras_blpa.jax_backend.xla": "keras_blpa.backend.jax.xla",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path first and loads it as the new module object."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in the next "
            "release.",
            FutureWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module is already executed


def install() -> None:
    """Puts the alias finder first on `sys.meta_path` (once)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
