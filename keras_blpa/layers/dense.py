"""Dense that keeps codes of its input and of its activation's derivative."""

from __future__ import annotations

import keras
from keras import ops

from keras_blpa.layers.transformer_block import activation_name
from keras_blpa.transformer import codes, derivative
from keras_blpa.transformer.linear_activation import linear_activation


@keras.saving.register_keras_serializable(package="keras_blpa")
class Dense(keras.layers.Dense):
    """`keras.layers.Dense` whose training step keeps codes only.

    Forward (exact): `y = f(x @ kernel + bias)`. Stock autodiff keeps `x`
    for the kernel's gradient and the pre-activation (or `y`) for `f'`. This
    layer keeps a `bits`-bit row code of `x` (one row per sample or token)
    and, for a GELU, SiLU or ReLU activation, a `derivative_bits`-bit code of
    the pre-activation whose level is the backward's `f'`
    (`keras_blpa.transformer.linear_activation`). In a transformer's MLP
    (`Dense(4h, "gelu") -> Dense(h)`) that is about 1.7 bytes per token and
    hidden unit where stock keeps 12 to 16. `bits=None` keeps `x` alone (the
    exact gradient). Inference runs Keras's own code; so do LoRA and
    quantized kernels. `keras_blpa.convert` makes the Dense layers around
    converted transformer blocks (a user's MLP beside a converted
    `MultiHeadAttention`) this layer.

    Example:

    >>> layer = Dense(16, activation="gelu", bits=8)
    >>> y = layer(keras.ops.ones((2, 3, 8)), training=True)

    Args:
      units: as `keras.layers.Dense`.
      activation: None (linear), "gelu", "silu" ("swish"), "relu", or
        KerasHub's "keras_hub>gelu_approximate"; another raises a ValueError
        (keep the stock Dense).
      bits: 4 or 8 for the row code of the input; None keeps it (exact).
      derivative_bits: 1 to 4, the derivative code's width (ReLU: 1 bit
        is exact whatever this is).
      **kwargs: `keras.layers.Dense`'s other arguments.
    """

    def __init__(self, units: int, activation=None, bits: int | None = 8,
                 derivative_bits: int = 3, **kwargs):
        super().__init__(units, activation=activation, **kwargs)
        self._init_blpa(bits, derivative_bits)
        check_dense(self)

    def _init_blpa(self, bits: int | None, derivative_bits: int) -> None:
        codes.check_bits(bits)
        derivative.check_derivative_bits(derivative_bits)
        self.bits = bits
        self.derivative_bits = derivative_bits

    def call(self, inputs, training=None):
        if not training or self.quantization_mode is not None or self.lora_enabled:
            return super().call(inputs, training=training)
        weights = [self.kernel] + ([self.bias] if self.bias is not None else [])

        def linear(x, kernel, *bias):
            return [ops.matmul(x, kernel) + bias[0] if bias else ops.matmul(x, kernel)]

        return linear_activation(
            ops.cast(inputs, self.compute_dtype), [ops.convert_to_tensor(w) for w in weights],
            linear=linear, activation=dense_activation(self), bits=self.bits,
            derivative_bits=self.derivative_bits, name=self.name)

    def get_config(self) -> dict:
        return {**super().get_config(), "bits": self.bits,
                "derivative_bits": self.derivative_bits}


def dense_activation(layer) -> str:
    """The canonical name of a Dense layer's activation ("linear" for none),
    or a ValueError naming it."""
    if keras.activations.serialize(layer.activation) == "linear":
        return "linear"
    return activation_name(layer.activation)


def check_dense(layer) -> None:
    """A ValueError naming what `layer` uses that the Dense unit does not cover."""
    try:
        dense_activation(layer)
    except ValueError as err:
        raise ValueError(f"{layer.name}: {err}") from None
