"""Public quantizer ops: sign-preserving 4/8-bit codes for BN-normalized activations.

See `keras_blpa.quantizer` for the grid and its guarantees. `bn_relu_encode`,
`decode` and `decode_relu` run the compiled custom op when it is available
(eager and `tf.function` without XLA) and the bit-identical pure-TensorFlow
code otherwise (`jit_compile=True`, TPU, `KERAS_BLPA_DISABLE_CUSTOM_OPS=1`, or
no compiled library); `implementation()` tells which one is active.
"""

from keras_blpa import custom_op
from keras_blpa.custom_op import bn_relu_encode, decode, decode_relu
from keras_blpa.quantizer import (
    DEFAULT_WINDOW,
    QuantParams,
    bin_width,
    encode,
    quantizer_params,
    resolve_window,
)


def implementation() -> str:
    """"custom_op" when the compiled op is loaded and enabled, else "pure_tf".

    Inside an XLA-compiled function the pure-TF code is used either way.
    """
    return "custom_op" if custom_op.is_available() else "pure_tf"


__all__ = [
    "DEFAULT_WINDOW",
    "QuantParams",
    "bin_width",
    "bn_relu_encode",
    "decode",
    "decode_relu",
    "encode",
    "implementation",
    "quantizer_params",
    "resolve_window",
]
