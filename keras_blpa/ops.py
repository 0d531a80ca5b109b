"""Public quantizer ops: sign-preserving 4/8-bit codes for BN-normalized activations.

See `keras_blpa.quantizer` for the grid and its guarantees. These functions
are pure TensorFlow and compile under XLA (`tf.function(jit_compile=True)`).
"""

from keras_blpa.quantizer import (
    QuantParams,
    bin_width,
    bn_relu_encode,
    decode,
    encode,
    quantizer_params,
)

__all__ = [
    "QuantParams",
    "bin_width",
    "bn_relu_encode",
    "decode",
    "encode",
    "quantizer_params",
]
