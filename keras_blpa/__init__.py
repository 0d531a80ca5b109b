"""keras_blpa: Backprop with Low-Precision Approximate Activations for Keras 3."""

from keras_blpa import layers, models, ops
from keras_blpa.conversion import ConversionReport, convert, to_standard
from keras_blpa.layers import BNReLUConv2D, BNReLUDense

__version__ = "0.1.0"

__all__ = [
    "BNReLUConv2D", "BNReLUDense", "ConversionReport", "convert", "layers", "models",
    "ops", "to_standard", "__version__",
]
