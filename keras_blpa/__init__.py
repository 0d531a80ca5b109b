"""keras_blpa: Backprop with Low-Precision Approximate Activations for Keras 3."""

from keras_blpa import layers, models
from keras_blpa.conversion import ConversionReport, convert, to_standard
from keras_blpa.layers import (
    ApproxBatchNormalization,
    BNReLUConv2D,
    BNReLUDense,
    PaddedMaxPooling2D,
    ReLUConv2D,
    ReLUDense,
)

__version__ = "0.1.0"

__all__ = [
    "ApproxBatchNormalization", "BNReLUConv2D", "BNReLUDense", "ConversionReport",
    "PaddedMaxPooling2D", "ReLUConv2D", "ReLUDense", "convert", "layers", "models", "ops",
    "to_standard", "__version__",
]


def __getattr__(name: str):
    # `keras_blpa.ops` (the quantizer ops, TensorFlow code) loads on first
    # use, so that importing keras_blpa on the JAX backend imports no TensorFlow.
    if name == "ops":
        import importlib

        try:
            return importlib.import_module("keras_blpa.ops")
        except ImportError as err:
            raise ImportError(
                f"keras_blpa.ops is the TensorFlow quantizer and needs TensorFlow ({err}). "
                "On Keras's JAX backend the same quantizer, bit for bit, is "
                "keras_blpa.jax_backend.quantizer."
            ) from err
    raise AttributeError(f"module 'keras_blpa' has no attribute {name!r}")
