"""keras_blpa: Backprop with Low-Precision Approximate Activations for Keras 3."""

from keras_blpa import _moved, layers, models
from keras_blpa.conversion import ConversionReport, convert, to_standard
from keras_blpa.layers import (
    ApproxBatchNormalization,
    BNReLUConv2D,
    BNReLUDense,
    PaddedMaxPooling2D,
    ReLUConv2D,
    ReLUDense,
)

__version__ = "0.2.0"

_moved.install()  # old module paths (keras_blpa.quantizer, keras_blpa.jax_backend.*)

__all__ = [
    "ApproxBatchNormalization", "BNReLUConv2D", "BNReLUDense", "ConversionReport",
    "PaddedMaxPooling2D", "ReLUConv2D", "ReLUDense", "convert", "layers", "models", "ops",
    "to_standard", "__version__",
]


def __getattr__(name: str):
    # `keras_blpa.ops` loads on first use; it imports TensorFlow only when one
    # of its names is used, so that keras_blpa imports on JAX without TensorFlow.
    if name == "ops":
        import importlib

        return importlib.import_module("keras_blpa.ops")
    raise AttributeError(f"module 'keras_blpa' has no attribute {name!r}")
